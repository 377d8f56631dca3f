"""Sigmoid-gated sum in plain PyTorch: the definition of mtl_kernels::gate_sum.

outs[t] = residuals[t] + sum over pairs i with targets[i] == t of
          feats[i] * sigmoid(gates[i] * scale + shift)

It is the memory-bound core of PAD-Net's multi-modal distillation (and
MTI-Net's, per scale): D_t = F_t + sum_{a != t} conv_f[t,a](F_a) *
sigmoid(conv_g[t,a](F_a)), and of MTAN's attention: mask * features with
mask = sigmoid(BN(conv(...))) (scale, shift: that BN as a per-channel affine).
"""

from __future__ import annotations

import torch


def gate_sum(
    residuals: list[torch.Tensor],
    feats: list[torch.Tensor],
    gates: list[torch.Tensor],
    targets: list[int],
    num_outputs: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    outs: list[torch.Tensor | None] = [r for r in residuals] if residuals else [None] * num_outputs
    for f, g, t in zip(feats, gates, targets):
        if scale is not None:
            g = g * scale.view(1, -1, 1, 1)
        if shift is not None:
            g = g + shift.view(1, -1, 1, 1)
        term = f * torch.sigmoid(g)
        outs[t] = term if outs[t] is None else outs[t] + term
    dtype = feats[0].dtype
    return [torch.zeros_like(feats[0]) if o is None else o.to(dtype) for o in outs]
