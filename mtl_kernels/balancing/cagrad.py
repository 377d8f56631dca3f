"""Conflict-averse gradient descent, CAGrad (Liu, Liu, Jin, Stone and Liu, NeurIPS 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._solvers import MAX_EXACT_TASKS, cagrad_dual
from .gradient import GradientBalancer


class CAGrad(GradientBalancer):
    """CAGrad: the update maximising the worst task's improvement within a ball around the mean gradient.

    Primal: max_d min_t g_t . d subject to ||d - g0|| <= c ||g0||, g0 = mean_t g_t. Its dual is
    w = argmin_{w in simplex} g_w . g0 + c ||g0|| ||g_w|| (g_w = sum_t w_t g_t), and the update is
    d = g0 + (c ||g0|| / ||g_w||) g_w, i.e. weights 1/T + (c ||g0|| / ||g_w||) w_t on the task gradients.
    All of it reads G only: ||g0||^2 = mean(G), g_w . g0 = w^T G 1 / T, ||g_w||^2 = w^T G w.

    The dual is solved exactly on the device: its stationary point on every face of the simplex has a
    closed form (two linear solves per face, see _solvers.cagrad_dual), and one batched solve over the
    2^T - 1 faces (T <= 12) gives every candidate; the best feasible one is the minimiser, however badly
    conditioned G is, with no iteration count to tune. The official code calls scipy's SLSQP on the host.

    rescale, as in the official code (its NYUv2 default, 1): 0 keeps d; 1 divides it by 1 + c^2;
    2 divides it by 1 + c. c = 0.4 is the paper's NYUv2 setting. When the gradients cancel
    (||g_w|| ~ 0, below 1e-6 of the largest gradient norm: 0 is in their convex hull) the update is g0
    (times the rescaling), since the direction g_w / ||g_w|| is then undefined.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        c: float = 0.4,
        rescale: int = 1,
        scaler: torch.amp.GradScaler | None = None,
    ):
        super().__init__(tasks, scaler)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"CAGrad: c must be a finite number >= 0, got {c!r}")
        if rescale not in (0, 1, 2) or isinstance(rescale, bool):
            raise ValueError(f"CAGrad: rescale must be 0, 1 or 2, got {rescale!r}")
        if len(self.tasks) > MAX_EXACT_TASKS:
            raise ValueError(f"CAGrad: at most {MAX_EXACT_TASKS} tasks (its solver enumerates 2^T faces)")
        self.c = float(c)
        self.rescale = rescale

    def solve(self, G: Tensor, losses: Tensor) -> Tensor:
        T = G.shape[0]
        w = cagrad_dual(G, self.c)
        g0 = G.mean().clamp_min(0).sqrt()
        gw = (w @ G @ w).clamp_min(0).sqrt()
        floor = 1e-6 * G.diagonal().max().clamp_min(0).sqrt()
        lam = torch.where(gw > floor, self.c * g0 / torch.where(gw > floor, gw, 1.0), 0.0)
        coef = 1.0 / T + lam * w
        if self.rescale == 1:
            coef = coef / (1 + self.c**2)
        elif self.rescale == 2:
            coef = coef / (1 + self.c)
        return coef

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, c={self.c:g}, rescale={self.rescale}"
