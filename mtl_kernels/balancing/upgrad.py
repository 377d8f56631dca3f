"""UPGrad: unconflicting projection of gradients (Quinton and Rey 2024, "Jacobian descent for multi-objective
optimization")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._solvers import MAX_EXACT_TASKS, dual_cone_weights
from .gradient import GradientBalancer


class UPGrad(GradientBalancer):
    """UPGrad: the mean of the projections of every task gradient onto the dual cone of all of them.

    The dual cone of the rows of the Jacobian J is {x : g_t . x >= 0 for all t}: directions that
    conflict with no task. Its projection of g_i is J^T v_i with v_i = argmin_{v >= e_i} v^T G v
    (the paper's Proposition; the dual of min ||x - g_i||^2 s.t. J x >= 0), and the update is
    (1/T) sum_i J^T v_i: weights w = mean_i v_i. The update lies in the dual cone, so it does not
    increase any loss to first order, and it equals the mean gradient when no pair of tasks conflicts.

    The T box-constrained QPs are solved exactly on the device by enumerating active sets (one
    batched solve of T * 2^(T-1) small systems: T <= 12), instead of the reference implementation's
    quadprog on the host; no regularisation of G is needed for this solver.
    """

    def __init__(self, tasks: Sequence[str], scaler: torch.amp.GradScaler | None = None):
        super().__init__(tasks, scaler)
        if len(self.tasks) > MAX_EXACT_TASKS:
            raise ValueError(f"UPGrad: at most {MAX_EXACT_TASKS} tasks (its solver enumerates 2^(T-1) active sets)")

    @staticmethod
    def projections(G: Tensor) -> Tensor:
        """V[i] = argmin_{v >= e_i} v^T G v, [T, T]: J^T V[i] is g_i projected onto the dual cone."""
        return dual_cone_weights(G)

    def solve(self, G: Tensor, losses: Tensor) -> Tensor:
        return dual_cone_weights(G).mean(0)
