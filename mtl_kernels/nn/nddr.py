"""NDDR: the survey's NDDR fusion layer as one fused op."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .. import _backend
from ..ops.nddr import nddr
from ..reference.nddr import nddr_init_weight
from .tasks import check_task_features, check_tasks

# survey key under layer.<task>. -> this module's key (stacked over tasks)
_SURVEY_KEYS = {
    "0.weight": "weight",
    "1.weight": "bn_weight",
    "1.bias": "bn_bias",
    "1.running_mean": "running_mean",
    "1.running_var": "running_var",
    "1.num_batches_tracked": "num_batches_tracked",
}


class NDDR(nn.Module):
    """NDDR layer (Gao et al. 2019): out[t] = ReLU(BN_t(W_t * concat_j features[t_j])).

    tasks: task names, the order in which features are concatenated;
    channels: C of every task's features; alpha/beta: the initial weight of a
    task's own block and of every other block (diagonal); momentum, eps: the
    BatchNorm's. forward takes and returns {task: [B, C, H, W] tensor}.

    Parameters: weight [T, C, T*C] (the 1x1 convolutions), bn_weight and
    bn_bias [T, C]; buffers running_mean, running_var [T, C] and
    num_batches_tracked. Also loads a state_dict of the survey code's NDDRLayer
    (layer.<task>.0.weight [C, T*C, 1, 1], layer.<task>.1.{weight, bias,
    running_mean, running_var, num_batches_tracked}).
    """

    def __init__(
        self,
        tasks,
        channels: int,
        alpha: float = 0.9,
        beta: float = 0.1,
        momentum: float = 0.05,
        eps: float = 1e-5,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        self.tasks = check_tasks(tasks, "NDDR")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"NDDR: channels must be a positive int, got {channels!r}")
        for name, v in (("momentum", momentum), ("eps", eps)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(
                    f"NDDR: {name} must be a number, got {v!r} (momentum=None, BN's cumulative "
                    "average, is not supported: the survey's NDDR uses 0.05)"
                )
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"NDDR: momentum must be in [0, 1], got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"NDDR: eps must be positive, got {eps!r}")
        self.channels, self.momentum, self.eps = channels, momentum, eps
        self.backend = _backend.check_backend_arg(backend)
        T = len(self.tasks)
        self.weight = nn.Parameter(nddr_init_weight(T, channels, alpha, beta))
        self.bn_weight = nn.Parameter(torch.ones(T, channels))
        self.bn_bias = nn.Parameter(torch.zeros(T, channels))
        self.register_buffer("running_mean", torch.zeros(T, channels))
        self.register_buffer("running_var", torch.ones(T, channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        xs = check_task_features(features, self.tasks, self.channels, "NDDR")
        if self.training:
            self.num_batches_tracked.add_(1)
        ys = nddr(
            xs,
            self.weight,
            self.bn_weight,
            self.bn_bias,
            self.running_mean,
            self.running_var,
            self.training,
            self.momentum,
            self.eps,
            backend=self.backend,
        )
        return dict(zip(self.tasks, ys))

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, channels={self.channels}, momentum={self.momentum}, eps={self.eps}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # The survey's layout: one Conv2d + BatchNorm2d per task under layer.<task>.
        if prefix + "weight" not in state_dict and any(f"{prefix}layer.{t}.0.weight" in state_dict for t in self.tasks):
            keys = [f"{prefix}layer.{t}.{k}" for t in self.tasks for k in _SURVEY_KEYS]
            absent = [k for k in keys if k not in state_dict]
            if absent:
                errors.append(f"NDDR: the survey state_dict lacks {absent}")
                return
            for key, own in _SURVEY_KEYS.items():
                values = [state_dict.pop(f"{prefix}layer.{t}.{key}") for t in self.tasks]
                if own == "weight":
                    state_dict[prefix + own] = torch.stack([v.flatten(1) for v in values])  # [C, T*C, 1, 1] each
                elif own == "num_batches_tracked":
                    state_dict[prefix + own] = torch.stack(values).max()
                else:
                    state_dict[prefix + own] = torch.stack(values)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
