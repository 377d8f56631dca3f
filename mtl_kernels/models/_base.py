"""What every model of mtl_kernels.models shares: task bookkeeping, backends, outputs."""

from __future__ import annotations

import torch
from torch import nn

from .._backend import check_backend_arg
from ..nn import NDDR, CrossStitch, MTANAttention, MultiModalDistillation
from .backbones import RESNETS, build_backbone, check_backbone
from .heads import build_head
from .layers import upsample

# Key of the deep-supervision outputs (PAD-Net, MTI-Net): out[DEEP_SUPERVISION]
# = {stage: {task: prediction}}, each at its own (feature) resolution.
DEEP_SUPERVISION = "deep_supervision"

FUSED_MODULES = (CrossStitch, NDDR, MultiModalDistillation, MTANAttention)


def check_backend_name(backend: str | None) -> str | None:
    """None (the process default) or a backend name, checked now with the ops' own message: a model
    without fused modules (single_task, multi_task) would never check it, the others only at the
    first forward."""
    return check_backend_arg(backend)


def set_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Make every fused module in `model` run on `backend` (None: the process default); returns model."""
    check_backend_name(backend)
    for m in model.modules():
        if isinstance(m, FUSED_MODULES) or isinstance(m, MultiTaskModel):
            m.backend = backend
    return model


def gated(attention: nn.Module, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """mask(x) * features: fused for mk.nn.MTANAttention, the survey's product for its AttentionLayer."""
    if isinstance(attention, MTANAttention):
        return attention(x, features)
    return attention(x) * features


class MultiTaskModel(nn.Module):
    """Base of the survey's models: forward(image [B, 3, H, W]) -> {task: prediction [B, C_t, H, W]}.

    out_channels: {task: output channels}, in the order of `tasks`.
    backend: the backend of every fused module inside ("reference" runs their
        plain-PyTorch definitions); set_backend(model, name) changes it later.
    upsample: resize the final predictions to the input size (bilinear,
        align_corners=False, as the survey); False returns them at the head's
        resolution, for a loss that resizes them itself
        (mk.nn.DenseMultiTaskLoss(upsample=True) does it inside the fused loss).
    """

    default_backbone = "resnet18"
    backbones: tuple[str, ...] | None = None  # the backbones a model supports (None: all)
    uses_auxiliary_tasks = False

    def __init__(self, out_channels: dict[str, int], *, backend: str | None = None, upsample: bool = True):
        super().__init__()
        self.out_channels = dict(out_channels)
        self.tasks = list(self.out_channels)
        self.backend = check_backend_name(backend)
        self.upsample = upsample

    @classmethod
    def check_backbone(cls, name: str) -> str:
        check_backbone(name)
        valid = cls.backbones
        if valid is not None and name not in valid:
            raise ValueError(f"{cls.__name__} needs one of the backbones {list(valid)}, got {name!r}")
        return name

    def make_backbone(self, name: str, pretrained: bool, backbone_kwargs: dict | None):
        backbone = build_backbone(self.check_backbone(name), pretrained=pretrained, **(backbone_kwargs or {}))
        self.backbone_name, self.backbone_kind = backbone.name, backbone.kind
        return backbone

    def make_task_backbones(self, name: str, pretrained: bool, backbone_kwargs: dict | None) -> nn.ModuleDict:
        """One backbone per task (nothing shared): {task: backbone}."""
        return nn.ModuleDict({t: self.make_backbone(name, pretrained, backbone_kwargs) for t in self.tasks})

    def make_heads(self, backbone: nn.Module, head_kwargs: dict | None) -> nn.ModuleDict:
        """{task: the backbone's head (DeepLab-v3 on a ResNet, HRNet's on HRNet)}, on one shared
        backbone or, for a ModuleDict of them, on each task's own."""
        own = isinstance(backbone, nn.ModuleDict)
        return nn.ModuleDict(
            {
                t: build_head(backbone[t] if own else backbone, c, **(head_kwargs or {}))
                for t, c in self.out_channels.items()
            }
        )

    def with_auxiliary(self, auxiliary: dict[str, int] | None) -> dict[str, int]:
        """{task: channels} of the tasks, then the auxiliary ones (predicted for deep supervision and
        distilled from); sets self.auxiliary_tasks to those names in that order."""
        self.auxiliary_tasks = self.tasks + [a for a in (auxiliary or {}) if a not in self.tasks]
        channels = {**self.out_channels, **(auxiliary or {})}
        return {a: channels[a] for a in self.auxiliary_tasks}

    def resize(self, out: dict[str, torch.Tensor], size) -> dict[str, torch.Tensor]:
        if not self.upsample:
            return out
        return {t: upsample(y, size) for t, y in out.items()}

    def extra_repr(self) -> str:
        return f"tasks={self.out_channels}, backend={self.backend!r}"


SOFT_SHARING_BACKBONES = RESNETS
