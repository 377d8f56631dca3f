"""Gradient-level task balancing (mtl_kernels.balancing) against independent computations.

The references below work on flattened float64 gradient vectors with numpy (fine in tests): grid
searches over the simplex, direct loops, closed forms written from the papers and SciPy's SLSQP (CAGrad's
official solver), not the package's [T, T] solvers. The models are tiny float64 MLPs: a shared trunk and
one head per task.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import mtl_kernels as mk
from mtl_kernels import balancing as B

HAS_CUDA = torch.cuda.is_available()
DT = torch.float64
ALL_TASKS = ["semseg", "depth", "normals", "edge"]


# ----------------------------------------------------------------------------- model and references


class Net(nn.Module):
    """Shared trunk (two tanh layers) and a two-layer head per task; squared-error losses."""

    def __init__(self, tasks, dtype=DT, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tasks = tasks
        self.trunk = nn.Sequential(nn.Linear(6, 10, dtype=dtype), nn.Tanh(), nn.Linear(10, 8, dtype=dtype), nn.Tanh())
        self.heads = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(8, 5, dtype=dtype), nn.Tanh(), nn.Linear(5, 1, dtype=dtype)) for t in tasks}
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.7)

    def losses(self, x, y, z=None):
        z = self.trunk(x) if z is None else z
        return {t: ((self.heads[t](z)[:, 0] - y[:, i]) ** 2).mean() for i, t in enumerate(self.tasks)}, z


def make_batch(T, n=12, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    # Targets at different scales, so the tasks' gradients differ in size and direction.
    y = torch.randn(n, T, generator=g, dtype=dtype) * torch.tensor([1.0, 3.0, 0.5, 2.0][:T], dtype=dtype)
    return x, y


def setup(T, seed=0, dtype=DT):
    tasks = ALL_TASKS[:T]
    net = Net(tasks, dtype=dtype, seed=seed)
    x, y = make_batch(T, dtype=dtype)
    return tasks, net, x, y


def flat(grads, like):
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, like)])


def jacobian(net, x, y, mode):
    """[T, P] float64 numpy: each task's gradient of the trunk parameters ("params") or of z ("repr")."""
    losses, z = net.losses(x, y)
    wrt = list(net.trunk.parameters()) if mode == "params" else [z]
    rows = [flat(torch.autograd.grad(losses[t], wrt, retain_graph=True, allow_unused=True), wrt) for t in net.tasks]
    vals = np.array([losses[t].item() for t in net.tasks])
    return torch.stack(rows).detach().numpy().astype(np.float64), vals


def run(bal, net, x, y, mode, **kw):
    net.zero_grad(set_to_none=True)
    losses, z = net.losses(x, y)
    if mode == "params":
        w = bal.backward(losses, shared_params=net.trunk.parameters(), **kw)
    else:
        w = bal.backward(losses, shared_repr=z, **kw)
    assert list(w) == net.tasks
    for v in w.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
    return np.array([w[t].item() for t in net.tasks])


def trunk_grad(net):
    return flat([p.grad for p in net.trunk.parameters()], list(net.trunk.parameters())).numpy()


def expected_trunk_grad(net, x, y, w):
    """d(sum_t w_t L_t)/d trunk parameters, by plain autograd."""
    losses, _ = net.losses(x, y)
    total = sum(float(w[i]) * losses[t] for i, t in enumerate(net.tasks))
    params = list(net.trunk.parameters())
    return flat(torch.autograd.grad(total, params), params).numpy()


def check_heads(net, x, y):
    """Each head's .grad is the gradient of its own task's loss."""
    losses, _ = net.losses(x, y)
    for t in net.tasks:
        params = list(net.heads[t].parameters())
        want = torch.autograd.grad(losses[t], params)
        for p, g in zip(params, want):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def simplex_grid_argmin(f, T, n=200, rounds=3):
    """argmin of f over the simplex (T = 2, 3): a grid of step 1/n, then finer grids around the best point."""
    assert T in (2, 3)
    center, half, step = None, None, 1.0 / n
    for _ in range(rounds):
        if center is None:
            axes = [np.arange(0, 1 + step / 2, step)] * (T - 1)
        else:
            axes = [np.clip(np.arange(c - half, c + half + step / 2, step), 0, 1) for c in center[: T - 1]]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, T - 1)
        pts = np.concatenate([pts, 1 - pts.sum(1, keepdims=True)], 1)
        pts = pts[pts[:, -1] >= -1e-15]
        pts[:, -1] = np.clip(pts[:, -1], 0, 1)
        center = pts[np.argmin(f(pts))]
        half, step = 2 * step, step / 50
    return center


# ----------------------------------------------------------------------------- per-method references


def ref_min_norm(J):
    G = J @ J.T
    T = J.shape[0]
    if T == 2:  # closed form: min_c ||c g1 + (1 - c) g2||
        c = np.clip((G[1, 1] - G[0, 1]) / (G[0, 0] + G[1, 1] - 2 * G[0, 1]), 0, 1)
        return np.array([c, 1 - c])
    return simplex_grid_argmin(lambda a: np.einsum("ni,ij,nj->n", a, G, a), T)


