"""Multi-task baseline: a shared encoder and one head per task (hard parameter sharing)."""

from __future__ import annotations

import torch

from ._base import MultiTaskModel


class MultiTaskBaseline(MultiTaskModel):
    """Shared backbone, then a head per task (DeepLab-v3 on a ResNet, the HRNet head on HRNet).

    It has no fused module: backend= is accepted for a uniform interface.
    """

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
    ):
        super().__init__(out_channels, backend=backend, upsample=upsample)
        self.backbone = self.make_backbone(backbone, pretrained, backbone_kwargs)
        self.heads = self.make_heads(self.backbone, head_kwargs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.backbone(x)
        return self.resize({t: self.heads[t](shared) for t in self.tasks}, x.shape[-2:])
