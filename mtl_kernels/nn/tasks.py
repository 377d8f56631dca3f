"""Checks shared by the modules that take {task: features} dicts."""

from __future__ import annotations

import torch


def check_tasks(tasks, module: str) -> list[str]:
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise TypeError(f"{module}: tasks must be a list of task names (str), got {tasks!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"{module}: tasks must name at least one task")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{module}: tasks must be unique, got {tasks}")
    return tasks


def check_task_features(features, tasks: list[str], channels: int, module: str) -> list[torch.Tensor]:
    """features[t] for t in tasks, after checking every task is there, none unknown, with C channels."""
    if not isinstance(features, dict):
        raise TypeError(f"{module}: expected a dict {{task: tensor}}, got {type(features).__name__}")
    for t in features:
        if t not in tasks:
            raise KeyError(f"{module}: unknown task {t!r}; this module's tasks are {tasks}")
    xs = []
    for t in tasks:
        if t not in features:
            raise KeyError(f"{module}: features lack task {t!r}; expected tasks {tasks}")
        x = features[t]
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{module}: features[{t!r}] must be a 4-D tensor [B, C, H, W], got {_describe(x)}")
        if x.shape[1] != channels:
            raise ValueError(f"{module}: features[{t!r}] has {x.shape[1]} channels, expected {channels}")
        xs.append(x)
    return xs


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
