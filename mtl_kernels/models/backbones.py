"""Backbones through timm: dilated ResNets (output stride 8) and HRNet-W18-small-v2.

Every backbone maps an image [B, 3, H, W] to a list of four feature maps and
says what they are (`channels`, `reductions`: the stride of each). pretrained
defaults to False, so nothing is downloaded; pretrained=True loads timm's
weights (internet or a local Hugging Face cache needed).

    resnet18, resnet50    the four ResNet stages (layer1..layer4), dilated to
                          output stride 8 as in the survey: strides 4, 8, 8, 8;
                          channels 64, 128, 256, 512 (ResNet-50: 256 ... 2048).
                          The soft-sharing models (cross-stitch, NDDR, MTAN)
                          run them stage by stage: stem + layer1 is stage 0.
    hrnet_w18_small_v2    the four raw HRNet branches, as the survey uses them:
                          18, 36, 72, 144 channels at strides 4, 8, 16, 32.
                          Input sides must be multiples of 32.

kwargs go to timm.create_model, e.g. channels=(8, 16, 32, 64), stem_width=8 for
a narrow ResNet in tests.
"""

from __future__ import annotations

import torch
from torch import nn

RESNETS = ("resnet18", "resnet50")
HRNETS = ("hrnet_w18_small_v2",)
BACKBONES = (*RESNETS, *HRNETS)


def _timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise ImportError("mtl_kernels.models needs timm (pip install timm==1.0.31 torchvision==0.29.1)") from e
    return timm


def check_backbone(name: str) -> str:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones are {list(BACKBONES)}")
    return name


class Backbone(nn.Module):
    """Base: forward(x) -> [f0, f1, f2, f3]; channels[i] and reductions[i] describe f_i."""

    name: str
    kind: str  # "resnet" or "hrnet"
    channels: list[int]
    reductions: list[int]


class ResNetBackbone(Backbone):
    """A timm ResNet's stem and four stages, output stride 8 (dilated layer3 and layer4)."""

    kind = "resnet"

    def __init__(self, name: str = "resnet18", pretrained: bool = False, output_stride: int = 8, **kwargs):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"ResNetBackbone: unknown backbone {name!r}; valid ResNets are {list(RESNETS)}")
        body = _timm().create_model(
            name,
            pretrained=pretrained,
            features_only=True,
            output_stride=output_stride,
            out_indices=(1, 2, 3, 4),
            **kwargs,
        )
        self.name = name
        self.channels = list(body.feature_info.channels())
        self.reductions = list(body.feature_info.reduction())
        self.stem = nn.Sequential(body.conv1, body.bn1, body.act1, body.maxpool)
        self.stages = nn.ModuleList([body.layer1, body.layer2, body.layer3, body.layer4])

    def forward_stage(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Stage i (0..3); stage 0 includes the stem, as in the survey's forward_stage."""
        if i == 0:
            x = self.stem(x)
        return self.stages[i](x)

    def forward_stage_except_last_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if i == 0:
            x = self.stem(x)
        return self.stages[i][:-1](x)

    def forward_stage_last_block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.stages[i][-1](x)

    def last_block_in_channels(self, i: int) -> int:
        """Channels of the input of stage i's last block (what MTAN's attention reads)."""
        return self.stages[i][-1].conv1.in_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i in range(len(self.stages)):
            x = self.forward_stage(x, i)
            feats.append(x)
        return feats


class HRNetBackbone(Backbone):
    """timm's HRNet with its four raw branches (feature_location='')."""

    kind = "hrnet"

    def __init__(self, name: str = "hrnet_w18_small_v2", pretrained: bool = False, **kwargs):
        super().__init__()
        if name not in HRNETS:
            raise ValueError(f"HRNetBackbone: unknown backbone {name!r}; valid HRNets are {list(HRNETS)}")
        self.body = _timm().create_model(
            name, pretrained=pretrained, features_only=True, feature_location="", out_indices=(1, 2, 3, 4), **kwargs
        )
        self.name = name
        self.channels = list(self.body.feature_info.channels())
        self.reductions = list(self.body.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        H, W = x.shape[-2:]
        if H % 32 or W % 32:
            raise ValueError(f"{self.name}: input height and width must be multiples of 32, got {H} x {W}")
        return list(self.body(x))


def build_backbone(name: str, pretrained: bool = False, **kwargs) -> Backbone:
    """A backbone by name; unknown names raise a ValueError listing the valid ones."""
    check_backbone(name)
    if name in RESNETS:
        return ResNetBackbone(name, pretrained=pretrained, **kwargs)
    return HRNetBackbone(name, pretrained=pretrained, **kwargs)
