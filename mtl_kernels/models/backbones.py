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
                          Any input size runs, as in the survey's HRNet: its
                          fuse layers resize a coarser branch to the finer
                          one's size (bilinear), where timm's upsample by a
                          fixed 2^k (nearest) needs sides that are multiples
                          of 32; every stride-2 conv rounds up (80 wide:
                          20, 10, 5, 3).

kwargs go to timm.create_model, e.g. channels=(8, 16, 32, 64), stem_width=8 for
a narrow ResNet in tests.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import upsample

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


class HRNetFuse(nn.Module):
    """One of timm's HighResolutionModules (its branches, then the exchange between them) with
    the survey's fuse: a coarser branch j, after its 1x1 conv and BN, is resized bilinearly
    to branch i's size, as the survey's seg_hrnet does, instead of timm's nearest upsampling
    by 2^(j-i), which only fits when every halving is exact (input sides multiples of 32).
    It takes over the module's children, so the state_dict keys (and timm's pretrained
    weights) stay the same."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.num_branches = module.num_branches
        self.branches = module.branches
        self.fuse_layers = module.fuse_layers
        self.fuse_act = module.fuse_act
        if self.num_branches > 1:
            for i, row in enumerate(self.fuse_layers):
                for j in range(i + 1, len(row)):
                    if not isinstance(row[j][-1], nn.Upsample):  # a timm whose layout this does not know
                        raise RuntimeError(f"HRNetFuse: expected timm's Upsample at the end of fuse layer {i}.{j}")
                    row[j][-1] = nn.Identity()  # forward resizes to the finer branch's size instead

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        if self.num_branches == 1:
            return x
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = x[i].shape[-2:]
            y = None
            for j, f in enumerate(row):  # the sum in timm's (and the survey's) order
                z = upsample(f(x[j]), size) if j > i else f(x[j])
                y = z if y is None else y + z
            out.append(self.fuse_act(y))
        return out


class HRNetBackbone(Backbone):
    """timm's HRNet with its four raw branches (feature_location=''), the survey's fuse (HRNetFuse)."""

    kind = "hrnet"

    def __init__(self, name: str = "hrnet_w18_small_v2", pretrained: bool = False, **kwargs):
        super().__init__()
        if name not in HRNETS:
            raise ValueError(f"HRNetBackbone: unknown backbone {name!r}; valid HRNets are {list(HRNETS)}")
        self.body = _timm().create_model(
            name, pretrained=pretrained, features_only=True, feature_location="", out_indices=(1, 2, 3, 4), **kwargs
        )
        from timm.models.hrnet import HighResolutionModule

        for path, module in list(self.body.named_modules()):
            if isinstance(module, HighResolutionModule):
                parent, _, key = path.rpartition(".")
                setattr(self.body.get_submodule(parent), key, HRNetFuse(module))
        self.name = name
        self.channels = list(self.body.feature_info.channels())
        self.reductions = list(self.body.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def build_backbone(name: str, pretrained: bool = False, **kwargs) -> Backbone:
    """A backbone by name; unknown names raise a ValueError listing the valid ones."""
    check_backbone(name)
    if name in RESNETS:
        return ResNetBackbone(name, pretrained=pretrained, **kwargs)
    return HRNetBackbone(name, pretrained=pretrained, **kwargs)
