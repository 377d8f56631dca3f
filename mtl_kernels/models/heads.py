"""Task heads: DeepLab-v3 (ASPP) for the ResNets, the HRNet head for HRNet.

Both take the backbone's list of feature maps: DeepLabHead reads the last one
(output stride 8), HRNetHead all four. A bare tensor is taken as a one-element
list, so a head also runs on one task's features in the soft-sharing models.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import upsample


def _as_list(features) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017), as in DeepLab-v3.

    Five branches of `channels` each: 1x1 conv; 3x3 convs with dilation
    `rates`; global average pooling + 1x1 conv (broadcast back); every one
    with BN + ReLU. Concatenated, projected by 1x1 conv + BN + ReLU, dropout.
    """

    def __init__(self, in_channels: int, rates=(12, 24, 36), channels: int = 256, dropout: float = 0.5):
        super().__init__()

        def branch(k: int, dilation: int = 1) -> nn.Sequential:
            pad = 0 if k == 1 else dilation
            return nn.Sequential(
                nn.Conv2d(in_channels, channels, k, padding=pad, dilation=dilation, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )

        self.convs = nn.ModuleList([branch(1), *(branch(3, r) for r in rates)])
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.project = nn.Sequential(
            nn.Conv2d((len(rates) + 2) * channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([conv(x) for conv in self.convs] + [pooled], dim=1))


class DeepLabHead(nn.Sequential):
    """DeepLab-v3 head: ASPP (rates 12, 24, 36; 256 channels; dropout 0.5), 3x3 conv-BN-ReLU, 1x1 conv.

    forward(features) reads the last feature map of a list (or a tensor).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int = 256, rates=(12, 24, 36), dropout=0.5):
        super().__init__(
            ASPP(in_channels, rates, channels, dropout),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, out_channels, 1),
        )

    def forward(self, features) -> torch.Tensor:
        return super().forward(_as_list(features)[-1])


class HRNetHead(nn.Module):
    """The survey's HRNet head: upsample every scale to the largest, concatenate,
    1x1 conv (sum(channels) -> sum(channels)), BN, ReLU, 1x1 conv -> out_channels."""

    def __init__(self, in_channels, out_channels: int):
        super().__init__()
        self.in_channels = list(in_channels)
        total = sum(self.in_channels)
        self.last_layer = nn.Sequential(
            nn.Conv2d(total, total, 1),
            nn.BatchNorm2d(total),
            nn.ReLU(inplace=True),
            nn.Conv2d(total, out_channels, 1),
        )

    def forward(self, features) -> torch.Tensor:
        xs = _as_list(features)
        if len(xs) != len(self.in_channels):
            raise ValueError(f"HRNetHead: expected {len(self.in_channels)} feature maps, got {len(xs)}")
        size = xs[0].shape[-2:]
        return self.last_layer(torch.cat([xs[0]] + [upsample(x, size) for x in xs[1:]], dim=1))


class HighResolutionFuse(nn.Module):
    """HRNet's scales fused into one map, as the survey's HighResolutionFuse (what its PAD-Net
    reads from HRNet): upsample all to the largest, concatenate, 1x1 conv (with bias) keeping
    every channel (sum(in_channels): 270 on HRNet-W18), BN, ReLU. out_channels = sum(in_channels);
    PAD-Net's first bottleneck reduces it to its own width."""

    def __init__(self, in_channels):
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = total = sum(self.in_channels)
        self.last_layer = nn.Sequential(
            nn.Conv2d(total, total, 1),
            nn.BatchNorm2d(total),
            nn.ReLU(inplace=True),
        )

    def forward(self, features) -> torch.Tensor:
        xs = _as_list(features)
        if len(xs) != len(self.in_channels):
            raise ValueError(f"HighResolutionFuse: expected {len(self.in_channels)} feature maps, got {len(xs)}")
        size = xs[0].shape[-2:]
        return self.last_layer(torch.cat([xs[0]] + [upsample(x, size) for x in xs[1:]], dim=1))


def build_head(backbone, out_channels: int, **kwargs) -> nn.Module:
    """The survey's head for a backbone: DeepLab-v3 on a ResNet, the HRNet head on HRNet.

    kwargs go to DeepLabHead (channels=, rates=, dropout=); HRNetHead takes none.
    """
    if backbone.kind == "hrnet":
        return HRNetHead(backbone.channels, out_channels)
    return DeepLabHead(backbone.channels[-1], out_channels, **kwargs)
