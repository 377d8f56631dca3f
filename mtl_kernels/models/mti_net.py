"""MTI-Net (Vandenhende et al. 2020), as in the survey's code."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import MultiModalDistillation
from ..reference import MultiTaskDistillationModule
from ._base import DEEP_SUPERVISION, MultiTaskModel
from .heads import HRNetHead
from .layers import BasicBlock, SEBlock, upsample


class ScalePrediction(nn.Module):
    """Initial task predictions at one scale (the survey's InitialTaskPredictionModule).

    Per auxiliary task: the scale's backbone features, concatenated with that
    task's features propagated from the coarser scale (resized to this one),
    go through two basic blocks (-> channels) and a 1x1 conv to the task's
    outputs. forward -> {"features_<task>": features, <task>: prediction}.
    """

    def __init__(self, out_channels: dict[str, int], in_channels: int, channels: int):
        super().__init__()
        self.tasks = list(out_channels)
        self.refinement = nn.ModuleDict(
            {t: nn.Sequential(BasicBlock(in_channels, channels), BasicBlock(channels, channels)) for t in self.tasks}
        )
        self.decoders = nn.ModuleDict({t: nn.Conv2d(channels, c, 1) for t, c in out_channels.items()})

    def forward(self, x: torch.Tensor, previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.tasks:
            xt = x if previous is None else torch.cat((x, upsample(previous[t], x.shape[-2:])), 1)
            out[f"features_{t}"] = self.refinement[t](xt)
            out[t] = self.decoders[t](out[f"features_{t}"])
        return out


class FeaturePropagation(nn.Module):
    """MTI-Net's feature propagation module (FPM) at one scale.

    The N task features (C each) are concatenated (N*C); a non-linear function
    (basic blocks N*C -> N*C/4 -> N*C/4, 1x1 conv back to N*C) gives per-channel
    logits over the tasks, softmax across the N tasks -> a mask that mixes the
    task features; a basic block reduces the mix to C; each task adds its own
    SE-block gated copy of it to its features.
    """

    def __init__(self, tasks: list[str], channels: int):
        super().__init__()
        self.tasks = list(tasks)
        N = len(self.tasks)
        shared = N * channels
        self.non_linear = nn.Sequential(
            BasicBlock(shared, max(shared // 4, 1)),
            BasicBlock(max(shared // 4, 1), max(shared // 4, 1)),
            nn.Conv2d(max(shared // 4, 1), shared, 1),
        )
        self.dimensionality_reduction = BasicBlock(shared, channels)
        self.se = nn.ModuleDict({t: SEBlock(channels) for t in self.tasks})

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        concat = torch.cat([x[f"features_{t}"] for t in self.tasks], 1)
        B, C, H, W = concat.shape
        N = len(self.tasks)
        # the survey's view [B, C/N, N, H, W]: channel c*N + n is slot (c, n)
        mask = torch.softmax(self.non_linear(concat).view(B, C // N, N, H, W), dim=2)
        shared = (mask * concat.view(B, C // N, N, H, W)).view(B, C, H, W)
        shared = self.dimensionality_reduction(shared)
        return {t: self.se[t](shared) + x[f"features_{t}"] for t in self.tasks}


class MTINet(MultiTaskModel):
    """Multi-scale task interaction network on HRNet's four scales.

    From the coarsest scale (3) to the finest (0): initial predictions of every
    auxiliary task from the scale's backbone features (and, below scale 3, the
    coarser scale's FPM output for that task); at scales 3, 2, 1 a feature
    propagation module passes them on. Then at each scale a multi-modal
    distillation (PAD-Net's) of the auxiliary tasks into the main tasks, and
    per main task an HRNet head over the four distilled scales.

    auxiliary: {task: output channels} of the extra auxiliary tasks; the main
    tasks are auxiliary tasks too, first.

    Returns {task: final prediction at the input size} for the main tasks and
    out["deep_supervision"] = {"scale_0": {task: prediction}, ..., "scale_3": ...}
    for every auxiliary task, each at its scale's resolution (the survey's loss
    resizes them to the targets; mk.nn.DenseMultiTaskLoss(upsample=True) does).

    The four distillations are mk.nn.MultiModalDistillation on `backend`;
    survey_modules=True builds the survey's MultiTaskDistillationModule
    instead, which mk.convert(model) swaps for fused ones. Any backbone with
    four scales runs (a ResNet's stages too); the survey's is HRNet.
    """

    default_backbone = "hrnet_w18_small_v2"
    uses_auxiliary_tasks = True

    def __init__(
        self,
        out_channels: dict[str, int],
        backbone: str = "hrnet_w18_small_v2",
        *,
        auxiliary: dict[str, int] | None = None,
        pretrained: bool = False,
        backbone_kwargs: dict | None = None,
        backend: str | None = None,
        upsample: bool = True,
        survey_modules: bool = False,
    ):
        super().__init__(out_channels, backend=backend, upsample=upsample)
        aux_channels = self.with_auxiliary(auxiliary)
        self.backbone = self.make_backbone(backbone, pretrained, backbone_kwargs)
        ch = self.backbone.channels
        n = len(ch)
        for s in range(n):
            cin = ch[s] + (ch[s + 1] if s < n - 1 else 0)
            self.add_module(f"scale_{s}", ScalePrediction(aux_channels, cin, ch[s]))
        for s in range(1, n):
            self.add_module(f"fpm_scale_{s}", FeaturePropagation(self.auxiliary_tasks, ch[s]))
        for s in range(n):
            if survey_modules:
                unit = MultiTaskDistillationModule(self.tasks, self.auxiliary_tasks, ch[s])
            else:
                unit = MultiModalDistillation(
                    self.tasks, self.auxiliary_tasks, ch[s], key_format="features_{}", backend=backend
                )
            self.add_module(f"distillation_scale_{s}", unit)
        self.heads = nn.ModuleDict({t: HRNetHead(ch, c) for t, c in self.out_channels.items()})

    def forward(self, x: torch.Tensor) -> dict:
        size = x.shape[-2:]
        feats = self.backbone(x)
        n = len(feats)
        scales: list[dict] = [None] * n
        propagated = None
        for s in reversed(range(n)):
            scales[s] = getattr(self, f"scale_{s}")(feats[s], propagated)
            if s > 0:
                propagated = getattr(self, f"fpm_scale_{s}")(scales[s])
        distilled = [getattr(self, f"distillation_scale_{s}")(scales[s]) for s in range(n)]
        out = self.resize({t: self.heads[t]([d[t] for d in distilled]) for t in self.tasks}, size)
        out[DEEP_SUPERVISION] = {f"scale_{s}": {a: scales[s][a] for a in self.auxiliary_tasks} for s in range(n)}
        return out