def ref_mgda(J, losses, normalization, normalize_update=False):
    norms = np.linalg.norm(J, axis=1)
    c = {"none": np.ones_like(norms), "l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    alpha = ref_min_norm(J / c[:, None])
    return alpha / c if normalize_update else alpha


def ref_pcgrad(J, order):
    T = J.shape[0]
    projected = []
    for i in range(T):
        gi = J[i].copy()
        for j in order[i]:
            dot = gi @ J[j]
            if dot < 0:
                gi -= dot / (J[j] @ J[j]) * J[j]
        projected.append(gi)
    return np.sum(projected, 0)  # the update vector


def ref_cagrad(J, c, rescale=1):
    T = J.shape[0]
    g0 = J.mean(0)
    G = J @ J.T
    b = np.full(T, 1 / T)
    phi = c * np.linalg.norm(g0)

    def dual(W):
        return W @ G @ b + phi * np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", W, G, W), 0))

    w = simplex_grid_argmin(dual, T)
    gw = w @ J
    d = g0 + phi / np.linalg.norm(gw) * gw
    return d / {0: 1, 1: 1 + c**2, 2: 1 + c}[rescale]


def ref_imtlg(J):
    U = J / np.linalg.norm(J, axis=1, keepdims=True)
    D = J[0] - J[1:]
    Ud = U[0] - U[1:]
    rest = J[0] @ Ud.T @ np.linalg.inv(D @ Ud.T)
    return np.concatenate([[1 - rest.sum()], rest])


def ref_aligned(J, scale="min"):
    G = J @ J.T
    lam, V = np.linalg.eigh(G)
    keep = lam > lam.max() * len(lam) * np.finfo(np.float32).eps
    lam_k, V_k = lam[keep], V[:, keep]
    s = {"min": lam_k.min(), "median": np.sort(lam_k)[(len(lam_k) - 1) // 2], "rmse": lam_k.mean()}[scale]
    Bm = np.sqrt(s) * V_k @ np.diag(lam_k**-0.5) @ V_k.T
    return Bm @ np.ones(len(lam)), Bm


def ref_upgrad_t2(J):
    """T = 2: the projection of g_i onto {x : g_j . x >= 0} (a half-space; it stays in the other one)."""
    out = []
    for i, j in ((0, 1), (1, 0)):
        gi, gj = J[i], J[j]
        dot = gi @ gj
        out.append(gi if dot >= 0 else gi - dot / (gj @ gj) * gj)
    return np.mean(out, 0)


def ref_upgrad_pgd(J, iters=20000):
    """Projected gradient on min_{v >= e_i} v^T G v, many plain iterations (numpy)."""
    G = J @ J.T
    T = len(G)
    step = 1 / np.linalg.eigvalsh(G).max()
    V = np.eye(T)
    for _ in range(iters):
        V = np.maximum(V - step * V @ G, np.eye(T))
    return V


def check_dual_cone_kkt(V, G, tol):
    """v_i >= e_i, (G v_i)_j >= 0, and (G v_i)_j (v_ij - delta_ij) = 0: the optimality of each projection."""
    T = len(G)
    scale = np.abs(G).max()
    GV = V @ G
    assert (V >= np.eye(T) - tol).all()
    assert (GV >= -tol * scale).all()
    assert np.abs(GV * (V - np.eye(T))).max() <= tol * scale * max(1, np.abs(V).max())


METHODS = {
    "mgda": lambda tasks: B.MGDA(tasks, normalization="none"),
    "mgda_loss+": lambda tasks: B.MGDA(tasks),
    "mgda_fw": lambda tasks: B.MGDA(tasks, normalization="l2", solver="frank_wolfe", iters=400),
    "pcgrad": lambda tasks: B.PCGrad(tasks, generator=torch.Generator().manual_seed(3)),
    "cagrad": lambda tasks: B.CAGrad(tasks),
    "imtlg": lambda tasks: B.IMTLG(tasks),
    "nash": lambda tasks: B.NashMTL(tasks),
    "aligned": lambda tasks: B.AlignedMTL(tasks),
    "upgrad": lambda tasks: B.UPGrad(tasks),
}


# ----------------------------------------------------------------------------- weights against references


@pytest.mark.parametrize("mode", ["params", "repr"])
@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_weights_are_the_min_norm_point(T, mode, normalization):
    tasks, net, x, y = setup(T)
    J, L = jacobian(net, x, y, mode)
    for solver in ("exact", "frank_wolfe"):
        w = run(B.MGDA(tasks, normalization=normalization, solver=solver), net, x, y, mode)
        tol = 2e-4 if solver == "exact" else 3e-3  # the grid's step; Frank-Wolfe converges sublinearly
        np.testing.assert_allclose(w, ref_mgda(J, L, normalization), atol=tol)
        assert abs(w.sum() - 1) < 1e-12
    w = run(B.MGDA(tasks, normalization=normalization, normalize_update=True), net, x, y, mode)
    np.testing.assert_allclose(w, ref_mgda(J, L, normalization, normalize_update=True), rtol=1e-3)


@pytest.mark.parametrize("solver", ["exact", "frank_wolfe"])
def test_mgda_kkt_four_tasks(solver):
    """T = 4 (no grid): alpha >= 0, sum 1, (G alpha)_t >= alpha^T G alpha with equality on the support."""
    tasks, net, x, y = setup(4)
    J, _ = jacobian(net, x, y, "params")
    G = J @ J.T
    a = run(B.MGDA(tasks, normalization="none", solver=solver, iters=2000), net, x, y, "params")
    assert (a >= 0).all() and abs(a.sum() - 1) < 1e-12
    Ga, obj = G @ a, a @ G @ a
    tol = 1e-10 if solver == "exact" else 2e-3
    assert (Ga >= obj - tol * G.max()).all()
    assert np.abs((Ga - obj)[a > 1e-6]).max() <= tol * G.max()


@pytest.mark.parametrize("mode", ["params", "repr"])
@pytest.mark.parametrize("T", [2, 3, 4])
def test_pcgrad_matches_the_direct_loop(T, mode):
    tasks, net, x, y = setup(T)
    J, _ = jacobian(net, x, y, mode)
    bal = B.PCGrad(tasks, generator=torch.Generator().manual_seed(7))
    for _ in range(3):  # new random orders every step
        w = run(bal, net, x, y, mode)
        order = bal.last_order.tolist()
        assert all(sorted(row) == sorted(set(range(T)) - {i}) for i, row in enumerate(order))
        np.testing.assert_allclose(w @ J, ref_pcgrad(J, order), rtol=1e-10, atol=1e-12)


def test_pcgrad_without_conflict_is_the_sum():
    G = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 3.0]], dtype=DT)
    w = B.PCGrad(ALL_TASKS[:3]).solve(G, torch.ones(3, dtype=DT))
    torch.testing.assert_close(w, torch.ones(3, dtype=DT))


