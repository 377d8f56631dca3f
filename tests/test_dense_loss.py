"""dense_loss and DenseMultiTaskLoss: the reference against the survey code's formulas, every fused
backend against the reference (forward and backward), edge cases and bad input."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import fused_backends

import mtl_kernels as mk
from mtl_kernels.nn.loss import TASK_KINDS
from mtl_kernels.ops import dense_loss
from mtl_kernels.ops.dense_loss import IMPLEMENTED
from mtl_kernels.reference.dense_loss import survey_loss

BACKENDS = [b for b in fused_backends("cpu") if b in IMPLEMENTED]
CASES = [("cpu", b) for b in BACKENDS] + [pytest.param("cuda", b, marks=pytest.mark.cuda) for b in ("cuda", "triton")]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
KINDS = ["cross_entropy", "l1", "normals_l1", "balanced_bce"]


def make(kind, shape=(2, 5, 7, 9), dtype=torch.float32, device="cpu", scale=3.0, ignored=True):
    """(pred, target) with some ignored entries, like the survey's data."""
    B, C, H, W = shape
    if kind == "normals_l1":
        C = 3
    elif kind in ("l1", "balanced_bce"):
        C = 1 if shape[1] == 5 else C
    pred = (torch.randn(B, C, H, W) * scale).to(device=device, dtype=dtype).requires_grad_()
    if kind == "cross_entropy":
        target = torch.randint(0, C, (B, 1, H, W)).float()  # the survey's float labels
        if ignored:
            target[0, :, : H // 2] = 255
    elif kind == "l1":
        target = torch.rand(B, C, H, W) * 10
        if ignored:
            target[0, :, : H // 2] = 255
    elif kind == "normals_l1":
        target = F.normalize(torch.randn(B, 3, H, W), dim=1)
        if ignored:
            target[0, :, : H // 2] = 255
            target[1, 0, 0] = 255  # a single ignored entry of a pixel
    else:
        target = (torch.rand(B, C, H, W) > 0.8).float()
    return pred, target.to(device)


def grad_of(loss, pred):
    (g,) = torch.autograd.grad(loss, pred)
    return g


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --- the reference is the survey code's math --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reference_is_the_survey_loss(kind):
    pred, target = make(kind, dtype=torch.float64)
    got = dense_loss(pred, target, kind, pos_weight=0.95 if kind == "balanced_bce" else None, backend="reference")
    want = survey_loss(pred, target.double(), kind, 0.95 if kind == "balanced_bce" else None)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert rel_err(grad_of(got, pred), grad_of(want, pred)) <= 1e-12


def test_reference_sal_weight_is_the_batch_share_of_negatives():
    pred, target = make("balanced_bce", dtype=torch.float64)
    got = dense_loss(pred, target, "balanced_bce", pos_weight=None, backend="reference")
    assert torch.allclose(got, survey_loss(pred.detach(), target.double(), "balanced_bce", None), rtol=1e-12)


# --- fused backends against the reference ------------------------------------------------------


def check(kind, shape, dtype, device, backend, layout="contiguous", pos_weight=None, invalid="255", **kw):
    pred, target = make(kind, shape, dtype, device, **kw)
    if layout == "channels_last":
        pred = pred.detach().to(memory_format=torch.channels_last).requires_grad_()
    elif layout == "strided":  # every other column: not dense
        wide, target_wide = make(kind, (*shape[:3], 2 * shape[3]), dtype, device, **kw)
        pred = wide.detach()[..., ::2].requires_grad_()
        target = target_wide[..., ::2]
    loss = dense_loss(pred, target, kind, pos_weight=pos_weight, invalid=invalid, backend=backend)
    ref = dense_loss(pred.double(), target, kind, pos_weight=pos_weight, invalid=invalid, backend="reference")
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == want and loss.shape == ()
    assert abs(loss.item() - ref.item()) <= TOL[dtype] * max(1.0, abs(ref.item()))
    g, g_ref = grad_of(loss, pred), grad_of(ref, pred)
    assert g.dtype == dtype and g.shape == pred.shape
    assert rel_err(g, g_ref) <= TOL[dtype]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_reference(device, backend, kind, dtype, layout):
    pos_weight = 0.95 if kind == "balanced_bce" else None
    check(kind, (2, 5, 7, 9), dtype, device, backend, layout, pos_weight=pos_weight)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["l1", "balanced_bce"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_over_several_tiles(device, backend, kind, dtype):
    """12600 elements: three whole 4096-element CPU tiles and a remainder, each widened to fp32,
    run through the fp32 loop and its gradient narrowed back."""
    check(kind, (2, 1, 70, 90), dtype, device, backend, pos_weight=0.95 if kind == "balanced_bce" else None)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("classes", [1, 2, 21, 40, 64])
def test_cross_entropy_classes(device, backend, classes):
    check("cross_entropy", (2, classes, 5, 6), torch.float32, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(device, backend, dtype):
    for kind in ("cross_entropy", "balanced_bce"):
        pred, target = make(kind, (2, 4, 5, 6), dtype, device)
        with torch.no_grad():
            pred.copy_(torch.where(torch.rand_like(pred, dtype=torch.float32) > 0.5, 1e4, -1e4))
        loss = dense_loss(pred, target, kind, pos_weight=0.95 if kind == "balanced_bce" else None, backend=backend)
        ref = dense_loss(
            pred.double(), target, kind, pos_weight=0.95 if kind == "balanced_bce" else None, backend="reference"
        )
        g = grad_of(loss, pred)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
        assert rel_err(g, grad_of(ref, pred)) <= TOL[dtype]


@pytest.mark.parametrize("device,backend", CASES)
def test_masked_logits(device, backend):
    # Logits masked to -inf (a class excluded per pixel), here the first ones a pixel has and,
    # at 40 classes, more than a whole slice of them: softmax gives them 0, never NaN.
    pred, target = make("cross_entropy", (2, 40, 3, 4), torch.float32, device, ignored=False)
    target = target.clamp(min=36)  # labels among the classes left finite
    with torch.no_grad():
        pred[0, :36] = float("-inf")
        pred[1, 0] = float("-inf")
    ref_pred = pred.detach().double().requires_grad_()
    loss = dense_loss(pred, target, "cross_entropy", backend=backend)
    ref = dense_loss(ref_pred, target, "cross_entropy", backend="reference")
    g, g_ref = grad_of(loss, pred), grad_of(ref, ref_pred)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert rel_err(g, g_ref) <= TOL[torch.float32]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_normals(device, backend, dtype):
    # |p| far below the 1e-12 eps: |p| * n^2 underflows in float, the gradient must not.
    pred, target = make("normals_l1", (2, 3, 4, 5), torch.float32, device)
    with torch.no_grad():
        pred.mul_(1e-22)
    pred = pred.detach().to(dtype).requires_grad_()
    ref_pred = pred.detach().double().requires_grad_()
    loss = dense_loss(pred, target, "normals_l1", backend=backend)
    ref = dense_loss(ref_pred, target.double(), "normals_l1", backend="reference")
    g = grad_of(loss, pred)
    assert torch.isfinite(g).all()
    assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    assert rel_err(g, grad_of(ref, ref_pred)) <= TOL[dtype]


@pytest.mark.parametrize("device,backend", CASES)
def test_sal_batch_weight(device, backend):
    check("balanced_bce", (3, 1, 6, 7), torch.float32, device, backend, pos_weight=None)


@pytest.mark.parametrize("device,backend", CASES)
def test_depth_nonpositive_holes(device, backend):
    pred, target = make("l1", (2, 1, 6, 7), torch.float32, device, ignored=False)
    target[0, 0, :2] = 0
    target[1, 0, 0] = float("nan")
    target[1, 0, 1] = -1
    loss = dense_loss(pred, target, "l1", invalid="nonpositive", backend=backend)
    valid = target > 0
    want = (pred.detach()[valid] - target[valid]).abs().mean()
    assert torch.allclose(loss, want, rtol=1e-6)
    g = grad_of(loss, pred)
    assert (g[~valid] == 0).all()


@pytest.mark.parametrize("device,backend", [("cpu", "reference"), *CASES])
@pytest.mark.parametrize("kind", ["cross_entropy", "l1", "normals_l1"])
def test_all_ignored_is_zero(device, backend, kind):
    pred, target = make(kind, (2, 3, 4, 5), torch.float32, device)
    target = torch.full_like(target, 255)
    loss = dense_loss(pred, target, kind, backend=backend)
    g = grad_of(loss, pred)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(backend, kind):
    pred, target = make(kind, (2, 3, 2, 3), torch.float64, scale=1.0)
    pw = 0.95 if kind == "balanced_bce" else None
    assert torch.autograd.gradcheck(lambda p: dense_loss(p, target, kind, pos_weight=pw, backend=backend), (pred,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(backend, kind):
    pred, target = make(kind, (2, 3, 3, 4))
    from mtl_kernels.ops.dense_loss import check_args

    pred, target = check_args(pred.detach().requires_grad_(), target, kind, None, "255")
    op = torch.ops.mtl_kernels.dense_loss_triton if backend == "triton" else torch.ops.mtl_kernels.dense_loss
    code = KINDS.index(kind)
    pos_weight = torch.tensor(0.95, dtype=torch.float64)
    torch.library.opcheck(op, (pred, target, code, pos_weight, 0, False))
    # The upsampled op: a prediction of 2 x 3 pixels against the 3 x 4 target.
    small = pred.detach()[..., ::2, ::2].contiguous().requires_grad_()
    up = (
        torch.ops.mtl_kernels.dense_loss_upsampled_triton
        if backend == "triton"
        else torch.ops.mtl_kernels.dense_loss_upsampled
    )
    torch.library.opcheck(up, (small, target.contiguous(), code, pos_weight, 0, False))


@pytest.mark.parametrize("device, backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_scales_in_float(device, backend, dtype, inplace):
    # 1/count of a 480 x 640 x 8 x 3 normals batch is subnormal in float16: a multiply in grad's
    # dtype (torch.mul by a 0-dim CUDA tensor) rounds it to 1.19e-7, 12% low.
    ops = torch.ops.mtl_kernels
    if backend == "triton":
        scale, scale_ = ops.dense_loss_backward_triton, ops.dense_loss_backward_triton_
    else:
        scale, scale_ = ops.dense_loss_backward, ops.dense_loss_backward_
    grad = (torch.randn(2, 3, 5, 7, device=device) * 100).to(dtype).contiguous(memory_format=torch.channels_last)
    grad_sum = torch.tensor(1 / (3 * 8 * 480 * 640), dtype=torch.float64, device=device)
    want = (grad.double() * grad_sum).to(dtype)
    if inplace:
        got = grad.clone()
        scale_(got, grad_sum)
    else:
        got = scale(grad, grad_sum)
        assert got.stride() == grad.stride()
    # One unit in the last place: the Triton interpreter truncates float32 to bfloat16.
    torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=0)
    torch.library.opcheck(scale_ if inplace else scale, (grad.clone(), grad_sum))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    pred, target = make("cross_entropy", (2, 4, 5, 6))

    def f(p, t):
        return dense_loss(p, t, "cross_entropy", backend=backend, check_targets=False)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, want = compiled(pred, target), f(pred, target)
    assert torch.allclose(loss, want)
    assert torch.allclose(grad_of(loss, pred), grad_of(want, pred))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice(backend):
    pred, target = make("cross_entropy")
    loss = dense_loss(pred, target, "cross_entropy", backend=backend)
    first = torch.autograd.grad(loss, pred, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(loss, pred)[0], first)
    # in place: one pred-sized tensor less, and a second backward is autograd's clear error
    loss = dense_loss(pred, target, "cross_entropy", backend=backend, inplace_backward=True)
    assert torch.equal(torch.autograd.grad(loss, pred, retain_graph=True)[0], first)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_bad_targets(backend):
    pred, target = make("cross_entropy", (2, 5, 4, 4))
    target[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"class indices that are neither integers in \[0, 5\)"):
        dense_loss(pred, target, "cross_entropy", backend=backend)
    for label in (-1, 2.5, -0.5, 255.7, float("nan")):  # float labels are not truncated into a class
        target[0, 0, 0, 0] = label
        with pytest.raises(ValueError, match="1 class indices"):
            dense_loss(pred, target, "cross_entropy", backend=backend)
    for kind in ("l1", "normals_l1", "balanced_bce"):
        pred, target = make(kind, (2, 5, 4, 4))
        target[1, 0, 1, 1] = float("nan")
        with pytest.raises(ValueError, match="1 NaN entries"):
            dense_loss(pred, target, kind, pos_weight=0.95, backend=backend)


def test_bad_arguments():
    pred, target = make("cross_entropy", (2, 5, 4, 4))
    with pytest.raises(ValueError, match="kind must be one of"):
        dense_loss(pred, target, "focal")
    with pytest.raises(ValueError, match=r"target must be \[B, H, W\]"):
        dense_loss(pred, target[:1], "cross_entropy")
    with pytest.raises(ValueError, match="pass upsample=True"):
        dense_loss(pred, target[:, :, :3], "cross_entropy")
    with pytest.raises(TypeError, match="integer or floating"):
        dense_loss(pred, target > 0, "cross_entropy")
    with pytest.raises(ValueError, match="pred must be 4-D"):
        dense_loss(pred[0], target, "cross_entropy")
    with pytest.raises(TypeError, match="pred must be float16"):
        dense_loss(pred.long(), target, "cross_entropy")
    with pytest.raises(ValueError, match="needs pred with 3 channels"):
        dense_loss(pred, torch.zeros_like(pred), "normals_l1")
    with pytest.raises(ValueError, match="target must have pred's shape"):
        dense_loss(pred, torch.zeros(2, 4, 4, 4), "l1")
    with pytest.raises(ValueError, match="invalid must be one of"):
        dense_loss(pred, torch.zeros_like(pred), "l1", invalid="zero")
    with pytest.raises(ValueError, match="pos_weight must be a number in"):
        dense_loss(pred, torch.zeros_like(pred), "balanced_bce", pos_weight=1.5)
    with pytest.raises(ValueError, match="target is on meta"):
        dense_loss(pred, target.to("meta"), "cross_entropy")
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
        dense_loss(pred, target, "cross_entropy", backend="cuda")


# --- DenseMultiTaskLoss ------------------------------------------------------------------------

NYUD = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}
PASCAL = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}
KIND_OF = {
    "semseg": "cross_entropy",
    "human_parts": "cross_entropy",
    "depth": "l1",
    "normals": "normals_l1",
    "edge": "balanced_bce",
    "sal": "balanced_bce",
}


def batch(tasks, size=(6, 8), pred_size=None, dtype=torch.float32):
    preds, targets = {}, {}
    for task, C in tasks.items():
        kind = KIND_OF[task]
        pred, target = make(kind, (2, C, *size), dtype)
        if task == "sal":
            target = (torch.rand_like(target) > 0.6).float()
        preds[task] = pred if pred_size is None else torch.randn(2, C, *pred_size, dtype=dtype, requires_grad=True)
        targets[task] = target
    return preds, targets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tasks,preset", [(NYUD, "nyud"), (PASCAL, "pascal")])
def test_module_matches_reference(backend, tasks, preset):
    weights = {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0, "human_parts": 2.0, "sal": 5.0}
    weights = {t: weights[t] for t in tasks}
    preds, targets = batch(tasks)
    fused = mk.nn.DenseMultiTaskLoss(list(tasks), weights, backend=backend)
    ref = mk.nn.DenseMultiTaskLoss(list(tasks), weights, backend="reference")
    total, parts = fused(preds, targets)
    want_total, want_parts = ref(preds, targets)
    assert set(parts) == set(tasks)
    for t in tasks:
        assert torch.allclose(parts[t], want_parts[t], rtol=1e-5, atol=1e-6), t
    assert torch.allclose(total, sum(weights[t] * want_parts[t] for t in tasks), rtol=1e-5)
    leaves = [preds[t] for t in tasks]
    for g, w in zip(torch.autograd.grad(total, leaves), torch.autograd.grad(want_total, leaves)):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("device,backend", [("cpu", "reference"), *CASES])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [((4, 6), (16, 24)), ((5, 7), (17, 13)), ((6, 6), (6, 11))])
def test_upsampled_matches_interpolate_then_loss(device, backend, kind, dtype, sizes):
    (h, w), (H, W) = sizes
    pred, _ = make(kind, (2, 3, h, w), dtype, device)
    _, target = make(kind, (2, 3, H, W), dtype, device)
    pw = 0.95 if kind == "balanced_bce" else None
    loss = dense_loss(pred, target, kind, pos_weight=pw, upsample=True, backend=backend)
    up = F.interpolate(pred.double(), size=(H, W), mode="bilinear", align_corners=False)
    ref = dense_loss(up, target, kind, pos_weight=pw, backend="reference")
    assert abs(loss.item() - ref.item()) <= TOL[dtype] * max(1.0, abs(ref.item()))
    g = grad_of(loss, pred)
    assert g.shape == pred.shape and g.dtype == dtype
    # The reference rounds the upsampled prediction to bf16 before the loss; the fused backends
    # interpolate in float32.
    tol = 5e-2 if dtype == torch.bfloat16 and backend == "reference" else TOL[dtype]
    assert rel_err(g, grad_of(ref, pred)) <= tol


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("classes", [21, 40])
def test_upsampled_cross_entropy_over_several_class_slices(device, backend, classes):
    # more classes than one channel slice of the kernels (Triton: 16), the last one partial
    pred, _ = make("cross_entropy", (2, classes, 4, 6), torch.float32, device)
    _, target = make("cross_entropy", (2, classes, 9, 13), torch.float32, device)
    loss = dense_loss(pred, target, "cross_entropy", upsample=True, backend=backend)
    up = F.interpolate(pred.double(), size=(9, 13), mode="bilinear", align_corners=False)
    ref = dense_loss(up, target, "cross_entropy", backend="reference")
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert rel_err(grad_of(loss, pred), grad_of(ref, pred)) <= 1e-5


@pytest.mark.parametrize("device,backend", [("cpu", "reference"), *CASES])
@pytest.mark.parametrize("kind", KINDS)
def test_upsampled_channels_last_prediction(device, backend, kind):
    """A channels_last prediction (a model run in channels_last) upsampled inside the loss: the same
    loss and gradient as the NCHW one (the reference backend used to raise for 3-D class targets)."""
    pred, _ = make(kind, (2, 3, 5, 7), torch.float32, device)
    _, target = make(kind, (2, 3, 11, 13), torch.float32, device)
    pw = 0.95 if kind == "balanced_bce" else None
    nhwc = pred.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    loss = dense_loss(nhwc, target, kind, pos_weight=pw, upsample=True, backend=backend)
    want = dense_loss(pred, target, kind, pos_weight=pw, upsample=True, backend=backend)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_of(loss, nhwc), grad_of(want, pred), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_upsampled_is_fused(device, backend, kind, monkeypatch):
    """The fused backends resize inside the loss (no full-size prediction): F.interpolate is never
    called, a channels_last prediction gets its gradient in its own layout, and a prediction larger
    than the target (downsampling) works as F.interpolate does."""

    def no_interpolate(*args, **kwargs):
        raise AssertionError("the fused path called F.interpolate")

    pw = 0.95 if kind == "balanced_bce" else None
    for (h, w), (H, W) in (((4, 6), (16, 24)), ((9, 11), (5, 7))):
        pred, _ = make(kind, (2, 4, h, w), torch.float64, device)
        pred = pred.detach().to(memory_format=torch.channels_last).requires_grad_()
        _, target = make(kind, (2, 4, H, W), torch.float64, device)
        up = F.interpolate(pred, size=(H, W), mode="bilinear", align_corners=False)
        ref = dense_loss(up, target, kind, pos_weight=pw, backend="reference")
        with monkeypatch.context() as m:
            m.setattr(F, "interpolate", no_interpolate)
            loss = dense_loss(pred, target, kind, pos_weight=pw, upsample=True, backend=backend)
            g = grad_of(loss, pred)
        assert abs(loss.item() - ref.item()) <= 1e-10 * max(1.0, abs(ref.item()))
        assert g.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(g, grad_of(ref, pred)) <= 1e-10


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_upsampled_alerts_under_deterministic_algorithms(backend):
    """On a GPU the gradient is gathered by atomic adds: an error under use_deterministic_algorithms,
    a warning with warn_only, as for F.interpolate's own backward there."""
    pred, _ = make("l1", (2, 1, 4, 6), torch.float32, "cuda")
    _, target = make("l1", (2, 1, 8, 12), torch.float32, "cuda")
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="deterministic implementation"):
            dense_loss(pred, target, "l1", upsample=True, backend=backend)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="deterministic implementation"):
            dense_loss(pred, target, "l1", upsample=True, backend=backend)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upsampled_gradcheck(backend):
    for kind in KINDS:
        pred, _ = make(kind, (2, 3, 2, 3), torch.float64, scale=1.0)
        _, target = make(kind, (2, 3, 5, 7), torch.float64)
        pw = 0.95 if kind == "balanced_bce" else None
        assert torch.autograd.gradcheck(
            lambda p, t=target, k=kind, w=pw: dense_loss(p, t, k, pos_weight=w, upsample=True, backend=backend), (pred,)
        )


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_module_finishes_every_task_together(backend):
    """The per-task means and the weighted total come from one stack of every task's sums: the
    same as dense_loss task by task; tasks of different accumulation types (fp64 and fp32) go one
    by one; weights changed after a call are used at the next."""
    preds, targets = batch(NYUD)
    loss = mk.nn.DenseMultiTaskLoss(list(NYUD), {"semseg": 1.0, "depth": 2.0, "normals": 10.0, "edge": 50.0})
    loss.backend = backend
    for mixed in (False, True):
        if mixed:
            preds["depth"] = preds["depth"].detach().double().requires_grad_()
        total, parts = loss(preds, targets)
        for t in NYUD:
            kind, pos_weight = TASK_KINDS[t]
            want = dense_loss(preds[t], targets[t], kind, pos_weight=pos_weight, backend=backend)
            assert parts[t].dtype == want.dtype
            torch.testing.assert_close(parts[t], want, rtol=1e-6, atol=0)
        want_total = sum(loss.weights[t] * parts[t].double() for t in NYUD)
        torch.testing.assert_close(total.double(), want_total, rtol=1e-6, atol=0)
        grads = torch.autograd.grad(total, [preds[t] for t in NYUD])
        for t, g in zip(NYUD, grads):
            kind, pos_weight = TASK_KINDS[t]
            one = dense_loss(preds[t], targets[t], kind, pos_weight=pos_weight, backend=backend)
            (want_g,) = torch.autograd.grad(loss.weights[t] * one, preds[t])
            assert rel_err(g, want_g) <= 1e-5, t
    preds["depth"] = preds["depth"].detach().float().requires_grad_()
    total, _ = loss(preds, targets)
    loss.weights["depth"] = 3.0
    total_again, parts = loss(preds, targets)
    torch.testing.assert_close(total_again.double() - total.double(), parts["depth"].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_compiles(backend):
    preds, targets = batch(NYUD)
    loss = mk.nn.DenseMultiTaskLoss(list(NYUD), mk.balancing.Fixed.preset("nyud"), backend=backend, check_targets=False)
    total, _ = torch.compile(loss, fullgraph=True, backend="aot_eager")(preds, targets)
    want, _ = loss(preds, targets)
    torch.testing.assert_close(total, want)
    plain = mk.nn.DenseMultiTaskLoss(list(NYUD), {t: 1.0 for t in NYUD}, backend=backend, check_targets=False)
    total, _ = torch.compile(plain, fullgraph=True, backend="aot_eager")(preds, targets)
    torch.testing.assert_close(total, plain(preds, targets)[0])


def test_module_upsamples_when_asked():
    tasks = {"semseg": 5, "depth": 1}
    preds, targets = batch(tasks, size=(8, 12), pred_size=(4, 6))
    with pytest.raises(ValueError, match="pass upsample=True"):
        mk.nn.DenseMultiTaskLoss(list(tasks))(preds, targets)
    total, parts = mk.nn.DenseMultiTaskLoss(list(tasks), upsample=True)(preds, targets)
    up = F.interpolate(preds["semseg"], size=(8, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(parts["semseg"], dense_loss(up, targets["semseg"], "cross_entropy"))
    total.backward()
    assert preds["semseg"].grad.shape == (2, 5, 4, 6)


def test_module_task_kinds_map_names():
    preds, targets = batch({"semseg": 4})
    loss = mk.nn.DenseMultiTaskLoss({"seg_a": "semseg"})
    total, parts = loss({"seg_a": preds["semseg"]}, {"seg_a": targets["semseg"]})
    assert torch.allclose(total, dense_loss(preds["semseg"], targets["semseg"], "cross_entropy"))


def test_module_with_a_balancer():
    class Halve(torch.nn.Module):
        tasks = ["semseg", "depth"]

        def forward(self, losses):
            return 0.5 * (losses["semseg"] + losses["depth"]), {}

    preds, targets = batch({"semseg": 4, "depth": 1})
    total, parts = mk.nn.DenseMultiTaskLoss(["semseg", "depth"], Halve())(preds, targets)
    assert torch.allclose(total, 0.5 * (parts["semseg"] + parts["depth"]))


def test_module_bad_input():
    with pytest.raises(ValueError, match="unknown kind 'segmentation'"):
        mk.nn.DenseMultiTaskLoss({"a": "segmentation"})
    with pytest.raises(ValueError, match=r"missing \['depth'\], unknown \['sal'\]"):
        mk.nn.DenseMultiTaskLoss(["semseg", "depth"], {"semseg": 1.0, "sal": 1.0})
    for w in (float("nan"), -1.0, "a", True):
        with pytest.raises(ValueError, match="the weight of task 'depth' must be a finite number >= 0"):
            mk.nn.DenseMultiTaskLoss(["semseg", "depth"], {"semseg": 1.0, "depth": w})
    with pytest.raises(TypeError, match="edge_pos_weight must be a number"):
        mk.nn.DenseMultiTaskLoss(["edge"], edge_pos_weight="0.9")
    with pytest.raises(TypeError, match="upsample must be True or False"):
        mk.nn.DenseMultiTaskLoss(["depth"], upsample="no")
    with pytest.raises(TypeError, match="group_tasks must be True, False or None"):
        mk.nn.DenseMultiTaskLoss(["depth"], group_tasks="yes")
    loss = mk.nn.DenseMultiTaskLoss(["semseg", "depth"])
    preds, targets = batch({"semseg": 4, "depth": 1})
    with pytest.raises(KeyError, match=r"targets lack tasks \['depth'\]"):
        loss(preds, {"semseg": targets["semseg"]})
    with pytest.raises(KeyError, match=r"unknown tasks \['edge'\]"):
        loss({**preds, "edge": preds["depth"]}, targets)
    targets["semseg"][0, 0, 0, 0] = 9
    with pytest.raises(ValueError, match="task 'semseg'.*class indices that are neither"):
        loss(preds, targets)
    targets["semseg"][0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="task 'depth'.*target must have pred's shape"):
        loss(preds, {**targets, "depth": targets["depth"].expand(2, 2, 6, 8)})
    with pytest.raises(ValueError, match="task 'depth'.*pass upsample=True"):
        loss(preds, {**targets, "depth": targets["depth"][:, :, :, :3]})


def test_weight_vectors_cache_is_bounded():
    # Weights changed at every step (a schedule) must not leave a tensor per step behind.
    ops_dense_loss = importlib.import_module("mtl_kernels.ops.dense_loss")  # the module, not the function
    for step in range(3 * ops_dense_loss._FIXED_VECTORS_KEPT):
        v = ops_dense_loss.fixed_vector((1.0, float(step)), torch.device("cpu"))
        assert v.tolist() == [1.0, float(step)]
    assert len(ops_dense_loss._fixed_vectors) <= ops_dense_loss._FIXED_VECTORS_KEPT
