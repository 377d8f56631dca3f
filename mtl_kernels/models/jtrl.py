"""JTRL: joint task-recursive learning (Zhang et al., ECCV 2018), small and simplified.

The survey's code has no JTRL; this is a compact version of the paper's idea,
not a reproduction of its network. Its decoder refines the tasks' states in
turn, each step conditioned on the task just refined, from the coarsest
encoder scale to the finest:

    for each scale s (coarse -> fine), for each task t in order:
        own  = h_t from the previous scale (resized), or the scale's features
        prev = the state of the task refined just before (at the first step:
               the scale's features)
        m    = g * own + (1 - g) * prev,  g = sigmoid(conv1x1([own, prev]))   balance unit
        m    = attention(m) * m                                         task-attentional gate
        h_t  = conv3x3-BN-ReLU([m, skip_s])                             merge with the encoder
    prediction_t = conv1x1(h_t) at the finest scale

With two tasks (semseg, depth) that is the paper's alternation
seg -> depth -> seg -> ... at increasing scales; with more the tasks take
turns in the order given. The encoder's four feature maps are projected to
`channels` by 1x1 conv-BN-ReLU (skip_s). With a dilated ResNet the first three
skips share stride 8, so the scale only grows at the last step; on HRNet it
doubles at every step (strides 32 -> 4).

The attention gate is MTAN's attention layer (mk.nn.MTANAttention on
`backend`, the mask's last BN, sigmoid and product fused); survey_modules=True
uses the plain AttentionLayer, which mk.convert(model) swaps for the fused one.
There are no intermediate predictions (the paper supervises only the last).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import MTANAttention
from ..reference import AttentionLayer
from ._base import MultiTaskModel, gated
from .layers import conv_bn_relu, upsample


class TaskStep(nn.Module):
    """One refinement step of one task: balance unit, attention gate, merge with the skip."""

    def __init__(self, channels: int, *, survey_modules: bool, backend: str | None):
        super().__init__()
        self.balance = nn.Conv2d(2 * channels, channels, 1)
        mid = max(channels // 4, 1)
        if survey_modules:
            self.attention = AttentionLayer(channels, mid, channels)
        else:
            self.attention = MTANAttention(channels, mid, channels, backend=backend)
        self.merge = conv_bn_relu(2 * channels, channels)

    def forward(self, own: torch.Tensor, prev: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.balance(torch.cat((own, prev), 1)))
        m = prev + g * (own - prev)
        return self.merge(torch.cat((gated(self.attention, m, m), skip), 1))


class JTRL(MultiTaskModel):
    """Joint task-recursive learning (see the module docstring). channels: decoder width (64)."""

    def __init__(
        self,
        out_channels: dict[str, int],
        backbone: str = "resnet18",
        *,
        channels: int = 64,
        pretrained: bool = False,
        backbone_kwargs: dict | None = None,
        backend: str | None = None,
        upsample: bool = True,
        survey_modules: bool = False,
    ):
        super().__init__(out_channels, backend=backend, upsample=upsample)
        self.backbone = self.make_backbone(backbone, pretrained, backbone_kwargs)
        n = len(self.backbone.channels)
        self.skips = nn.ModuleList([conv_bn_relu(c, channels, 1) for c in self.backbone.channels])
        self.steps = nn.ModuleList(
            [
                nn.ModuleDict(
                    {t: TaskStep(channels, survey_modules=survey_modules, backend=backend) for t in self.tasks}
                )
                for _ in range(n)
            ]
        )
        self.heads = nn.ModuleDict({t: nn.Conv2d(channels, c, 1) for t, c in self.out_channels.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        h: dict[str, torch.Tensor] = {}
        last = None  # the state refined most recently
        for s in reversed(range(len(feats))):  # coarse -> fine
            skip = self.skips[s](feats[s])
            hw = skip.shape[-2:]
            step = self.steps[len(feats) - 1 - s]
            for t in self.tasks:
                own = upsample(h[t], hw) if t in h else skip
                prev = upsample(last, hw) if last is not None else skip
                h[t] = last = step[t](own, prev, skip)
        return self.resize({t: self.heads[t](h[t]) for t in self.tasks}, size)