@pytest.mark.parametrize("mode", ["params", "repr"])
@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_cagrad_update_matches_the_dual_solved_on_a_grid(T, mode, rescale):
    tasks, net, x, y = setup(T)
    J, _ = jacobian(net, x, y, mode)
    w = run(B.CAGrad(tasks, c=0.4, rescale=rescale), net, x, y, mode)
    d, ref = w @ J, ref_cagrad(J, 0.4, rescale)
    assert np.linalg.norm(d - ref) <= 1e-4 * np.linalg.norm(ref)


def test_cagrad_with_c_zero_is_the_mean_gradient():
    tasks, net, x, y = setup(3)
    w = run(B.CAGrad(tasks, c=0.0), net, x, y, "params")
    np.testing.assert_allclose(w, np.full(3, 1 / 3), rtol=1e-12)


def cagrad_dual_upper_bound(G, c, rng):
    """An upper bound on min_{w in simplex} g_w . g0 + c ||g0|| ||g_w||: the best of SLSQP (the official
    code's solver) from several starts, each answer clipped and renormalised onto the simplex, so that the
    value is the dual objective at a feasible point. Solved on G / max |G| for SLSQP's tolerances."""
    from scipy.optimize import minimize

    T = len(G)
    s = np.abs(G).max()
    Gs = G / s
    b = np.full(T, 1 / T)
    phi = c * math.sqrt(max(b @ Gs @ b, 0))

    def f(w):
        return w @ Gs @ b + phi * math.sqrt(max(w @ Gs @ w, 0))

    starts = [b, *(0.8 * np.eye(T)[i] + 0.2 / T for i in range(T)), *rng.dirichlet(np.ones(T), 4)]
    best = math.inf
    for x0 in starts:
        r = minimize(
            f,
            x0,
            method="SLSQP",
            bounds=[(0, 1)] * T,
            constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        x = np.clip(r.x, 0, None)
        best = min(best, f(x / x.sum()))
    return best * s


def cagrad_hard_grams():
    """The audit's 3-task Gram matrix (30 majorise-minimise steps stopped at 0.38 of the optimum's worst-task
    improvement) and random ill-conditioned ones: nearly opposite, nearly parallel, rank-deficient, and norms
    three orders of magnitude apart."""
    yield np.array([[80.7164, -73.5511, 89.8329], [-73.5511, 67.1837, -74.6565], [89.8329, -74.6565, 676.6221]])
    rng = np.random.default_rng(0)
    for k in range(8):
        T = 3 + k % 3
        X = rng.standard_normal((T, 8)) * 10 ** rng.uniform(-1.5, 1.5, size=(T, 1))
        if k % 4 == 0:
            X[1] = -0.9 * X[0] + 0.05 * X[1]
        elif k % 4 == 1:
            X[1] = 1.3 * X[0] + 1e-4 * X[1]
        elif k % 4 == 2:
            X = rng.standard_normal((T, 2)) @ rng.standard_normal((2, 8))
        yield X @ X.T


@pytest.mark.parametrize("c", [0.4, 1.0])
def test_cagrad_reaches_the_optimum(c):
    """CAGrad's primal max_d min_t g_t . d over ||d - g0|| <= c ||g0|| equals its dual's minimum (strong
    duality). The update d = (1 + c^2) sum_t w_t g_t of the default CAGrad is primal feasible, so
    min_t g_t . d <= optimum <= the dual objective at any feasible w, e.g. SLSQP's: d is within 1e-4 of the
    optimum once min_t g_t . d reaches that upper bound within 1e-4."""
    rng = np.random.default_rng(1)
    for G in cagrad_hard_grams():
        T = len(G)
        coef = B.CAGrad([f"t{i}" for i in range(T)], c=c).solve(torch.from_numpy(G), torch.ones(T, dtype=DT))
        coef = coef.numpy() * (1 + c**2)  # undo the default rescale=1
        b = np.full(T, 1 / T)
        radius2 = c**2 * (b @ G @ b)
        assert (coef - b) @ G @ (coef - b) <= radius2 * (1 + 1e-9) + 1e-15 * np.abs(G).max()  # d in the ball
        primal = (G @ coef).min()
        upper = cagrad_dual_upper_bound(G, c, rng)
        assert primal <= upper + 1e-9 * np.abs(G).max()  # weak duality: a check on the check
        assert primal >= upper - 1e-4 * abs(upper) - 1e-12 * np.abs(G).max(), (G, primal, upper)  # optimum 0: rounding


def test_cagrad_on_the_audit_gram():
    """The audit's matrix: the converged dual is w = [0.4244, 0.5756, 0] (SLSQP agrees), weights
    [1.685, 2.183, 0.287] with rescale=1 and min_t g_t . d = 1.268; 30 MM steps gave 0.482."""
    G = torch.tensor(next(cagrad_hard_grams()), dtype=DT)
    w = B.CAGrad(list("abc")).solve(G, torch.ones(3, dtype=DT))
    np.testing.assert_allclose(w.numpy(), [1.6849, 2.1827, 0.2874], atol=1e-4)
    assert float((G @ w).min()) == pytest.approx(1.2676, abs=1e-4)


@pytest.mark.parametrize("mode", ["params", "repr"])
@pytest.mark.parametrize("T", [2, 3, 4])
def test_imtlg_is_the_closed_form(T, mode):
    tasks, net, x, y = setup(T)
    J, _ = jacobian(net, x, y, mode)
    w = run(B.IMTLG(tasks), net, x, y, mode)
    np.testing.assert_allclose(w, ref_imtlg(J), rtol=1e-8)
    # The defining property: equal projections of the update on every unit gradient.
    d = w @ J
    proj = J @ d / np.linalg.norm(J, axis=1)
    np.testing.assert_allclose(proj, proj[0], rtol=1e-8)


@pytest.mark.parametrize("mode", ["params", "repr"])
@pytest.mark.parametrize("T", [2, 3, 4])
def test_nash_solves_the_bargaining_equation(T, mode):
    tasks, net, x, y = setup(T)
    J, _ = jacobian(net, x, y, mode)
    a = run(B.NashMTL(tasks), net, x, y, mode)
    assert (a > 0).all()
    np.testing.assert_allclose((J @ J.T) @ a, 1 / a, rtol=1e-8)


@pytest.mark.parametrize("T", [2, 3, 5, 8, 10])
def test_nash_on_random_well_conditioned_gram(T):
    g = torch.Generator().manual_seed(T)
    for scale in (1e-6, 1.0, 1e4):
        X = torch.randn(T, 40, generator=g, dtype=DT) * scale
        G = X @ X.T
        a = B.NashMTL(ALL_TASKS[:1] + [f"t{i}" for i in range(1, T)]).solve(G, torch.ones(T, dtype=DT))
        assert (a > 0).all()
        torch.testing.assert_close(G @ a, 1 / a, rtol=1e-9, atol=0)


@pytest.mark.parametrize("mode", ["params", "repr"])
@pytest.mark.parametrize("T", [2, 3, 4])
@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_aligned_balances_the_gradient_system(T, mode, scale):
    tasks, net, x, y = setup(T)
    J, _ = jacobian(net, x, y, mode)
    bal = B.AlignedMTL(tasks, scale=scale)
    w = run(bal, net, x, y, mode)
    ref_w, ref_B = ref_aligned(J, scale)
    np.testing.assert_allclose(w, ref_w, rtol=1e-7)
    # The aligned gradients J^T B are orthogonal with equal norms: condition number 1.
    G = J @ J.T
    Bm = bal.balance_matrix(torch.from_numpy(G)).numpy()
    np.testing.assert_allclose(Bm, ref_B, rtol=1e-7, atol=1e-12)
    sv = np.linalg.svd(J.T @ Bm, compute_uv=False)
    assert sv.max() / sv.min() == pytest.approx(1.0, abs=1e-8)


def test_aligned_drops_a_null_direction():
    """Rank-deficient G (task 3 = task 1 + task 2): the pseudo-inverse on the span, finite weights."""
    X = torch.randn(2, 30, dtype=DT, generator=torch.Generator().manual_seed(0))
    J = torch.cat([X, X.sum(0, keepdim=True)])
    w = B.AlignedMTL(ALL_TASKS[:3]).solve(J @ J.T, torch.ones(3, dtype=DT))
    ref_w, _ = ref_aligned(J.numpy())
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-6)


