"""PAD-Net (Xu et al. 2018), as in the survey's code."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import MultiModalDistillation
from ..reference import MultiTaskDistillationModule
from ._base import DEEP_SUPERVISION, MultiTaskModel
from .heads import HighResolutionFuse
from .layers import Bottleneck


class InitialTaskPrediction(nn.Module):
    """Per auxiliary task: two bottlenecks (-> channels; the first with a 1x1 conv + BN shortcut
    when in_channels differs, the survey's downsample), then a 1x1 conv to the task's outputs.

    forward(x) -> {"features_<task>": features, <task>: initial prediction}, the survey's dict.
    """

    def __init__(self, out_channels: dict[str, int], in_channels: int, channels: int = 256):
        super().__init__()
        self.tasks = list(out_channels)
        self.layers = nn.ModuleDict(
            {t: nn.Sequential(Bottleneck(in_channels, channels), Bottleneck(channels, channels)) for t in self.tasks}
        )
        self.conv_out = nn.ModuleDict({t: nn.Conv2d(channels, c, 1) for t, c in out_channels.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.tasks:
            out[f"features_{t}"] = self.layers[t](x)
            out[t] = self.conv_out[t](out[f"features_{t}"])
        return out


class PADNet(MultiTaskModel):
    """Prediction-and-distillation network.

    backbone -> one feature map (HRNet: its scales fused by HighResolutionFuse,
    which keeps all 270 channels, as the survey; ResNet: the last stage) ->
    initial predictions of every auxiliary task (two bottlenecks + 1x1 conv
    each; the first reduces the feature map to `channels` through a 1x1 conv +
    BN shortcut, as the survey's) -> multi-modal distillation of the auxiliary
    tasks' features into the main tasks' -> final heads (two bottlenecks +
    1x1 conv) per main task.

    auxiliary: {task: output channels} of the extra auxiliary tasks (NYUD:
    normals, edge); the main tasks are auxiliary tasks too, first.
    channels: the width of the initial and final heads and of the
    distillation (256 in the survey).

    Returns {task: final prediction at the input size} for the main tasks and
    out["deep_supervision"] = {"initial": {task: initial prediction}} for every
    auxiliary task, at the backbone feature resolution (the survey's loss
    resizes them to the targets; mk.nn.DenseMultiTaskLoss(upsample=True) does).

    The distillation is mk.nn.MultiModalDistillation on `backend`;
    survey_modules=True builds the survey's MultiTaskDistillationModule
    instead, which mk.convert(model) swaps for the fused one.
    """

    default_backbone = "hrnet_w18_small_v2"
    uses_auxiliary_tasks = True

    def __init__(
        self,
        out_channels: dict[str, int],
        backbone: str = "hrnet_w18_small_v2",
        *,
        auxiliary: dict[str, int] | None = None,
        channels: int = 256,
        pretrained: bool = False,
        backbone_kwargs: dict | None = None,
        backend: str | None = None,
        upsample: bool = True,
        survey_modules: bool = False,
    ):
        super().__init__(out_channels, backend=backend, upsample=upsample)
        aux_channels = self.with_auxiliary(auxiliary)
        self.backbone = self.make_backbone(backbone, pretrained, backbone_kwargs)
        if self.backbone.kind == "hrnet":
            self.fuse = HighResolutionFuse(self.backbone.channels)
            in_channels = self.fuse.out_channels
        else:
            self.fuse = None
            in_channels = self.backbone.channels[-1]
        self.initial_task_prediction_heads = InitialTaskPrediction(aux_channels, in_channels, channels)
        if survey_modules:
            self.multi_modal_distillation = MultiTaskDistillationModule(self.tasks, self.auxiliary_tasks, channels)
        else:
            self.multi_modal_distillation = MultiModalDistillation(
                self.tasks, self.auxiliary_tasks, channels, key_format="features_{}", backend=backend
            )
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(
                    Bottleneck(channels, channels), Bottleneck(channels, channels), nn.Conv2d(channels, c, 1)
                )
                for t, c in self.out_channels.items()
            }
        )

    def forward(self, x: torch.Tensor) -> dict:
        size = x.shape[-2:]
        feats = self.backbone(x)
        shared = self.fuse(feats) if self.fuse is not None else feats[-1]
        initial = self.initial_task_prediction_heads(shared)
        distilled = self.multi_modal_distillation(initial)
        out = self.resize({t: self.heads[t](distilled[t]) for t in self.tasks}, size)
        out[DEEP_SUPERVISION] = {"initial": {a: initial[a] for a in self.auxiliary_tasks}}
        return out
