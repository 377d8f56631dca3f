"""dense_loss_group: every task's dense loss in one launch (the compiled backends), against
dense_loss task by task and the reference, forward and backward; and DenseMultiTaskLoss using it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import fused_backends
from torch.utils._python_dispatch import TorchDispatchMode

import mtl_kernels as mk
from mtl_kernels.ops.dense_loss import check_args, dense_loss_group_stats, dense_loss_stats

BACKENDS = fused_backends("cpu")  # cpu (the compiled extension) and triton (the interpreter), where present
CASES = [("cpu", b) for b in BACKENDS] + [pytest.param("cuda", b, marks=pytest.mark.cuda) for b in ("cuda", "triton")]

# (kind, pos_weight, channels): the survey's tasks, sal's weight the batch's share of negatives.
TASKS = [
    ("cross_entropy", None, 40),
    ("l1", None, 1),
    ("normals_l1", None, 3),
    ("balanced_bce", 0.95, 1),
    ("balanced_bce", None, 1),
    ("cross_entropy", None, 7),
]


def make_task(kind, pos_weight, C, shape, dtype, device, layout):
    B, H, W = shape
    pred = torch.randn(B, C, H, W, dtype=torch.float64) * 3
    if kind == "cross_entropy":
        target = torch.randint(0, C, (B, H, W))
        target[0, : H // 2] = 255
    elif kind == "balanced_bce":
        target = (torch.rand(B, C, H, W) > 0.7).float()
    else:
        target = F.normalize(torch.randn(B, C, H, W), dim=1) if kind == "normals_l1" else torch.rand(B, C, H, W) * 5
        target[0, :, : H // 2] = 255
    pred = pred.to(device=device, dtype=dtype)
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    pred, target = check_args(pred.requires_grad_(), target.to(device), kind, pos_weight, "255")
    return pred, target, kind, pos_weight


def group_and_each(tasks, backend):
    """(stats, grads) of the group and of dense_loss task by task, for one random weighting."""
    preds, targets, kinds, weights = zip(*tasks)
    group = torch.stack(dense_loss_group_stats(preds, targets, kinds, weights, "255", backend))
    each = torch.stack([dense_loss_stats(*t, "255", backend) for t in tasks])
    w = torch.randn(len(tasks), dtype=torch.float64, device=preds[0].device)
    return (
        (group, torch.autograd.grad((group[:, 0] * w).sum(), preds)),
        (each, torch.autograd.grad((each[:, 0] * w).sum(), preds)),
    )


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_equals_each_task(device, backend, dtype, layout):
    torch.manual_seed(0)
    tasks = [make_task(k, w, C, (2, 9, 13), dtype, device, layout) for k, w, C in TASKS]
    (stats, grads), (want_stats, want_grads) = group_and_each(tasks, backend)
    assert stats.shape == (len(TASKS), 3) and stats.dtype == torch.float64  # one [3] tensor per task
    if backend == "cpu":  # the same tiles, added in the same order
        assert torch.equal(stats, want_stats)
    else:  # the blocks' partials added in another order
        torch.testing.assert_close(stats, want_stats, rtol=1e-12, atol=0)
    for g, want, (pred, *_) in zip(grads, want_grads, tasks):
        assert g.stride() == pred.stride()
        assert_same_terms(g, want, backend)


def assert_same_terms(got, want, backend):
    """The group's gradient against dense_loss's: the same terms and scaling, so equal on the CPU; a
    GPU compiles each kernel on its own and may contract a multiply-add differently."""
    if backend == "cpu":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(got.dtype).eps, atol=1e-30)


@pytest.mark.parametrize("device,backend", CASES)
def test_group_matches_reference(device, backend):
    torch.manual_seed(1)
    tasks = [make_task(k, w, C, (2, 6, 7), torch.float64, device, "contiguous") for k, w, C in TASKS]
    preds, targets, kinds, weights = zip(*tasks)
    stats = torch.stack(dense_loss_group_stats(preds, targets, kinds, weights, "255", backend))
    means = stats[:, 0] / stats[:, 1]
    for i, (pred, target, kind, w) in enumerate(tasks):
        want = mk.ops.dense_loss(pred, target, kind, pos_weight=w, backend="reference")
        torch.testing.assert_close(means[i], want, rtol=1e-12, atol=0)
        (g,) = torch.autograd.grad(means[i], pred, retain_graph=True)
        (want_g,) = torch.autograd.grad(want, pred)
        torch.testing.assert_close(g, want_g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device,backend", CASES)
def test_group_of_many_tasks_of_any_size(device, backend):
    """More tasks than one CUDA launch takes (16), tasks of one pixel beside large ones (more
    tiles than the CPU's work chunks, and fewer)."""
    torch.manual_seed(2)
    shapes = [(1, 1, 1), (2, 33, 65), (1, 2, 3), (3, 17, 31)]
    tasks = [
        make_task(*TASKS[i % len(TASKS)], shapes[i % len(shapes)], torch.float32, device, "contiguous")
        for i in range(19)
    ]
    (stats, grads), (want_stats, want_grads) = group_and_each(tasks, backend)
    torch.testing.assert_close(stats, want_stats, rtol=1e-12, atol=0)
    for g, want in zip(grads, want_grads):
        assert_same_terms(g, want, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_group_gradcheck(device, backend):
    torch.manual_seed(3)
    tasks = [make_task(k, w, C, (2, 2, 3), torch.float64, device, "contiguous") for k, w, C in TASKS[:5]]
    preds, targets, kinds, weights = zip(*tasks)

    def f(*p):
        return torch.stack(dense_loss_group_stats(p, targets, kinds, weights, "255", backend))[:, 0]

    # Away from the kinks of |x| (L1 terms at the target) the loss is smooth.
    assert torch.autograd.gradcheck(f, preds)


@pytest.mark.parametrize("device,backend", CASES)
def test_group_inplace_backward(device, backend):
    torch.manual_seed(4)
    tasks = [make_task(k, w, C, (2, 5, 6), torch.float32, device, "channels_last") for k, w, C in TASKS]
    preds, targets, kinds, weights = zip(*tasks)
    want = torch.autograd.grad(
        torch.stack(dense_loss_group_stats(preds, targets, kinds, weights, "255", backend))[:, 0].sum(), preds
    )
    stats = torch.stack(dense_loss_group_stats(preds, targets, kinds, weights, "255", backend, inplace_backward=True))
    got = torch.autograd.grad(stats[:, 0].sum(), preds, retain_graph=True)
    for g, w in zip(got, want):
        assert_same_terms(g, w, backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stats[:, 0].sum().backward()


def group_ops(backend):
    ops = torch.ops.mtl_kernels
    if backend == "triton":
        return ops.dense_loss_group_triton, ops.dense_loss_group_backward_triton, ops.dense_loss_group_backward_triton_
    return ops.dense_loss_group, ops.dense_loss_group_backward, ops.dense_loss_group_backward_


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_opcheck(backend):
    torch.manual_seed(5)
    tasks = [make_task(k, w, C, (2, 3, 4), torch.float32, "cpu", "contiguous") for k, w, C in TASKS]
    preds, targets, kinds, _ = zip(*tasks)
    group, group_backward, group_backward_ = group_ops(backend)
    pos_weights = torch.tensor([0.0, 0.0, 0.0, 0.95, 0.7, 0.0], dtype=torch.float64)
    codes = [0, 1, 2, 3, 3, 0]
    torch.library.opcheck(group, (list(preds), list(targets), codes, pos_weights, 0, False))
    grads = [torch.randn_like(p) for p in preds]
    grad_sums = torch.rand(len(preds), dtype=torch.float64)
    torch.library.opcheck(group_backward, (grads, grad_sums))
    torch.library.opcheck(group_backward_, ([g.clone() for g in grads], grad_sums))
    got = group_backward(grads, grad_sums)
    for g, want, s in zip(got, grads, grad_sums):
        torch.testing.assert_close(g, (want.double() * s).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_bad_arguments(backend):
    group, group_backward, _ = group_ops(backend)
    p = torch.randn(2, 3, 4, 5)
    t = torch.randint(0, 3, (2, 4, 5))
    w = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="needs at least one task"):
        group([], [], [], w[:0], 0, False)
    with pytest.raises(RuntimeError, match="one entry per task, got 2, 1 and 2"):
        group([p, p], [t], [0, 0], w, 0, False)
    with pytest.raises(RuntimeError, match=r"pos_weights must be float64 \[2\]"):
        group([p, p], [t, t], [0, 0], w.float(), 0, False)
    with pytest.raises(RuntimeError, match="share the first's dtype"):
        group([p, p.double()], [t, t], [0, 0], w, 0, False)
    with pytest.raises(RuntimeError, match="cross-entropy target must be contiguous int64"):
        group([p, p], [t, t.float()], [0, 0], w, 0, False)
    with pytest.raises(RuntimeError, match="unknown kind 7"):
        group([p, p], [t, t], [0, 7], w, 0, False)
    with pytest.raises(RuntimeError, match=r"grad_sums must be \[2\]"):
        group_backward([p, p], w[:1])
    with pytest.raises(ValueError, match="backend must be 'cpu', 'cuda' or 'triton'"):
        dense_loss_group_stats([p], [t], ["cross_entropy"], [None], "255", "reference")


class OpLog(TorchDispatchMode):
    """The mtl_kernels ops called, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "mtl_kernels":
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))


NYUD = {"semseg": ("cross_entropy", 40), "depth": ("l1", 1), "normals": ("normals_l1", 3), "edge": ("balanced_bce", 1)}


def nyud_batch(dtypes=None, small=(), device="cpu"):
    preds, targets = {}, {}
    for task, (kind, C) in NYUD.items():
        dtype = (dtypes or {}).get(task, torch.float32)
        pred, target, *_ = make_task(kind, 0.95, C, (2, 8, 10), dtype, device, "contiguous")
        if task in small:
            pred = torch.randn(2, C, 4, 5, dtype=dtype, requires_grad=True)
        preds[task], targets[task] = pred, target
    return preds, targets


@pytest.mark.parametrize(
    "case,launches",
    [
        ("plain", {"dense_loss_group": 1, "dense_loss_group_backward": 1}),
        ("inplace", {"dense_loss_group": 1, "dense_loss_group_backward_": 1}),
        ("per task", {"dense_loss": 4, "dense_loss_backward": 4}),  # group_tasks=False
        # an fp64 task beside three fp32 ones; a prediction at half size (resized inside its own op)
        (
            "fp64 depth",
            {"dense_loss_group": 1, "dense_loss": 1, "dense_loss_group_backward": 1, "dense_loss_backward": 1},
        ),
        (
            "small depth",
            {
                "dense_loss_group": 1,
                "dense_loss_upsampled": 1,
                "dense_loss_group_backward": 1,
                "dense_loss_backward": 1,
            },
        ),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_takes_one_launch_for_its_tasks(backend, case, launches):
    """The mtl_kernels ops a forward and backward call; Triton's are named with _triton before any
    trailing underscore (dense_loss_group_backward_triton_)."""
    if backend == "triton":
        launches = {n.rstrip("_") + "_triton" + "_" * n.endswith("_"): k for n, k in launches.items()}
    torch.manual_seed(6)
    preds, targets = nyud_batch(
        dtypes={"depth": torch.float64} if case == "fp64 depth" else None,
        small=("depth",) if case == "small depth" else (),
    )
    weights = {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}
    loss = mk.nn.DenseMultiTaskLoss(
        list(NYUD),
        weights,
        upsample=True,
        inplace_backward=case == "inplace",
        group_tasks=case != "per task",
        backend=backend,
    )
    with OpLog() as log:
        total, parts = loss(preds, targets)
        grads = torch.autograd.grad(total, list(preds.values()))
    assert {n: log.names.count(n) for n in set(log.names)} == launches
    ref = mk.nn.DenseMultiTaskLoss(list(NYUD), weights, upsample=True, backend="reference")
    want_total, want_parts = ref(preds, targets)
    for t in NYUD:
        torch.testing.assert_close(parts[t], want_parts[t], rtol=1e-5, atol=1e-6)
    for g, want in zip(grads, torch.autograd.grad(want_total, list(preds.values()))):
        torch.testing.assert_close(g.to(want.dtype), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("group_tasks", [True, False])
def test_one_task_loss_reaches_only_its_own_prediction(backend, group_tasks):
    """A gradient-level balancer differentiates each task's loss on its own: the other tasks'
    predictions (and so their heads) must get no gradient at all, not a zero one that autograd
    would still push back through their heads. The total reaches all of them."""
    torch.manual_seed(7)
    leaves, targets = nyud_batch()
    shared = torch.ones((), requires_grad=True)  # a trunk every head depends on, as a balancer's shared part
    preds = {t: p.detach() * shared for t, p in leaves.items()}
    loss = mk.nn.DenseMultiTaskLoss(list(NYUD), group_tasks=group_tasks, backend=backend)
    reached = []
    for task, pred in preds.items():  # (autograd calls a hook with None where no gradient came)
        pred.register_hook(lambda g, task=task: reached.append(task) if g is not None else None)
    total, losses = loss(preds, targets)
    for task in NYUD:
        reached.clear()
        (g,) = torch.autograd.grad(losses[task], shared, retain_graph=True)
        assert reached == [task]
        pred = leaves[task].detach().requires_grad_()
        want = mk.ops.dense_loss(pred, targets[task], NYUD[task][0], pos_weight=0.95, backend="reference")
        (want_g,) = torch.autograd.grad(want, pred)
        torch.testing.assert_close(g, (want_g * leaves[task]).sum(), rtol=1e-5, atol=1e-6)
    reached.clear()
    torch.autograd.grad(total, shared)
    assert sorted(reached) == sorted(NYUD)


@pytest.mark.parametrize("device,backend", CASES)
def test_default_grouping_follows_the_device(device, backend):
    """group_tasks=None: one launch for the tasks on a GPU; one per task on the CPU (no time to gain
    there, and the grouped backward would keep every task's gradient alive until all are made)."""
    preds, targets = nyud_batch(device=device)
    loss = mk.nn.DenseMultiTaskLoss(list(NYUD), backend=backend)
    with OpLog() as log:
        total, _ = loss(preds, targets)
        torch.autograd.grad(total, list(preds.values()))
    suffix = "_triton" if backend == "triton" else ""
    if device == "cpu":
        want = {f"dense_loss{suffix}": 4, f"dense_loss_backward{suffix}": 4}
    else:
        want = {f"dense_loss_group{suffix}": 1, f"dense_loss_group_backward{suffix}": 1}
    assert {n: log.names.count(n) for n in set(log.names)} == want