@pytest.mark.parametrize("mode", ["params", "repr"])
@pytest.mark.parametrize("T", [2, 3, 4])
def test_upgrad_projects_onto_the_dual_cone(T, mode):
    tasks, net, x, y = setup(T)
    J, _ = jacobian(net, x, y, mode)
    G = J @ J.T
    w = run(B.UPGrad(tasks), net, x, y, mode)
    V = B.UPGrad.projections(torch.from_numpy(G)).numpy()
    check_dual_cone_kkt(V, G, tol=1e-9)
    np.testing.assert_allclose(w, V.mean(0), rtol=1e-10)
    assert (G @ w >= -1e-10 * G.max()).all()  # the update conflicts with no task
    if T == 2:
        np.testing.assert_allclose(w @ J, ref_upgrad_t2(J), rtol=1e-9, atol=1e-12)
    else:
        ref_V = ref_upgrad_pgd(J)
        check_dual_cone_kkt(ref_V, G, tol=1e-6)  # the slow reference did converge
        np.testing.assert_allclose(w @ J, ref_V.mean(0) @ J, rtol=1e-5, atol=1e-9)


def test_upgrad_without_conflict_is_the_mean():
    G = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 3.0]], dtype=DT)
    w = B.UPGrad(ALL_TASKS[:3]).solve(G, torch.ones(3, dtype=DT))
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=DT))


# ----------------------------------------------------------------------------- what is written into .grad


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("T", [2, 4])
def test_params_mode_writes_the_combination_and_the_heads_own_gradients(name, T):
    tasks, net, x, y = setup(T)
    J, _ = jacobian(net, x, y, "params")
    w = run(METHODS[name](tasks), net, x, y, "params")
    np.testing.assert_allclose(trunk_grad(net), w @ J, rtol=1e-10, atol=1e-13)
    check_heads(net, x, y)


@pytest.mark.parametrize("name", list(METHODS))
def test_repr_mode_gives_the_gradient_of_the_weighted_sum(name):
    """MGDA-UB style: one backward of z with sum_t w_t dL_t/dz equals d(sum_t w_t L_t)/d theta."""
    tasks, net, x, y = setup(3)
    w = run(METHODS[name](tasks), net, x, y, "repr")
    np.testing.assert_allclose(trunk_grad(net), expected_trunk_grad(net, x, y, w), rtol=1e-10, atol=1e-13)
    check_heads(net, x, y)


@pytest.mark.parametrize("mode", ["params", "repr"])
def test_existing_grads_are_accumulated_into(mode):
    tasks, net, x, y = setup(3)
    w = run(B.MGDA(tasks), net, x, y, mode)
    fresh_trunk = trunk_grad(net).copy()
    fresh_heads = [p.grad.clone() for p in net.heads.parameters()]
    losses, z = net.losses(x, y)
    kw = {"shared_params": list(net.trunk.parameters())} if mode == "params" else {"shared_repr": z}
    w2 = B.MGDA(tasks).backward(losses, **kw)  # .grad is still there from the first call
    np.testing.assert_allclose(np.array([w2[t].item() for t in tasks]), w, rtol=1e-12)
    np.testing.assert_allclose(trunk_grad(net), 2 * fresh_trunk, rtol=1e-12)
    for p, g in zip(net.heads.parameters(), fresh_heads):
        torch.testing.assert_close(p.grad, 2 * g)


