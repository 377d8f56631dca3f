"""NDDR fusion layer (Gao et al. 2019, NDDR-CNN) in plain PyTorch: the definition.

`NDDRLayer` has the structure of the survey code's NDDRLayer (Vandenhende et
al., models/nddr_cnn.py): per task, a bias-free 1x1 convolution from the T*C
concatenated task features to C channels, BatchNorm (momentum 0.05) and ReLU;
keys ``layer.<task>.0.weight`` [C, T*C, 1, 1] and ``layer.<task>.1.*``.
`mtl_kernels.convert` recognises it by that class name and layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nddr_init_weight(num_tasks: int, channels: int, alpha: float, beta: float) -> torch.Tensor:
    """[T, C, T*C]: task t's block of its own features is diag(alpha), every other block diag(beta)."""
    eye = torch.eye(channels)
    weight = torch.empty(num_tasks, channels, num_tasks * channels)
    for t in range(num_tasks):
        for j in range(num_tasks):
            weight[t, :, j * channels : (j + 1) * channels] = eye * (alpha if j == t else beta)
    return weight


def nddr(
    xs: list[torch.Tensor],
    weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float = 0.05,
    eps: float = 1e-5,
) -> list[torch.Tensor]:
    """ys[t] = ReLU(BN_t(weight[t] * concat_j xs[j])), as the survey computes it.

    xs: T tensors [B, C, H, W]; weight: [T, C, T*C] (1x1 convolutions);
    bn_weight, bn_bias, running_mean, running_var: [T, C]. In training mode
    the running statistics are updated in place, as nn.BatchNorm2d does.
    """
    x = torch.cat(list(xs), dim=1)
    ys = []
    for t in range(len(xs)):
        z = F.conv2d(x, weight[t, :, :, None, None].to(x.dtype))  # fp32 weights with half features: autocast-style
        z = F.batch_norm(z, running_mean[t], running_var[t], bn_weight[t], bn_bias[t], training, momentum, eps)
        ys.append(F.relu(z))
    return ys


class NDDRLayer(nn.Module):
    """The survey code's NDDR layer: dict of task features -> dict."""

    def __init__(self, tasks: list[str], channels: int, alpha: float = 0.9, beta: float = 0.1):
        super().__init__()
        self.tasks = list(tasks)
        T = len(self.tasks)
        self.layer = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Conv2d(T * channels, channels, 1, 1, 0, bias=False),
                    nn.BatchNorm2d(channels, momentum=0.05),
                    nn.ReLU(),
                )
                for t in self.tasks
            }
        )
        init = nddr_init_weight(T, channels, alpha, beta)
        with torch.no_grad():
            for i, t in enumerate(self.tasks):
                self.layer[t][0].weight.copy_(init[i, :, :, None, None])
                self.layer[t][1].weight.fill_(1.0)
                self.layer[t][1].bias.fill_(0.0)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cat = torch.cat([x[t] for t in self.tasks], 1)  # the order of self.tasks
        return {t: self.layer[t](cat) for t in self.tasks}
