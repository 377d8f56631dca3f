"""Projecting conflicting gradients, PCGrad (Yu, Kumar, Gupta, Levine, Hausman and Finn, NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import as_rank0_drew
from .gradient import GradientBalancer


class PCGrad(GradientBalancer):
    """PCGrad: remove from each task gradient its components that conflict with the others, sum the rest.

    Paper, Algorithm 1: for every task i, g_i' = g_i, then for each other task j in random order,
    if g_i' . g_j < 0: g_i' -= (g_i' . g_j) / ||g_j||^2 g_j (against the original g_j); the update is
    sum_i g_i' (the paper's sum, not a mean).

    Only G is needed: every g_i' stays a combination of the original gradients, g_i' = sum_k C[i, k] g_k,
    so g_i' . g_j = (C G)[i, j] and a projection subtracts coef from C[i, j]. The T sequences run side
    by side (step k projects every g_i' on its k-th task: T - 1 steps of a few [T, T] ops) and the
    update is one combination with weights w_k = sum_i C[i, k]; those are the reported weights.

    Order: every step draws keys = torch.rand(T, T) (with `generator`, on its device, or the default
    generator of the gradients' device), sets the diagonal to 2 and sorts each row: row i's first T - 1
    entries are task i's order over the others (kept in `last_order` for inspection). A CPU generator
    with CUDA gradients costs one small non-blocking host-to-device copy; a generator on the gradients'
    device costs nothing. Under torch.distributed every rank uses rank 0's keys, whatever its own seed.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        generator: torch.Generator | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ):
        super().__init__(tasks, scaler)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"PCGrad: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.last_order: Tensor | None = None

    def draw_order(self, T: int, device: torch.device) -> Tensor:
        """[T, T - 1]: row i is the order in which task i's gradient is projected on the others."""
        g = self.generator
        if g is None or g.device == device:
            keys = torch.rand(T, T, generator=g, device=device)
        else:
            keys = torch.rand(T, T, generator=g, device=g.device).to(device, non_blocking=True)
        keys = as_rank0_drew(keys).masked_fill(torch.eye(T, dtype=torch.bool, device=device), 2.0)
        return keys.argsort(dim=1)[:, : T - 1]

    def solve(self, G: Tensor, losses: Tensor) -> Tensor:
        T = G.shape[0]
        order = self.draw_order(T, G.device)
        self.last_order = order
        C = torch.eye(T, dtype=G.dtype, device=G.device)
        sq = G.diagonal()
        tiny = torch.finfo(G.dtype).tiny
        for k in range(T - 1):
            j = order[:, k : k + 1]  # [T, 1]: the task each g_i' is projected on at this step
            dot = (C @ G).gather(1, j)  # g_i' . g_j
            gjj = sq.gather(0, j[:, 0])[:, None]
            # dot < 0 implies ||g_j|| > 0; the where keeps a 0/0 out of the untouched rows.
            coef = torch.where(gjj > 0, dot.clamp(max=0) / gjj.clamp_min(tiny), 0.0)
            C = C.scatter_add(1, j, -coef)
        return C.sum(0)
