"""MTAN (Liu et al. 2019), as in the survey's code: a shared ResNet with
per-task attention over the last block of every stage."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import MTANAttention
from ..reference import AttentionLayer
from ._base import SOFT_SHARING_BACKBONES, MultiTaskModel, gated
from .layers import conv_bn_relu


class MTAN(MultiTaskModel):
    """Multi-task attention network on a shared, dilated ResNet.

    For each stage i the shared backbone gives u_b (the input of the stage's
    last block) and u_t (the stage's output). Each task t keeps a = its
    attended features:
        stage 0:  a = mask_t0(u_b) * u_t
        stage i:  a = mask_ti(concat(u_b, a)) * u_t
    and between stages a goes through a refinement block shared by the tasks
    (3x3 conv, BN, ReLU to the next stage's width), then a 2x2 max pool where
    the next stage halves the resolution (with output stride 8: after stage 0
    only). The masks are MTAN's attention layers, channels in -> in // 4 (the
    stage's width // 4) -> the stage's width; each task's a after the last stage
    goes to its DeepLab-v3 head.

    The attention layers are mk.nn.MTANAttention on `backend`, called as
    attention(x, u_t) so that the mask's last BN, its sigmoid and the product
    are one fused pass; survey_modules=True builds the survey's AttentionLayer
    instead (mask alone, times u_t), which mk.convert(model) swaps for fused ones.
    State_dict keys follow the survey: attention_<i>.<task>, refine_<i>.
    """

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
        self.backbone = self.make_backbone(backbone, pretrained, backbone_kwargs)
        ch, red = self.backbone.channels, self.backbone.reductions

        def attention(cin: int, cmid: int, cout: int) -> nn.Module:
            if survey_modules:
                return AttentionLayer(cin, cmid, cout)
            return MTANAttention(cin, cmid, cout, backend=backend)

        for i in range(len(ch)):
            cin = self.backbone.last_block_in_channels(i) + (ch[i] if i else 0)
            layers = nn.ModuleDict({t: attention(cin, max(ch[i] // 4, 1), ch[i]) for t in self.tasks})
            self.add_module(f"attention_{i + 1}", layers)
        for i in range(len(ch) - 1):
            self.add_module(f"refine_{i + 1}", conv_bn_relu(ch[i], ch[i + 1]))
            ratio = red[i + 1] // red[i]
            if ratio not in (1, 2) or red[i + 1] % red[i]:
                raise ValueError(f"MTAN: stage strides {red} must stay or double from stage to stage")
            pool = nn.MaxPool2d(2, 2, ceil_mode=True) if ratio == 2 else nn.Identity()
            self.add_module(f"downsample_{i + 1}", pool)
        self.heads = self.make_heads(self.backbone, head_kwargs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        n = len(self.backbone.channels)
        a = None
        u = x
        for i in range(n):
            u_b = self.backbone.forward_stage_except_last_block(u, i)
            u = self.backbone.forward_stage_last_block(u_b, i)
            attention = getattr(self, f"attention_{i + 1}")
            if a is None:
                a = {t: gated(attention[t], u_b, u) for t in self.tasks}
            else:
                a = {t: gated(attention[t], torch.cat((u_b, a[t]), 1), u) for t in self.tasks}
            if i < n - 1:
                refine, pool = getattr(self, f"refine_{i + 1}"), getattr(self, f"downsample_{i + 1}")
                a = {t: pool(refine(a[t])) for t in self.tasks}
        return self.resize({t: self.heads[t](a[t]) for t in self.tasks}, size)
