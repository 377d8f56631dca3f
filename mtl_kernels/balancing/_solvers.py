"""Small solves on the [T, T] Gram matrix of per-task gradients, on its device, without host synchronisation.

Every function here takes G[s, t] = g_s . g_t (T <= 12 tasks) and returns weights as tensors on G's
device: no .item(), no Python branch on a tensor value, fixed iteration counts, and the `_ex` variants
of torch.linalg (torch.linalg.solve checks its error flag on the host; solve_ex does not). Callers pass
float64 (the problems are tiny and often badly conditioned: nearly parallel gradients).

Three exact solvers enumerate active sets, one batched linear solve over all 2^T faces:
- simplex_qp: argmin over the simplex of 0.5 a^T Q a + p^T a (MGDA's min-norm point);
- cagrad_dual: argmin over the simplex of p^T a + phi sqrt(a^T G a) (CAGrad's dual);
- dual_cone_weights: argmin_{v >= e_i} v^T G v for every i (UPGrad's projections onto the dual cone).
Each candidate (the stationary point of one face, from solve_ex) is clamped into the feasible set and
the feasible candidate with the smallest objective wins. The optimum is among the candidates: for
these convex objectives some optimal point lies in the relative interior of a face whose system is
non-singular (moving along a null direction of the face's system keeps the objective and reaches a
smaller face), where it is that face's stationary point. Singular faces give non-finite or useless
candidates, which are dropped or lose the comparison, never a wrong answer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_EXACT_TASKS = 12  # 2^12 faces of 13 x 13 systems: the most the enumerating solvers accept


def _masks(n: int, device: torch.device, empty: bool = False) -> Tensor:
    """All subsets of n items as a bool [2^n (- 1 without the empty set), n] tensor, built on the device."""
    bits = torch.arange(n, device=device)
    codes = torch.arange(0 if empty else 1, 1 << n, device=device)
    return ((codes[:, None] >> bits) & 1).bool()


def _pick(candidates: Tensor, objective: Tensor, valid: Tensor) -> Tensor:
    """candidates[..., argmin objective, :] over the valid ones (dim -2 indexes the candidates)."""
    f = torch.where(valid, objective, math.inf)
    idx = f.argmin(-1, keepdim=True)  # [...,1]
    return candidates.gather(-2, idx[..., None].expand(*idx.shape, candidates.shape[-1])).squeeze(-2)


def _face_systems(Q: Tensor, m: Tensor) -> Tensor:
    """[N, T+1, T+1] bordered KKT matrices [[Q_SS, 1], [1^T, 0]] of the faces m ([N, T] bool), padded
    with identity rows and columns off each face's support S."""
    T = Q.shape[-1]
    mf = m.to(Q.dtype)
    eye = torch.eye(T, dtype=Q.dtype, device=Q.device)
    top = torch.cat([torch.where(m[:, :, None] & m[:, None, :], Q, eye), mf[:, :, None]], dim=2)
    bottom = torch.cat([mf, mf.new_zeros(m.shape[0], 1)], dim=1)[:, None, :]
    return torch.cat([top, bottom], dim=1)


