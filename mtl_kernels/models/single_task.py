"""Single-task baseline: one independent network (backbone + head) per task."""

from __future__ import annotations

import torch

from ._base import MultiTaskModel


class SingleTaskBaseline(MultiTaskModel):
    """The survey's single-task models, one per task, side by side in one module.

    With one task it is the plain single-task network (backbone, then the
    backbone's head: DeepLab-v3 on a ResNet, the HRNet head on HRNet); with
    several, each task has its own backbone and head and nothing is shared, so
    it takes the same input and returns the same {task: prediction} dict as
    the multi-task models (the survey's baseline for the multi-task delta).
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
        self.backbone = self.make_task_backbones(backbone, pretrained, backbone_kwargs)
        self.heads = self.make_heads(self.backbone, head_kwargs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {t: self.heads[t](self.backbone[t](x)) for t in self.tasks}
        return self.resize(out, x.shape[-2:])