def test_channels_last_gradients_are_combined_in_place(monkeypatch):
    """A channels_last conv trunk: the per-task gradients and .grad share the NHWC layout, so gram and
    combine read and write them in place (no contiguous copy); .grad stays NHWC and accumulates."""
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, dtype=DT), nn.Tanh()).to(memory_format=cl)
    heads = [nn.Conv2d(6, 1, 1, dtype=DT).to(memory_format=cl) for _ in range(3)]
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=DT).to(memory_format=cl)
    ys = [torch.randn(2, 1, 5, 5, generator=g, dtype=DT) * s for s in (1.0, 3.0, 0.5)]

    def losses():
        z = trunk(x)
        return {t: ((h(z) - y) ** 2).mean() for t, h, y in zip("abc", heads, ys)}

    weight = trunk[0].weight
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("copied a gradient"))
        w = B.MGDA(list("abc")).backward(losses(), shared_params=trunk.parameters())
        assert weight.grad.is_contiguous(memory_format=cl)
        first, ptr = weight.grad.clone(), weight.grad.data_ptr()
        B.MGDA(list("abc")).backward(losses(), shared_params=trunk.parameters())
    assert weight.grad.data_ptr() == ptr  # accumulated in place
    want = torch.autograd.grad(sum(w[t] * loss for t, loss in losses().items()), weight)[0]
    torch.testing.assert_close(first, want, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(weight.grad, 2 * first, rtol=1e-12, atol=1e-14)


def test_a_parameter_left_out_of_shared_params_gets_the_plain_sum():
    tasks, net, x, y = setup(3)
    first = list(net.trunk[0].parameters())
    losses, _ = net.losses(x, y)
    B.MGDA(tasks).backward(losses, shared_params=net.trunk[2].parameters())
    losses, _ = net.losses(x, y)
    want = torch.autograd.grad(sum(losses.values()), first)
    for p, g in zip(first, want):
        torch.testing.assert_close(p.grad, g)


def test_the_graph_is_freed():
    tasks, net, x, y = setup(3)
    losses, _ = net.losses(x, y)
    B.IMTLG(tasks).backward(losses, shared_params=net.trunk.parameters())
    with pytest.raises(RuntimeError, match="second time"):
        losses[tasks[0]].backward()


# ----------------------------------------------------------------------------- GradNorm


def test_gradnorm_weight_gradient_and_model_gradients():
    tasks, net, x, y = setup(3)
    bal = B.GradNorm(tasks, alpha=1.5)
    W = net.trunk[2].weight
    alpha = 1.5
    L0 = None
    logits = np.zeros(3)
    for step in range(3):
        x_s, y_s = make_batch(3, seed=10 + step)
        net.zero_grad(set_to_none=True)
        bal.logits.grad = None
        losses, _ = net.losses(x_s, y_s)
        vals = np.array([losses[t].item() for t in tasks])
        norms = np.array([torch.autograd.grad(losses[t], W, retain_graph=True)[0].norm().item() for t in tasks])
        got = bal.backward(losses, shared_params=[W])
        # Independent: w = T softmax(s), target = mean(w n) r^alpha, d/ds sum |w n - target|.
        p = np.exp(logits - logits.max())
        p /= p.sum()
        w = 3 * p
        L0 = vals if L0 is None else L0
        rate = vals / L0
        r = rate / rate.mean()
        target = (w * norms).mean() * r**alpha
        dL_dw = np.sign(w * norms - target) * norms
        dw_ds = 3 * (np.diag(p) - np.outer(p, p))
        np.testing.assert_allclose(np.array([got[t].item() for t in tasks]), w, rtol=1e-6)
        np.testing.assert_allclose(bal.logits.grad.numpy(), dw_ds.T @ dL_dw, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(bal.initial_losses.numpy(), L0, rtol=1e-6)
        # Model gradients: d(sum_t w_t L_t) for every parameter, trunk and heads alike.
        losses, _ = net.losses(x_s, y_s)
        total = sum(float(w32) * losses[t] for w32, t in zip(bal.task_weights().detach().float().tolist(), tasks))
        for prm, g in zip(net.parameters(), torch.autograd.grad(total, list(net.parameters()))):
            torch.testing.assert_close(prm.grad, g, rtol=1e-6, atol=1e-9)
        with torch.no_grad():  # an optimiser step on the logits
            bal.logits -= 0.5 * bal.logits.grad
        logits = bal.logits.detach().double().numpy()


def test_gradnorm_needs_shared_params_and_a_matching_device():
    tasks, net, x, y = setup(2)
    losses, z = net.losses(x, y)
    with pytest.raises(ValueError, match="needs shared_params"):
        B.GradNorm(tasks).backward(losses, shared_repr=z)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        B.GradNorm(tasks, alpha=-1)
    assert [n for n, _ in B.GradNorm(tasks).named_parameters()] == ["logits"]
    assert "initial_losses" in B.GradNorm(tasks).state_dict()


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("mode", ["params", "repr"])
def test_grad_scaler_weights_do_not_depend_on_the_scale(name, mode):
    tasks, net, x, y = setup(3, dtype=torch.float32)
    w_plain = run(METHODS[name](tasks), net, x, y, mode)
    grads_plain = [p.grad.clone() for p in net.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=True)
    w_scaled = run(METHODS[name](tasks), net, x, y, mode, scaler=scaler)
    np.testing.assert_allclose(w_scaled, w_plain, rtol=1e-4, atol=1e-6)
    for p, g in zip(net.parameters(), grads_plain):  # .grad stays scaled, as GradScaler.step expects
        torch.testing.assert_close(p.grad, g * 2.0**12, rtol=1e-4, atol=1e-6 * 2.0**12)
    # And GradScaler.step then takes the same step as a plain optimiser.
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler.step(opt)
    scaler.update()
    for p, b, g in zip(net.parameters(), before, grads_plain):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=1e-4, atol=1e-6)


def test_gradnorm_logits_grad_is_scaled_with_the_rest():
    # GradScaler.step unscales every .grad of the optimiser, GradNorm's logits among them.
    tasks, net, x, y = setup(3, dtype=torch.float32)
    grads = {}
    for scale in (None, 2.0**12):
        bal = B.GradNorm(tasks)
        net.zero_grad()
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        losses, _ = net.losses(x, y)
        bal.backward(losses, shared_params=[net.trunk[2].weight], scaler=scaler)
        if scaler is not None:
            scaler.unscale_(torch.optim.SGD([*net.parameters(), *bal.parameters()], lr=0.1))
        grads[scale] = bal.logits.grad.clone()
    torch.testing.assert_close(grads[2.0**12], grads[None], rtol=1e-4, atol=1e-8)
    assert grads[None].abs().max() > 0


def test_grad_scaler_in_the_constructor():
    tasks, net, x, y = setup(2, dtype=torch.float32)
    w_plain = run(B.MGDA(tasks), net, x, y, "params")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    w = run(B.MGDA(tasks, scaler=scaler), net, x, y, "params")
    np.testing.assert_allclose(w, w_plain, rtol=1e-5)
    assert net.trunk[0].weight.grad.abs().max() > 100 * 1e-3  # scaled
    with pytest.raises(TypeError, match="GradScaler"):
        B.MGDA(tasks, scaler=object())


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("mode", ["params", "repr"])
def test_autocast_bf16(name, mode):
    """Forward (and the balancer's backward) under CPU autocast: bf16 activations, fp32 parameters."""
    tasks, net, x, y = setup(3, dtype=torch.float32)
    w_fp32 = run(METHODS[name](tasks), net, x, y, mode)
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, z = net.losses(x, y)
        assert z.dtype == torch.bfloat16
        kw = {"shared_params": net.trunk.parameters()} if mode == "params" else {"shared_repr": z}
        w = METHODS[name](tasks).backward(losses, **kw)
    w = np.array([w[t].float().item() for t in tasks])
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w, w_fp32, rtol=0.15, atol=0.05)  # bf16 has 8 bits of mantissa
    for p in net.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------- unusual losses and bad inputs