def _into_simplex(sol: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """(candidates clamped to >= 0 on their face and renormalised, [N, T]; which of them are usable, [N])."""
    a = sol.clamp_min(0) * m.to(sol.dtype)
    s = a.sum(-1, keepdim=True)
    valid = torch.isfinite(sol).all(-1) & (s[:, 0] > 0)
    return a / torch.where(s > 0, s, 1.0), valid


def simplex_qp(Q: Tensor, p: Tensor | None = None) -> Tensor:
    """argmin_{a >= 0, sum a = 1} 0.5 a^T Q a + p^T a for a PSD [T, T] Q: exact, by enumerating faces.

    On the face with support S the KKT system is Q_SS a_S + p_S + mu 1 = 0, 1^T a_S = 1 (a = 0 off S):
    2^T - 1 systems of size T + 1 (padded with identity rows), one batched solve_ex.
    """
    T = Q.shape[-1]
    m = _masks(T, Q.device)  # [N, T]
    mf = m.to(Q.dtype)
    lin = torch.where(m, -p, 0.0) if p is not None else mf.new_zeros(m.shape[0], T)
    rhs = torch.cat([lin, mf.new_ones(m.shape[0], 1)], dim=1)
    a, valid = _into_simplex(torch.linalg.solve_ex(_face_systems(Q, m), rhs)[0][:, :T], m)
    f = 0.5 * torch.einsum("ni,ij,nj->n", a, Q, a)
    if p is not None:
        f = f + a @ p
    return _pick(a, f, valid)


def min_norm_frank_wolfe(G: Tensor, iters: int) -> Tensor:
    """Min-norm point of the convex hull of the gradients, argmin_{a in simplex} a^T G a, by Frank-Wolfe.

    As in Sener and Koltun's code (find_min_norm_element_FW): start from the best pair (the closed-form
    two-point solution of every pair, the smallest norm wins; exact for T = 2), then `iters` steps
    towards the vertex e_t with the smallest (G a)_t, each with the closed-form line search
    gamma = argmin || gamma u + (1 - gamma) g_t ||^2 = clamp((g_t.g_t - u.g_t) / ||u - g_t||^2, 0, 1).
    The official code clamps gamma to [0.001, 0.999] in the degenerate cases; here it is the exact
    minimiser in [0, 1]. A fixed iteration count replaces the host-side stopping test.
    """
    T = G.shape[-1]
    d = G.diagonal()
    # Pairs: min over c in [0, 1] of || c g_i + (1 - c) g_j ||^2, c = (G_jj - G_ij) / (G_ii + G_jj - 2 G_ij).
    den = d[:, None] + d[None, :] - 2 * G
    c = torch.where(den > 0, (d[None, :] - G) / torch.where(den > 0, den, 1.0), 1.0).clamp(0, 1)
    cost = c * c * d[:, None] + 2 * c * (1 - c) * G + (1 - c) ** 2 * d[None, :]
    off = ~torch.eye(T, dtype=torch.bool, device=G.device)
    cost = torch.where(off, cost, d[:, None])  # i == j: the vertex itself (the only choice for T = 1)
    best = cost.reshape(-1).argmin()
    i, j = best // T, best % T
    cb = c.reshape(-1).gather(0, best.view(1))
    eye = torch.eye(T, dtype=G.dtype, device=G.device)
    a = (cb * eye.index_select(0, i.view(1)) + (1 - cb) * eye.index_select(0, j.view(1)))[0]
    if T <= 2:
        return a
    for _ in range(iters):
        Ga = G @ a
        t = Ga.argmin().view(1)
        uu = a @ Ga  # ||u||^2
        ut = Ga.gather(0, t)  # u . g_t
        tt = d.gather(0, t)  # ||g_t||^2
        den = uu + tt - 2 * ut
        gamma = torch.where(den > 0, (tt - ut) / torch.where(den > 0, den, 1.0), 1.0).clamp(0, 1)
        a = gamma * a + (1 - gamma) * eye.index_select(0, t)[0]
    return a


def dual_cone_weights(G: Tensor) -> Tensor:
    """V[i] = argmin_{v >= e_i} v^T G v for every task i, [T, T]: exact, by enumerating active sets.

    J^T V[i] is the projection of g_i onto the dual cone {x : g_t . x >= 0 for all t} (Quinton and Rey
    2024, the dual of min ||x - g_i||^2 s.t. J x >= 0). Some optimum has v_i = 1 (dividing an optimum
    by v_i >= 1 keeps it feasible and does not raise v^T G v), so task i's own bound is kept active and
    the free set F runs over the 2^(T-1) subsets of the others: G_FF v_F = -G_Fi, v = e_i off F.
    """
    T = G.shape[-1]
    eye = torch.eye(T, dtype=G.dtype, device=G.device)
    if T == 1:
        return eye
    base = _masks(T - 1, G.device, empty=True)  # [M, T-1], subsets of the other tasks
    j = torch.arange(T, device=G.device)
    src = (j[None, :] - (j[None, :] > j[:, None]).long()).clamp(max=T - 2)  # [i, j] -> column of base
    free = base[:, src].permute(1, 0, 2) & (j[None, None, :] != j[:, None, None])  # [T(i), M, T(j)]
    A = torch.where(free[..., :, None] & free[..., None, :], G, eye)  # [T, M, T, T]
    rhs = torch.where(free, -G.T[:, None, :], eye[:, None, :])  # row i: -G[j, i] on F, e_i elsewhere
    sol = torch.linalg.solve_ex(A, rhs)[0]
    v = torch.maximum(sol, eye[:, None, :])
    valid = torch.isfinite(sol).all(-1)
    f = torch.einsum("imj,jk,imk->im", v, G, v)
    return _pick(v, f, valid)


def nash_weights(G: Tensor, iters: int) -> Tensor:
    """The Nash bargaining weights: alpha > 0 with G alpha = 1 / alpha (Navon et al. 2022).

    G alpha = 1/alpha is the stationarity condition of phi(alpha) = 0.5 alpha^T G alpha - sum log alpha_t,
    strictly convex and self-concordant on alpha > 0 (Hessian G + diag(1/alpha^2)), so damped Newton
    steps alpha += Delta / (1 + lambda) (lambda the Newton decrement; full steps once lambda < 1/4) stay
    positive and converge from any start, quadratically at the end. Solved on G / ||G||_F and rescaled
    (alpha scales as ||G||^-1/2), from alpha_t = 1 / ||g_t||, exact for orthogonal gradients. A task
    with a zero gradient has no solution (its row reads 0 = 1/alpha_t): it is decoupled and given 0.
    """
    T = G.shape[-1]
    d = G.diagonal()
    norm = torch.linalg.matrix_norm(G)
    tiny = torch.finfo(G.dtype).tiny
    active = d > torch.finfo(G.dtype).eps ** 2 * d.max()
    eye = torch.eye(T, dtype=G.dtype, device=G.device)
    Gs = torch.where(active[:, None] & active[None, :], G / norm.clamp_min(tiny), eye)
    alpha = Gs.diagonal().clamp_min(tiny).rsqrt()
    for _ in range(iters):
        grad = Gs @ alpha - 1 / alpha
        H = Gs + torch.diag_embed(alpha.pow(-2))
        delta = -torch.linalg.solve_ex(H, grad)[0]
        lam = (-(grad @ delta)).clamp_min(0).sqrt()
        step = torch.where(lam > 0.25, 1 / (1 + lam), 1.0)
        alpha = (alpha + step * delta).clamp_min(tiny)
    return torch.where(active, alpha, 0.0) / norm.clamp_min(tiny).sqrt()


def cagrad_dual(G: Tensor, c: float) -> Tensor:
    """w = argmin_{w in simplex} g_w . g0 + c ||g0|| ||g_w|| (CAGrad's dual; g_w = sum w_t g_t, g0 the mean).

    Exact, by enumerating faces; with p = G 1 / T (p_t = g_t . g0) and phi = c ||g0|| the objective
    is f(w) = p^T w + phi sqrt(w^T G w). On the affine hull of the face with support S, write
    w = w0 + n (1^T n = 0, n = 0 off S) with two solves of the face's bordered system:
        w0: G_SS w0 + m0 1 = 0,    1^T w0 = 1   (the face's min-norm point: g_w0 . g_n = 0 for all n),
        w1: G_SS w1 + m1 1 = -p_S, 1^T w1 = 0   (so p^T n = -g_w1 . g_n for all n).
    Then f(w0 + n) = p^T w0 - g_w1 . g_n + phi sqrt(A + ||g_n||^2), A = ||g_w0||^2, whose minimiser
    over n is along w1 (Cauchy-Schwarz): n = s w1 with phi s = sqrt(A + s^2 C), C = ||g_w1||^2, i.e.
    s = sqrt(A / (phi^2 - C)). If phi^2 <= C, f has no minimiser on the hull (it decreases along w1 for
    ever), so no optimum lies inside that face; its candidate w0 is kept anyway (a feasible candidate
    never hurts the comparison).
    Vertices (|S| = 1) are their own candidates, which covers phi = 0 (a linear program). One batched
    solve_ex of 2^T - 1 systems with two right-hand sides: the true minimiser, not an iteration.
    """
    T = G.shape[-1]
    b = G.new_full((T,), 1.0 / T)
    p = G @ b  # g_t . g0
    phi = c * (b @ p).clamp_min(0).sqrt()
    m = _masks(T, G.device)
    mf = m.to(G.dtype)
    n = m.shape[0]
    rhs0 = torch.cat([mf.new_zeros(n, T), mf.new_ones(n, 1)], dim=1)
    rhs1 = torch.cat([torch.where(m, -p, 0.0), mf.new_zeros(n, 1)], dim=1)
    sol = torch.linalg.solve_ex(_face_systems(G, m), torch.stack([rhs0, rhs1], dim=-1))[0][:, :T]
    w0, w1 = sol[..., 0] * mf, sol[..., 1] * mf
    A = torch.einsum("ni,ij,nj->n", w0, G, w0).clamp_min(0)
    C = torch.einsum("ni,ij,nj->n", w1, G, w1).clamp_min(0)
    den = phi * phi - C
    s = torch.where(den > 0, (A / torch.where(den > 0, den, 1.0)).sqrt(), 0.0)
    a, valid = _into_simplex(w0 + s[:, None] * w1, m)
    f = a @ p + phi * torch.einsum("ni,ij,nj->n", a, G, a).clamp_min(0).sqrt()
    return _pick(a, f, valid)
