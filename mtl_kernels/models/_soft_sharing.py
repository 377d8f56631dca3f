"""Task-specific ResNets joined by a fusion unit after every stage (cross-stitch, NDDR-CNN)."""

from __future__ import annotations

import torch
from torch import nn

from ._base import SOFT_SHARING_BACKBONES, MultiTaskModel


class StageFusionNetwork(MultiTaskModel):
    """One ResNet per task, run stage by stage; after stage i, units[i] maps
    {task: features} -> {task: features}; then each task's DeepLab-v3 head.
    Subclasses say which unit (make_unit)."""

    backbones = SOFT_SHARING_BACKBONES

    def __init__(
        self,
        out_channels: dict[str, int],
        backbone: str = "resnet18",
        *,
        pretrained: bool = False,
        backbone_kwargs: dict | None = None,
        head_kwargs: dict | None = None,
        backend: str | None = None,
        upsample: bool = True,
        survey_modules: bool = False,
    ):
        super().__init__(out_channels, backend=backend, upsample=upsample)
        self.backbone = self.make_task_backbones(backbone, pretrained, backbone_kwargs)
        first = self.backbone[self.tasks[0]]
        self.units = nn.ModuleList([self.make_unit(c, survey_modules) for c in first.channels])
        self.heads = self.make_heads(self.backbone, head_kwargs)

    def make_unit(self, channels: int, survey_modules: bool) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = dict.fromkeys(self.tasks, x)
        for i, unit in enumerate(self.units):
            feats = unit({t: self.backbone[t].forward_stage(feats[t], i) for t in self.tasks})
        return self.resize({t: self.heads[t](feats[t]) for t in self.tasks}, x.shape[-2:])