@pytest.mark.parametrize("name", [*METHODS, "gradnorm"])
@pytest.mark.parametrize("mode", ["params", "repr"])
def test_a_loss_not_reaching_the_shared_part(name, mode):
    """One task's loss depends on its head only, another is a constant: zero gradients, no crash."""
    if name == "gradnorm" and mode == "repr":
        pytest.skip("GradNorm has no shared_repr variant")
    tasks, net, x, y = setup(4)
    net.zero_grad(set_to_none=True)
    losses, z = net.losses(x, y)
    losses["normals"] = (net.heads["normals"][2].weight ** 2).sum()  # its head only
    losses["edge"] = torch.tensor(0.25, dtype=DT)  # constant: no graph at all
    bal = B.GradNorm(tasks) if name == "gradnorm" else METHODS[name](tasks)
    if name == "gradnorm":
        w = bal.backward(losses, shared_params=[net.trunk[2].weight])
    elif mode == "params":
        w = bal.backward(losses, shared_params=net.trunk.parameters())
    else:
        w = bal.backward(losses, shared_repr=z)
    assert all(torch.isfinite(v) for v in w.values())
    for p in net.trunk.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    want = 2 * net.heads["normals"][2].weight.detach()
    torch.testing.assert_close(net.heads["normals"][2].weight.grad, want)


@pytest.mark.parametrize("name", list(METHODS))
def test_single_task(name):
    tasks, net, x, y = setup(1)
    J, _ = jacobian(net, x, y, "params")
    w = run(METHODS[name](tasks), net, x, y, "params")
    assert np.isfinite(w).all() and w[0] > 0
    np.testing.assert_allclose(trunk_grad(net), w[0] * J[0], rtol=1e-10)


def test_bad_inputs_raise_clear_errors():
    tasks, net, x, y = setup(2)
    losses, z = net.losses(x, y)
    bal = B.MGDA(tasks)
    with pytest.raises(ValueError, match="exactly one of shared_params .* got neither"):
        bal.backward(losses)
    with pytest.raises(ValueError, match="exactly one of shared_params .* got both"):
        bal.backward(losses, shared_params=net.trunk.parameters(), shared_repr=z)
    with pytest.raises(ValueError, match=r"unknown tasks \['sal'\]"):
        bal.backward({**losses, "sal": losses["semseg"]}, shared_repr=z)
    with pytest.raises(ValueError, match=r"missing tasks \['depth'\]"):
        bal.backward({"semseg": losses["semseg"]}, shared_repr=z)
    with pytest.raises(ValueError, match="shared_params is empty"):
        bal.backward(losses, shared_params=[])
    with pytest.raises(TypeError, match=r"shared_params\[1\] must be a tensor"):
        bal.backward(losses, shared_params=[net.trunk[0].weight, "bias"])
    frozen = nn.Parameter(torch.zeros(3, dtype=DT), requires_grad=False)
    with pytest.raises(ValueError, match=r"shared_params\[0\] does not require grad"):
        bal.backward(losses, shared_params=[frozen])
    with pytest.raises(ValueError, match=r"shared_repr\[0\] does not require grad"):
        bal.backward(losses, shared_repr=z.detach())
    z_params = nn.Linear(8, 8, dtype=DT)(z)  # an activation passed as a parameter
    for bal_nl in (bal, B.GradNorm(tasks)):
        with pytest.raises(ValueError, match=r"shared_params\[1\] is not a leaf tensor .* pass it as shared_repr"):
            bal_nl.backward(losses, shared_params=[net.trunk[0].weight, z_params])
    with pytest.raises(ValueError, match="appears twice"):
        bal.backward(losses, shared_params=[net.trunk[0].weight, net.trunk[0].weight])
    with pytest.raises(RuntimeError, match="balances gradients, not losses"):
        bal(losses)
    with pytest.raises(ValueError, match="normalization must be one of"):
        B.MGDA(tasks, normalization="l1")
    with pytest.raises(ValueError, match="solver must be one of"):
        B.MGDA(tasks, solver="cvxpy")
    with pytest.raises(ValueError, match="at most 12 tasks"):
        B.MGDA([f"t{i}" for i in range(13)])
    B.MGDA([f"t{i}" for i in range(13)], solver="frank_wolfe")  # no limit there
    with pytest.raises(ValueError, match="at most 12 tasks"):
        B.UPGrad([f"t{i}" for i in range(13)])
    with pytest.raises(ValueError, match="c must be a finite number >= 0"):
        B.CAGrad(tasks, c=-0.1)
    with pytest.raises(ValueError, match="rescale must be 0, 1 or 2"):
        B.CAGrad(tasks, rescale=3)
    with pytest.raises(ValueError, match="scale must be one of"):
        B.AlignedMTL(tasks, scale="max")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        B.PCGrad(tasks, generator=0)
    with pytest.raises(ValueError, match="iters must be an int"):
        B.NashMTL(tasks, iters=-1)


