"""Nash-MTL: multi-task learning as a bargaining game (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik
and Fetaya, ICML 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._solvers import nash_weights
from .gradient import GradientBalancer


class NashMTL(GradientBalancer):
    """Nash-MTL: the update sum_t alpha_t g_t with G alpha = 1 / alpha, alpha > 0 (the Nash bargaining solution).

    The paper maximises sum_t log(g_t . d) over a ball; its solution is d = sum_t alpha_t g_t with
    (G alpha)_t = 1 / alpha_t, which the official code approaches by a sequence of convex problems
    (CCP, cvxpy on the host). Here the same equation is solved on the device: it is the stationarity
    condition of the strictly convex phi(alpha) = 0.5 alpha^T G alpha - sum_t log alpha_t, minimised by
    `iters` damped Newton steps (see _solvers.nash_weights: positive at every step, quadratic
    convergence at the end; 20 steps reach machine precision on well-conditioned G).

    Scale: alpha solves G alpha = 1 / alpha on the Gram matrix of the true gradients, so it scales as
    ||G||^-1/2 (G = diag(25, 4): alpha = [0.2, 0.5]). The official code is on the same scale, although
    it hands cvxpy G / ||G||_F: its constraints, -log(alpha_t ||G||_F) - log((G / ||G||_F alpha)_t) <= 0,
    multiply the factor back in (alpha_t (G alpha)_t >= 1), and at its fixed point they are tight, i.e.
    G alpha = 1 / alpha on the unnormalised G. (Checked against a transcription of its solver with
    cvxpy and ECOS: [0.2, 0.5] for diag(25, 4), and the same weights to 1e-8 on random 3- and 4-task
    Gram matrices.) Neither scales alpha any further: the update is sum_t alpha_t g_t in both.

    Without a solution (a task with a zero gradient, more tasks than independent gradient directions,
    exactly opposite gradients) the iteration stops after `iters` steps at finite weights, and a
    zero-gradient task gets weight 0. Other differences: the official code starts its convex-concave
    procedure from alpha = 1 (later from the previous step's weights) and keeps the previous weights
    when a subproblem fails (e.g. unbounded when some (G alpha)_t < 0 at the start), whereas here the
    equation is solved from scratch every step. Its extras are left out: the weights are updated every
    step (no update_weights_every), and the gradient norm is not clipped (the official max_norm=1.0;
    use torch.nn.utils.clip_grad_norm_ after backward for that).
    """

    def __init__(self, tasks: Sequence[str], iters: int = 20, scaler: torch.amp.GradScaler | None = None):
        super().__init__(tasks, scaler)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"NashMTL: iters must be an int >= 0, got {iters!r}")
        self.iters = iters

    def solve(self, G: Tensor, losses: Tensor) -> Tensor:
        return nash_weights(G, self.iters)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, iters={self.iters}"
