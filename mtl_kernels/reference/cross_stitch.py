"""Cross-stitch unit (Misra et al. 2016) in plain PyTorch: the definition.

`SurveyCrossStitchUnit` has the structure of the survey code's
CrossStitchUnit (Vandenhende et al., models/cross_stitch.py): one learnable
per-channel weight for every (output task, input task) pair, keys
``cross_stitch_unit.<task_i>.<task_j>.param``. `mtl_kernels.convert` recognises
it by that class name and layout.
"""

from __future__ import annotations

import torch
from torch import nn


def cross_stitch(xs: list[torch.Tensor], alpha: torch.Tensor) -> list[torch.Tensor]:
    """ys[i] = sum_j alpha[i, j, :] (per channel) * xs[j], as the survey computes it.

    xs: T tensors [B, C, H, W]; alpha: [T, T, C]. Products are taken in the
    promoted dtype (an fp32 alpha with bf16 features accumulates in fp32) and
    each output has its input's dtype.
    """
    num_tasks = len(xs)
    outs = []
    for i in range(num_tasks):
        prod = torch.stack([alpha[i, j].view(1, -1, 1, 1) * xs[j] for j in range(num_tasks)])
        outs.append(torch.sum(prod, dim=0).to(xs[i].dtype))
    return outs


class ChannelWiseMultiply(nn.Module):
    """The survey's per-channel scale: one parameter of shape [C]."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.param = nn.Parameter(torch.empty(num_channels))

    def init_value(self, value: float) -> None:
        with torch.no_grad():
            self.param.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.param.view(1, -1, 1, 1) * x


class CrossStitchUnit(nn.Module):
    """The survey code's cross-stitch unit: dict of task features -> dict."""

    def __init__(self, tasks: list[str], num_channels: int, alpha: float = 0.9, beta: float = 0.1):
        super().__init__()
        self.tasks = list(tasks)
        self.cross_stitch_unit = nn.ModuleDict(
            {ti: nn.ModuleDict({tj: ChannelWiseMultiply(num_channels) for tj in self.tasks}) for ti in self.tasks}
        )
        for ti in self.tasks:
            for tj in self.tasks:
                self.cross_stitch_unit[ti][tj].init_value(alpha if ti == tj else beta)

    def forward(self, task_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for ti in self.tasks:
            prod = torch.stack([self.cross_stitch_unit[ti][tj](task_features[tj]) for tj in self.tasks])
            out[ti] = torch.sum(prod, dim=0)
        return out
