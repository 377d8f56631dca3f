"""The survey's architectures (Vandenhende et al. 2021) on the fused modules.

    import mtl_kernels as mk
    model = mk.models.build("mti_net", ["semseg", "depth"], num_classes=40,
                            auxiliary_tasks=["normals", "edge"])
    out = model(image)             # {task: [B, C_t, H, W]} at the image's size
    out["deep_supervision"]        # PAD-Net, MTI-Net: intermediate predictions

Models (MODELS; default backbone in brackets):
    single_task    one backbone + head per task, nothing shared [resnet18]
    multi_task     shared backbone, one head per task [resnet18]
    cross_stitch   task-specific ResNets, mk.nn.CrossStitch after every stage [resnet18]
    nddr_cnn       task-specific ResNets, mk.nn.NDDR after every stage [resnet18]
    mtan           shared ResNet, per-task mk.nn.MTANAttention at every stage [resnet18]
    pad_net        initial predictions, mk.nn.MultiModalDistillation, final heads [hrnet_w18_small_v2]
    mti_net        per-scale predictions, FPM, distillation at each of 4 scales [hrnet_w18_small_v2]
    jtrl           tasks refined in turn at increasing scales (simplified) [resnet18]
Backbones (BACKBONES): resnet18, resnet50 (dilated, output stride 8), hrnet_w18_small_v2 (any input
size, as the survey's HRNet: its fuse layers resize bilinearly to the finer branch's size).
Heads: DeepLab-v3 ASPP on a ResNet, the HRNet head on HRNet.

Every model takes backend= for its fused modules ("reference": their plain
PyTorch definitions; "cpu", "cuda", "triton", "auto"); the parameters and
state_dict are the same whichever runs, and set_backend(model, name) switches.
survey_modules=True (the models with soft sharing, distillation or attention)
builds the survey code's plain modules instead; mk.convert(model) then swaps
them for the fused ones with the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.tasks import TASK_OUTPUTS, check_tasks, output_channels
from ._base import DEEP_SUPERVISION, MultiTaskModel, check_backend_name, set_backend
from .backbones import BACKBONES, Backbone, HRNetBackbone, HRNetFuse, ResNetBackbone, build_backbone, check_backbone
from .cross_stitch import CrossStitchNetwork
from .heads import ASPP, DeepLabHead, HighResolutionFuse, HRNetHead, build_head
from .jtrl import JTRL
from .mtan import MTAN
from .mti_net import MTINet
from .multi_task import MultiTaskBaseline
from .nddr_cnn import NDDRCNN
from .padnet import PADNet
from .single_task import SingleTaskBaseline

MODELS: dict[str, type[MultiTaskModel]] = {
    "single_task": SingleTaskBaseline,
    "multi_task": MultiTaskBaseline,
    "cross_stitch": CrossStitchNetwork,
    "nddr_cnn": NDDRCNN,
    "mtan": MTAN,
    "pad_net": PADNet,
    "mti_net": MTINet,
    "jtrl": JTRL,
}


def build(
    name: str,
    tasks,
    backbone: str | None = None,
    *,
    num_classes=None,
    auxiliary_tasks=None,
    backend: str | None = None,
    pretrained: bool = False,
    memory_format: torch.memory_format | str = torch.contiguous_format,
    **kwargs,
) -> nn.Module:
    """Builds model `name` for `tasks`.

    tasks: task names (semseg, human_parts, depth, normals, edge, sal), or a
        dict {task: output channels} for tasks of your own.
    backbone: one of BACKBONES; None: the model's default (see MODELS).
    num_classes: semseg's classes (NYUD-v2 40, PASCAL-Context 21), or a dict
        {task: channels} (human_parts defaults to 7).
    auxiliary_tasks: pad_net and mti_net only: extra tasks predicted for deep
        supervision and distilled from (NYUD: ["normals", "edge"]).
    backend: the fused modules' backend; pretrained: timm weights (download).
    memory_format: torch.channels_last (or "channels_last") stores every convolution's
        weight NHWC, so the whole model runs NHWC (the fused kernels read it in place);
        give the images in it too. torch.contiguous_format ("contiguous"): NCHW.
    kwargs: the model's own options (alpha=, beta=, channels=, head_kwargs=,
        backbone_kwargs=, upsample=, survey_modules=, ...).
    Unknown model, backbone, task or backend names raise a ValueError listing the valid ones.
    """
    check_backend_name(backend)  # before anything is built, with the message the ops give
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models are {list(MODELS)}")
    cls = MODELS[name]
    out_channels = output_channels(tasks, num_classes, module=f"build({name!r})")
    backbone = cls.default_backbone if backbone is None else backbone
    cls.check_backbone(backbone)
    if auxiliary_tasks:
        if not cls.uses_auxiliary_tasks:
            users = [n for n, c in MODELS.items() if c.uses_auxiliary_tasks]
            raise ValueError(f"build({name!r}): this model has no auxiliary tasks (models that do: {users})")
        extra = [a for a in check_tasks(auxiliary_tasks, f"build({name!r})") if a not in out_channels]
        kwargs["auxiliary"] = output_channels(extra, num_classes, module=f"build({name!r})") if extra else {}
    fmt = check_memory_format(memory_format, f"build({name!r})")
    model = cls(out_channels, backbone, backend=backend, pretrained=pretrained, **kwargs)
    return model.to(memory_format=fmt) if fmt is torch.channels_last else model


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def check_memory_format(memory_format, where: str) -> torch.memory_format:
    """torch.contiguous_format / torch.channels_last, or their names; anything else is a ValueError."""
    fmt = MEMORY_FORMATS.get(memory_format, memory_format) if isinstance(memory_format, str) else memory_format
    if fmt not in MEMORY_FORMATS.values():
        raise ValueError(
            f"{where}: memory_format must be torch.contiguous_format or torch.channels_last "
            f"(or one of {list(MEMORY_FORMATS)}), got {memory_format!r}"
        )
    return fmt


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ASPP",
    "BACKBONES",
    "DEEP_SUPERVISION",
    "JTRL",
    "MEMORY_FORMATS",
    "MODELS",
    "MTAN",
    "NDDRCNN",
    "TASK_OUTPUTS",
    "Backbone",
    "CrossStitchNetwork",
    "DeepLabHead",
    "HRNetBackbone",
    "HRNetFuse",
    "HRNetHead",
    "HighResolutionFuse",
    "MTINet",
    "MultiTaskBaseline",
    "MultiTaskModel",
    "PADNet",
    "ResNetBackbone",
    "SingleTaskBaseline",
    "build",
    "build_backbone",
    "build_head",
    "check_backbone",
    "check_backend_name",
    "check_memory_format",
    "num_parameters",
    "output_channels",
    "set_backend",
]
