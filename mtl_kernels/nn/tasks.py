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
        if xs and (x.shape, x.dtype, x.device) != (xs[0].shape, xs[0].dtype, xs[0].device):
            raise ValueError(
                f"{module}: features[{t!r}] is {_describe_fully(x)} but features[{tasks[0]!r}] is "
                f"{_describe_fully(xs[0])}; every task's features must share shape, dtype and device"
            )
        xs.append(x)
    return xs


def _describe_fully(x: torch.Tensor) -> str:
    return f"{tuple(x.shape)} {x.dtype} on {x.device}"


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


# Output channels of each dense prediction task of the survey (Vandenhende et
# al.): None where it is the dataset's number of classes. The one place the
# models (mtl_kernels.models) look these up.
TASK_OUTPUTS: dict[str, int | None] = {
    "semseg": None,  # classes: NYUD-v2 40, PASCAL-Context 21
    "human_parts": None,  # classes: PASCAL-Context 7 (background + 6 parts)
    "depth": 1,
    "normals": 3,
    "edge": 1,
    "sal": 1,
}
# Class counts used when the caller gives none; semseg has no default (it
# differs between the datasets, and a wrong one would fail silently).
DEFAULT_CLASSES: dict[str, int] = {"human_parts": 7}


def output_channels(tasks, num_classes=None, module: str = "output_channels") -> dict[str, int]:
    """{task: output channels} for a list of known task names, or a dict given as is.

    num_classes: an int (semseg's classes) or a dict {task: channels} that
    overrides the table (also how to add a task the table lacks).
    tasks may itself be a dict {task: channels}: taken as given.
    """
    if isinstance(tasks, dict):
        names = check_tasks(list(tasks), module)
        out = {t: tasks[t] for t in names}
    else:
        names = check_tasks(tasks, module)
        if num_classes is None:
            overrides = {}
        elif isinstance(num_classes, int):
            overrides = {"semseg": num_classes}
        elif isinstance(num_classes, dict):
            overrides = dict(num_classes)
        else:
            raise TypeError(f"{module}: num_classes must be an int or a dict {{task: channels}}, got {num_classes!r}")
        out = {}
        for t in names:
            if t in overrides:
                out[t] = overrides[t]
            elif t not in TASK_OUTPUTS:
                raise ValueError(
                    f"{module}: unknown task {t!r}; known tasks are {sorted(TASK_OUTPUTS)} "
                    "(or give its channels in num_classes={task: channels})"
                )
            elif TASK_OUTPUTS[t] is not None:
                out[t] = TASK_OUTPUTS[t]
            elif t in DEFAULT_CLASSES:
                out[t] = DEFAULT_CLASSES[t]
            else:
                raise ValueError(
                    f"{module}: task {t!r} needs its number of classes: num_classes=40 (NYUD-v2) "
                    "or 21 (PASCAL-Context), or num_classes={task: classes}"
                )
    for t, c in out.items():
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"{module}: task {t!r} must have a positive int of output channels, got {c!r}")
    return out
