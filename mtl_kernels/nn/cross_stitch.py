"""CrossStitch: the survey's cross-stitch unit as one fused op."""

from __future__ import annotations

import torch
from torch import nn

from .. import _backend
from ..ops.cross_stitch import cross_stitch
from .tasks import check_task_features, check_tasks


class CrossStitch(nn.Module):
    """Cross-stitch unit (Misra et al. 2016): out[t_i] = sum_j alpha[i, j, c] * features[t_j].

    tasks: task names, in the order of alpha's rows; channels: C of every
    task's features; alpha/beta: the initial weight on and off the diagonal.
    forward takes and returns {task: [B, C, H, W] tensor}.

    Besides its own state_dict (one parameter `alpha` [T, T, C]) it loads one
    saved from the survey code's CrossStitchUnit
    (keys cross_stitch_unit.<task_i>.<task_j>.param of shape [C]).
    """

    def __init__(self, tasks, channels: int, alpha: float = 0.9, beta: float = 0.1, *, backend: str | None = None):
        super().__init__()
        self.tasks = check_tasks(tasks, "CrossStitch")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"CrossStitch: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.backend = _backend.check_backend_arg(backend)
        T = len(self.tasks)
        init = torch.full((T, T, channels), float(beta))
        init[range(T), range(T)] = float(alpha)
        self.alpha = nn.Parameter(init)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        xs = check_task_features(features, self.tasks, self.channels, "CrossStitch")
        return dict(zip(self.tasks, cross_stitch(xs, self.alpha, backend=self.backend)))

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, channels={self.channels}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # The survey's layout: one [C] parameter per (output task, input task).
        survey = {(ti, tj): f"{prefix}cross_stitch_unit.{ti}.{tj}.param" for ti in self.tasks for tj in self.tasks}
        if prefix + "alpha" not in state_dict and any(k in state_dict for k in survey.values()):
            absent = [k for k in survey.values() if k not in state_dict]
            if absent:
                errors.append(f"CrossStitch: the survey state_dict lacks {absent}")
                return
            rows = [torch.stack([state_dict.pop(survey[ti, tj]) for tj in self.tasks]) for ti in self.tasks]
            state_dict[prefix + "alpha"] = torch.stack(rows)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
