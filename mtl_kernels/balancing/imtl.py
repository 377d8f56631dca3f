"""Impartial multi-task learning, gradient part IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, ICLR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from .gradient import GradientBalancer


class IMTLG(GradientBalancer):
    """IMTL-G: the combination g = sum_t alpha_t g_t (sum alpha = 1) with equal projections on every u_t.

    u_t = g_t / ||g_t||; g . u_1 = g . u_t for all t gives, with D = [g_1 - g_t] and U = [u_1 - u_t]
    (rows t = 2..T), alpha_{2:T} = g_1 U^T (D U^T)^{-1} and alpha_1 = 1 - sum alpha_{2:T}.
    Through G: with Gu[a, b] = g_a . u_b = G[a, b] / ||g_b||,
        (g_1 U^T)_t = Gu[1, 1] - Gu[1, t],
        (D U^T)[s, t] = Gu[1, 1] - Gu[1, t] - Gu[s, 1] + Gu[s, t],
    and the (T-1) x (T-1) system alpha^T (D U^T) = g_1 U^T is solved with torch.linalg.solve_ex on
    the device (no error check on the host). If it is singular (e.g. a task with a zero gradient, or
    two parallel ones), the weights fall back to 1/T each; that choice is made on the device too.
    IMTL's loss part (IMTL-L, learned loss scales) is not included: combine it with a loss-level method.
    """

    def solve(self, G: Tensor, losses: Tensor) -> Tensor:
        T = G.shape[0]
        if T == 1:
            return torch.ones(1, dtype=G.dtype, device=G.device)
        norms = G.diagonal().clamp_min(0).sqrt().clamp_min(torch.finfo(G.dtype).tiny)
        Gu = G / norms[None, :]
        x = Gu[0, 0] - Gu[0, 1:]  # g_1 U^T, [T-1]
        M = Gu[0, 0] - Gu[0, 1:][None, :] - Gu[1:, 0][:, None] + Gu[1:, 1:]  # D U^T
        rest = torch.linalg.solve_ex(M.T, x)[0]
        alpha = torch.cat([1 - rest.sum().view(1), rest])
        ok = torch.isfinite(alpha).all()
        return torch.where(ok, alpha, torch.full_like(alpha, 1.0 / T))