def test_a_path_around_the_shared_representation_is_an_error():
    tasks, net, x, y = setup(2)
    z = net.trunk(x)
    h = net.trunk[0](x)  # a head that also reads an earlier trunk layer
    losses = {t: ((net.heads[t](z)[:, 0] + h.sum(1) - y[:, i]) ** 2).mean() for i, t in enumerate(tasks)}
    with pytest.raises(ValueError, match="both through shared_repr and around it"):
        B.MGDA(tasks).backward(losses, shared_repr=z)


def test_shared_repr_as_a_list_of_tensors():
    """Two representation tensors computed side by side from the trunk (e.g. two branches); the heads read both."""
    tasks, net, x, y = setup(2)
    h = net.trunk[1](net.trunk[0](x))
    z1, z2 = h[:, 0:8:2], h[:, 1:8:2] * 1.5
    losses = {
        t: ((net.heads[t](torch.cat([z1, z2], 1))[:, 0] + z1.mean(1) - y[:, i]) ** 2).mean()
        for i, t in enumerate(tasks)
    }
    net.zero_grad(set_to_none=True)
    w = B.MGDA(tasks, normalization="none").backward(losses, shared_repr=[z1, z2])
    h_ref = net.trunk[1](net.trunk[0](x))
    z1r = h_ref[:, 0:8:2].detach().requires_grad_()
    z2r = (h_ref[:, 1:8:2] * 1.5).detach().requires_grad_()
    lr = {
        t: ((net.heads[t](torch.cat([z1r, z2r], 1))[:, 0] + z1r.mean(1) - y[:, i]) ** 2).mean()
        for i, t in enumerate(tasks)
    }
    J = np.stack([flat(torch.autograd.grad(lr[t], [z1r, z2r]), [z1r, z2r]).numpy() for t in tasks])
    wn = np.array([w[t].item() for t in tasks])
    np.testing.assert_allclose(wn, ref_min_norm(J), atol=2e-4)
    # The trunk's parameters got the gradient of sum_t w_t L_t.
    h2 = net.trunk[1](net.trunk[0](x))
    a, b = h2[:, 0:8:2], h2[:, 1:8:2] * 1.5
    total = sum(
        float(wn[i]) * ((net.heads[t](torch.cat([a, b], 1))[:, 0] + a.mean(1) - y[:, i]) ** 2).mean()
        for i, t in enumerate(tasks)
    )
    params = list(net.trunk[:2].parameters())
    expected = torch.autograd.grad(total, params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)


def test_nested_shared_repr_is_an_error():
    """z2 computed from z1: the gradient w.r.t. z1 would include z2's path and count it twice."""
    tasks, net, x, y = setup(2)
    z1 = net.trunk[1](net.trunk[0](x))
    z2 = net.trunk[3](net.trunk[2](z1))
    losses = {t: ((net.heads[t](z2)[:, 0] + z1.mean(1) - y[:, i]) ** 2).mean() for i, t in enumerate(tasks)}
    with pytest.raises(ValueError, match=r"shared_repr\[1\] is computed from shared_repr\[0\]"):
        B.MGDA(tasks).backward(losses, shared_repr=[z1, z2])


# ----------------------------------------------------------------------------- host synchronisation


SYNC_METHODS = ["item", "tolist", "__bool__", "__float__", "__int__", "numpy"]


@pytest.mark.parametrize("name", [*METHODS, "gradnorm"])
@pytest.mark.parametrize("mode", ["params", "repr"])
def test_backward_reads_no_tensor_value_on_the_host(name, mode, monkeypatch):
    if name == "gradnorm" and mode == "repr":
        pytest.skip("GradNorm has no shared_repr variant")
    tasks, net, x, y = setup(3)
    bal = B.GradNorm(tasks) if name == "gradnorm" else METHODS[name](tasks)
    scaler = torch.amp.GradScaler("cpu")
    losses, z = net.losses(x, y)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside balancer.backward")

    for attr in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    if name == "gradnorm":
        bal.backward(losses, shared_params=[net.trunk[2].weight], scaler=scaler)
    elif mode == "params":
        bal.backward(losses, shared_params=net.trunk.parameters(), scaler=scaler)
    else:
        bal.backward(losses, shared_repr=z, scaler=scaler)
    monkeypatch.undo()
    assert torch.isfinite(net.trunk[0].weight.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("name", [n for n in METHODS if n != "aligned"] + ["gradnorm"])
@pytest.mark.parametrize("mode", ["params", "repr"])
def test_no_cuda_synchronisation(name, mode):
    """AlignedMTL is left out: torch.linalg.eigh checks its error flag on the host."""
    if name == "gradnorm" and mode == "repr":
        pytest.skip("GradNorm has no shared_repr variant")
    tasks, net, x, y = setup(3, dtype=torch.float32)
    net = net.cuda()
    x, y = x.cuda(), y.cuda()
    bal = (B.GradNorm(tasks) if name == "gradnorm" else METHODS[name](tasks)).cuda()
    if name == "pcgrad":
        bal.generator = torch.Generator("cuda").manual_seed(0)
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(2):  # the first call initialises the scaler, cuBLAS/cuSOLVER handles, ...
        losses, z = net.losses(x, y)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if name == "gradnorm":
                bal.backward(losses, shared_params=[net.trunk[2].weight], scaler=scaler)
            elif mode == "params":
                bal.backward(losses, shared_params=net.trunk.parameters(), scaler=scaler)
            else:
                bal.backward(losses, shared_repr=z, scaler=scaler)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_same_result_with_the_reference_ops(backend):
    tasks, net, x, y = setup(3)
    J, _ = jacobian(net, x, y, "params")
    with mk.use_backend(backend):
        w = run(B.UPGrad(tasks), net, x, y, "params")
    np.testing.assert_allclose(trunk_grad(net), w @ J, rtol=1e-10, atol=1e-13)


def test_solvers_handle_degenerate_grams():
    """Zero, rank-one and exactly opposite gradients: finite weights from every method."""
    T = 3
    g = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(0))
    cases = {
        "zero": torch.zeros(T, 20, dtype=DT),
        "parallel": torch.stack([g, 2 * g, 0.5 * g]),
        "opposite": torch.stack([g, -g, torch.roll(g, 1)]),
    }
    for J in cases.values():
        G = J @ J.T
        for name, make in METHODS.items():
            w = make(ALL_TASKS[:T]).solve(G, torch.ones(T, dtype=DT))
            assert torch.isfinite(w).all(), name


