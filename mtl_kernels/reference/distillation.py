"""PAD-Net's multi-modal distillation (Xu et al. 2018) and MTAN's attention
layer (Liu et al. 2019) in plain PyTorch, with the survey code's structure
(Vandenhende et al., models/padnet.py and models/mtan.py), so that their
state_dicts and mtl_kernels.convert recognise them.
"""

from __future__ import annotations

import torch
from torch import nn


class SABlock(nn.Module):
    """Spatial self-attention block: conv(x) * sigmoid(attention_conv(x)), 3x3, no bias."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.attention = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.Sigmoid())
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.attention(x)


class MultiTaskDistillationModule(nn.Module):
    """D_t = F_t + sum_{a != t} SABlock[t][a](F_a); input keys 'features_<task>', as in the survey."""

    def __init__(self, tasks: list[str], auxilary_tasks: list[str], channels: int):
        super().__init__()
        self.tasks = list(tasks)
        self.auxilary_tasks = list(auxilary_tasks)
        self.self_attention = nn.ModuleDict(
            {
                t: nn.ModuleDict({a: SABlock(channels, channels) for a in self.auxilary_tasks if a != t})
                for t in self.tasks
            }
        )

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        adapters = {
            t: {a: self.self_attention[t][a](x[f"features_{a}"]) for a in self.auxilary_tasks if a != t}
            for t in self.tasks
        }
        return {t: x[f"features_{t}"] + torch.sum(torch.stack(list(adapters[t].values())), dim=0) for t in self.tasks}


class AttentionLayer(nn.Sequential):
    """MTAN's attention: sigmoid(BN(conv1x1(ReLU(BN(conv1x1(x)))))), the mask alone."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, 1, padding=0),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 1, padding=0),
            nn.BatchNorm2d(out_channels),
            nn.Sigmoid(),
        )