KNOWN = {  # method -> its weights for the orthogonal pair g = (3, 4, 0), h = (0, 0, 2), worked out by hand
    # min over a of 25 a^2 + 4 (1 - a)^2
    "mgda": (lambda tasks: B.MGDA(tasks, normalization="none"), [4 / 29, 25 / 29]),
    # unit gradients, orthogonal: their min-norm point is the midpoint
    "mgda_l2": (lambda tasks: B.MGDA(tasks, normalization="l2"), [0.5, 0.5]),
    "mgda_loss+": (lambda tasks: B.MGDA(tasks), [0.5, 0.5]),  # losses 1: as l2
    "mgda_fw": (lambda tasks: B.MGDA(tasks, normalization="l2", solver="frank_wolfe"), [0.5, 0.5]),
    "pcgrad": (lambda tasks: B.PCGrad(tasks), [1.0, 1.0]),  # no conflict: the sum
    # dual at w = (0, 1): g0 = (g + h) / 2, ||g0|| = sqrt(29) / 2, d = g0 + (0.4 ||g0|| / ||h||) h
    "cagrad_r0": (lambda tasks: B.CAGrad(tasks, rescale=0), [0.5, 0.5 + 0.1 * math.sqrt(29)]),
    "cagrad": (lambda tasks: B.CAGrad(tasks), [0.5 / 1.16, (0.5 + 0.1 * math.sqrt(29)) / 1.16]),
    "imtlg": (lambda tasks: B.IMTLG(tasks), [2 / 7, 5 / 7]),  # d . g / 5 = d . h / 2 with d = a g + (1 - a) h
    "nash": (lambda tasks: B.NashMTL(tasks), [1 / 5, 1 / 2]),  # 25 a_1 = 1 / a_1, 4 a_2 = 1 / a_2
    # G = diag(25, 4): B = sqrt(4) diag(1/5, 1/2), weights B 1
    "aligned": (lambda tasks: B.AlignedMTL(tasks), [0.4, 1.0]),
    "upgrad": (lambda tasks: B.UPGrad(tasks), [0.5, 0.5]),  # no conflict: the mean
}


def test_known_answers_for_orthogonal_opposite_and_identical_gradients():
    """Two tasks, g = (3, 4, 0) (norm 5) and h = (0, 0, 2): orthogonal (weights in KNOWN), opposite (g, -g:
    every method's update is 0) and identical (g, g: the update, since the weights are not unique for all)."""
    g = torch.tensor([3.0, 4.0, 0.0], dtype=DT)
    h = torch.tensor([0.0, 0.0, 2.0], dtype=DT)
    ones = torch.ones(2, dtype=DT)
    identical = {  # the update as a multiple of g
        "mgda": 1.0,
        "mgda_l2": 1.0,
        "mgda_loss+": 1.0,
        "mgda_fw": 1.0,
        "pcgrad": 2.0,  # the plain sum
        "cagrad_r0": 1.4,  # g0 + c ||g0|| g / ||g||
        "cagrad": 1.4 / 1.16,
        "imtlg": 1.0,  # singular system: 1/T each
        "nash": 2 / math.sqrt(50),  # 50 a = 1 / a for each
        "aligned": 2.0,  # rank one: B = v v^T, v = (1, 1) / sqrt(2)
        "upgrad": 1.0,  # the mean
    }
    for name, (make, want) in KNOWN.items():
        bal = make(ALL_TASKS[:2])
        J = torch.stack([g, h])
        w = bal.solve(J @ J.T, ones)
        torch.testing.assert_close(w, torch.tensor(want, dtype=DT), rtol=1e-9, atol=1e-12, msg=name)
        J = torch.stack([g, -g])
        w = bal.solve(J @ J.T, ones)
        assert torch.isfinite(w).all(), name
        torch.testing.assert_close(w @ J, torch.zeros(3, dtype=DT), rtol=0, atol=1e-12, msg=name)
        J = torch.stack([g, g])
        w = bal.solve(J @ J.T, ones)
        torch.testing.assert_close(w @ J, identical[name] * g, rtol=1e-9, atol=1e-12, msg=name)
    same = torch.stack([g, g]) @ torch.stack([g, g]).T
    torch.testing.assert_close(B.PCGrad(ALL_TASKS[:2]).solve(same, ones), torch.ones(2, dtype=DT))
    torch.testing.assert_close(B.UPGrad(ALL_TASKS[:2]).solve(same, ones), torch.full((2,), 0.5, dtype=DT))
    torch.testing.assert_close(B.NashMTL(ALL_TASKS[:2]).solve(same, ones), torch.full((2,), 50**-0.5, dtype=DT))


def test_exact_solvers_agree_with_enumeration_in_numpy():
    """Random Gram matrices, T up to 6: MGDA's exact min-norm point against an itertools/lstsq enumeration."""
    rng = np.random.default_rng(0)
    for T in (3, 4, 6):
        X = rng.standard_normal((T, 15))
        X[1] = -0.8 * X[0] + 0.1 * X[1]  # a conflict
        G = X @ X.T
        best, best_f = None, math.inf
        for k in range(1, T + 1):
            for S in itertools.combinations(range(T), k):
                S = list(S)
                K = np.block([[G[np.ix_(S, S)], np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
                sol = np.linalg.lstsq(K, np.r_[np.zeros(k), 1.0], rcond=None)[0][:k]
                if (sol >= -1e-12).all():
                    a = np.zeros(T)
                    a[S] = sol
                    f = a @ G @ a
                    if f < best_f:
                        best, best_f = a, f
        a = B.MGDA([f"t{i}" for i in range(T)], normalization="none").solve(
            torch.from_numpy(G), torch.ones(T, dtype=DT)
        )
        assert (a.numpy() @ G @ a.numpy()) == pytest.approx(best_f, rel=1e-10, abs=1e-14)
        np.testing.assert_allclose(a.numpy(), best, atol=1e-8)
