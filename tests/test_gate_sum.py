"""gate_sum: every fused backend against the reference, forward and backward, and bad input."""

import pytest
import torch
from conftest import fused_backends

from mtl_kernels.ops import gate_sum
from mtl_kernels.ops.gate_sum import IMPLEMENTED

BACKENDS = [b for b in fused_backends("cpu") if b in IMPLEMENTED]
CASES = [("cpu", b) for b in BACKENDS] + [
    pytest.param("cuda", b, marks=pytest.mark.cuda) for b in ("cuda", "triton") if b in IMPLEMENTED
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def padnet_inputs(T, shape, dtype, device, layout="contiguous", residuals=True, affine=False):
    """PAD-Net's pattern: each source a's stacked conv output holds (feature, gate) for every target t != a."""
    B, C, H, W = shape
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    stacked, feats, gates, targets = [], [], [], []
    for a in range(T):
        s = torch.randn(B, 2 * (T - 1) * C, H, W, device=device).to(dtype).to(memory_format=fmt).requires_grad_()
        stacked.append(s)
        for k, t in enumerate(t for t in range(T) if t != a):
            feats.append(s[:, 2 * k * C : (2 * k + 1) * C])
            gates.append(s[:, (2 * k + 1) * C : (2 * k + 2) * C])
            targets.append(t)
    res = (
        [torch.randn(B, C, H, W, device=device).to(dtype).to(memory_format=fmt).requires_grad_() for _ in range(T)]
        if residuals
        else []
    )
    pd = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 BN params with half features
    aff = [torch.randn(C, device=device, dtype=pd, requires_grad=True) for _ in range(2)] if affine else [None, None]
    return stacked, res, feats, gates, targets, aff


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(T, shape, dtype, device, backend, **kw):
    stacked, res, feats, gates, targets, (scale, shift) = padnet_inputs(T, shape, dtype, device, **kw)
    outs = gate_sum(res, feats, gates, targets, T, scale, shift, backend=backend)
    refs = gate_sum(
        [r.double() for r in res],
        [f.double() for f in feats],
        [g.double() for g in gates],
        targets,
        T,
        None if scale is None else scale.double(),
        None if shift is None else shift.double(),
        backend="reference",
    )
    for o, r in zip(outs, refs):
        assert o.dtype == dtype and o.shape == r.shape
        assert rel_err(o, r) <= TOL[dtype]
    leaves = stacked + res + [v for v in (scale, shift) if v is not None]
    grads_out = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, leaves, grads_out)
    ref_outs = gate_sum(res, feats, gates, targets, T, scale, shift, backend="reference")
    want = torch.autograd.grad(ref_outs, leaves, grads_out)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= max(TOL[dtype], 1e-5 if dtype == torch.float32 else TOL[dtype])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("T", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residuals", [True, False])
@pytest.mark.parametrize("affine", [False, True])
def test_matches_reference(device, backend, T, dtype, layout, residuals, affine):
    check(T, (2, 3, 7, 5), dtype, device, backend, layout=layout, residuals=residuals, affine=affine)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled CPU kernels")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("residuals", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_whole_image_rows(threads, T, residuals, dtype):
    """With at least two images per thread and no affine, the CPU forward runs one row per NCHW image
    (channels and pixels merged); the same results as the reference, and as the per-plane path that
    a view whose planes are not back to back (here narrowed along W) keeps."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(T, (2 * threads, 3, 7, 5), dtype, "cpu", "cpu", residuals=residuals)
        wide = [torch.randn(2 * threads, 3, 7, 9, dtype=dtype) for _ in range(2 * T)]
        feats, gates = [w[..., 2:7] for w in wide[:T]], [w[..., 1:6] for w in wide[T:]]
        outs = gate_sum(None, feats, gates, list(range(T)), T, backend="cpu")
        refs = gate_sum(None, feats, gates, list(range(T)), T, backend="reference")
        for o, r in zip(outs, refs):
            assert rel_err(o, r) <= TOL[dtype]
        if threads == 1:  # B=2 images: backward_out into the stacked slices takes whole-image rows too
            test_backward_out_writes_into_stacked_slices("cpu", "cpu", "contiguous", False)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled CPU kernels")
@pytest.mark.parametrize(
    "dtype,layout,affine,threads",
    [
        (torch.float32, "contiguous", False, 1),  # one thread, two images: whole-image NCHW rows
        (torch.float32, "contiguous", False, 2),  # per-plane NCHW rows
        (torch.float32, "channels_last", True, 2),
        (torch.bfloat16, "contiguous", True, 2),
        (torch.bfloat16, "channels_last", False, 2),
    ],
)
def test_cpu_streamed_outputs(dtype, layout, affine, threads):
    """Calls that move more than 64 MiB write their outputs with streaming stores, staged in
    128-element chunks (csrc/cpu/stream_store.h). Here 4M-element planes (T=3: 18 planes forward,
    27 backward) take that path, in rows whose lengths (127 x 131 pixels, 61 channels) leave
    unaligned heads and partial chunks; the results equal the reference, and backward_out into
    a stacked gradient's slices equals the allocating backward."""
    from mtl_kernels.ops.gate_sum import fused_ops

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_streamed((2, 61, 131, 127), dtype, layout, affine, fused_ops("cpu"))
    finally:
        torch.set_num_threads(old)


def _check_streamed(shape, dtype, layout, affine, ops):
    check(3, shape, dtype, "cpu", "cpu", layout=layout, affine=affine)
    stacked, _, feats, gates, targets, (scale, shift) = padnet_inputs(3, shape, dtype, "cpu", layout, affine=affine)
    feats, gates = [f.detach() for f in feats], [g.detach() for g in gates]
    scale, shift = (None, None) if scale is None else (scale.detach(), shift.detach())
    grad_outs = [torch.randn_like(feats[0]) for _ in range(3)]
    _, backward, backward_out = ops
    want_f, want_g, _, _ = backward(grad_outs, feats, gates, targets, scale, shift)
    grads = [torch.full_like(s, float("nan")) for s in stacked]
    C = shape[1]
    into_f = [grads[i // 2][:, 2 * (i % 2) * C : (2 * (i % 2) + 1) * C] for i in range(len(feats))]
    into_g = [grads[i // 2][:, (2 * (i % 2) + 1) * C : (2 * (i % 2) + 2) * C] for i in range(len(feats))]
    backward_out(grad_outs, feats, gates, targets, scale, shift, into_f, into_g)
    for got, want in zip(into_f + into_g, list(want_f) + list(want_g)):
        assert torch.equal(got, want)
    # an output no pair targets: its residual, copied out through the same staging
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    res = [torch.randn(shape).to(dtype).contiguous(memory_format=fmt) for _ in range(4)]
    outs = gate_sum(res, feats, gates, targets, 4, scale, shift, backend="cpu")
    assert torch.equal(outs[3], res[3])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [False, True])
def test_half_storage(device, backend, dtype, layout, affine):
    check(3, (2, 8, 6, 10), dtype, device, backend, layout=layout, affine=affine)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_strided_along_the_outputs_rows(device, backend, dtype):
    """NCHW residuals (so NCHW output rows) with channels_last feature/gate slices: the CPU's
    bf16/fp16 rows widen strided inputs and narrow into strided gradients."""
    stacked, res, feats, gates, targets, (scale, shift) = padnet_inputs(
        3, (2, 8, 6, 10), dtype, device, layout="channels_last", affine=True
    )
    res = [r.detach().contiguous().requires_grad_() for r in res]
    outs = gate_sum(res, feats, gates, targets, 3, scale, shift, backend=backend)
    refs = gate_sum(res, feats, gates, targets, 3, scale, shift, backend="reference")
    for o, r in zip(outs, refs):
        assert o.is_contiguous() and rel_err(o, r) <= TOL[dtype]
    grads_out = [torch.randn_like(o) for o in outs]
    leaves = [*stacked, *res, scale, shift]
    got = torch.autograd.grad(outs, leaves, grads_out)
    want = torch.autograd.grad(refs, leaves, grads_out)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOL[dtype]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_conversions_are_exact(device, backend, dtype, layout):
    """Every bit pattern of the half type through the widened rows. With saturated gates
    (sigmoid(100) is 1 in fp32) each output is residual + feature summed in fp32 and
    rounded once to nearest even, and the feature gradient is grad_out, both exactly:
    ties, infinities, subnormals and the largest values included; NaN stays NaN."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    shape = (1, 8, 91, 91)  # odd rows: vector body and scalar tail
    patterns = torch.arange(shape[0] * shape[1] * shape[2] * shape[3]) % 65536 - 32768
    every = patterns.to(torch.int16).view(dtype).reshape(shape)
    # Triton's interpreter reads bf16 subnormals wrongly (-9.2e-41 as -0.0) and truncates
    # float to bf16 instead of rounding: there, no subnormals and one ulp of slack
    interpreted_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    if interpreted_bf16:
        every = torch.where(every.abs() < torch.finfo(dtype).tiny, 0, every)
    every = every.to(device).contiguous(memory_format=fmt)
    res = [every, every.flip(-1)]
    feats = [every.flip(-2).requires_grad_(), every.flip(-3).requires_grad_()]
    gates = [torch.full_like(every, 100.0) for _ in range(2)]
    outs = gate_sum(res, feats, gates, [1, 0], 2, backend=backend)

    def same(got, want, ulp=0):
        assert torch.equal(got.isnan(), want.isnan())
        keep = ~want.isnan() & (want != 0)  # the sign of a zero sum may differ
        assert (got[want == 0] == 0).all()
        if ulp:
            torch.testing.assert_close(got[keep], want[keep], rtol=ulp, atol=0)
        else:
            assert torch.equal(got[keep], want[keep])

    for o, r, f in zip(outs, res, feats[::-1]):  # feats[0] feeds output 1
        same(o, (r.float() + f.detach().float()).to(dtype), ulp=2**-7 if interpreted_bf16 else 0)
    grad_outs = [every.flip(-1, -2), every.flip(-2, -3)]
    got = torch.autograd.grad(outs, feats, grad_outs)
    for g, w in zip(got, grad_outs[::-1]):
        same(g, w)


@pytest.mark.parametrize("device,backend", CASES)
def test_gradcheck_and_opcheck(device, backend):
    _, res, feats, gates, targets, (scale, shift) = padnet_inputs(2, (1, 2, 3, 4), torch.float64, device, affine=True)
    scale, shift = scale.detach().double().requires_grad_(), shift.detach().double().requires_grad_()
    n = len(feats)

    def f(*ts):
        return gate_sum(ts[:2], ts[2 : 2 + n], ts[2 + n : 2 + 2 * n], targets, 2, ts[-2], ts[-1], backend=backend)

    leaves = [r.detach().requires_grad_() for r in res] + [x.detach().clone().requires_grad_() for x in feats + gates]
    assert torch.autograd.gradcheck(f, (*leaves, scale, shift))
    op = torch.ops.mtl_kernels.gate_sum_triton if backend == "triton" else torch.ops.mtl_kernels.gate_sum
    torch.library.opcheck(op, ([r.detach() for r in res], feats, gates, targets, 2, scale, shift))
    torch.library.opcheck(op, ([], feats, gates, targets, 2, None, None))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [False, True])
def test_backward_out_writes_into_stacked_slices(device, backend, layout, affine):
    """backward_out, writing into channel slices of one stacked gradient per source
    (what MultiModalDistillation does), equals the allocating backward."""
    from mtl_kernels.ops.gate_sum import fused_ops

    stacked, _, feats, gates, targets, (scale, shift) = padnet_inputs(
        3, (2, 4, 5, 6), torch.float32, device, layout=layout, affine=affine
    )
    feats, gates = [f.detach() for f in feats], [g.detach() for g in gates]
    scale, shift = (None, None) if scale is None else (scale.detach(), shift.detach())
    grad_outs = [torch.randn_like(feats[0]) for _ in range(3)]
    _, backward, backward_out = fused_ops(backend)
    want_f, want_g, want_scale, want_shift = backward(grad_outs, feats, gates, targets, scale, shift)
    grads = [torch.full_like(s, float("nan")) for s in stacked]  # every channel must be written
    C = feats[0].shape[1]
    into_f = [grads[i // 2][:, 2 * (i % 2) * C : (2 * (i % 2) + 1) * C] for i in range(len(feats))]
    into_g = [grads[i // 2][:, (2 * (i % 2) + 1) * C : (2 * (i % 2) + 2) * C] for i in range(len(feats))]
    got_scale, got_shift = backward_out(grad_outs, feats, gates, targets, scale, shift, into_f, into_g)
    assert all(torch.isfinite(g).all() for g in grads)
    for got, want in zip(into_f + into_g, list(want_f) + list(want_g)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_scale, want_scale)
    torch.testing.assert_close(got_shift, want_shift)
    torch.library.opcheck(backward_out, (grad_outs, feats, gates, targets, scale, shift, into_f, into_g))
    with pytest.raises((RuntimeError, ValueError), match="one tensor per pair"):
        backward_out(grad_outs, feats, gates, targets, scale, shift, into_f[:1], into_g)
    with pytest.raises((RuntimeError, ValueError), match="match feats in shape|has shape"):
        backward_out(grad_outs, feats, gates, targets, scale, shift, [f[:, :1] for f in into_f], into_g)
    wide = torch.empty(2, 4, 5, 12, device=device)[..., :6]  # H and W do not merge
    with pytest.raises((RuntimeError, ValueError), match="mergeable"):
        backward_out(grad_outs, feats, gates, targets, scale, shift, [wide] * len(feats), into_g)


@pytest.mark.parametrize("device,backend", CASES)
def test_extreme_gates_stay_finite(device, backend):
    _, res, feats, gates, targets, _ = padnet_inputs(2, (1, 2, 3, 3), torch.float32, device)
    gates = [torch.full_like(g, v) for g, v in zip(gates, (-1e4, 1e4))]
    outs = gate_sum(res, feats, gates, targets, 2, backend=backend)
    assert all(torch.isfinite(o).all() for o in outs)


def test_bad_input():
    _, res, feats, gates, targets, _ = padnet_inputs(2, (1, 2, 3, 3), torch.float32, "cpu")
    with pytest.raises(ValueError, match="same length"):
        gate_sum(res, feats, gates[:1], targets, 2)
    with pytest.raises(ValueError, match=r"targets\[0\] = 5 is not an output index"):
        gate_sum(res, feats, gates, [5] + targets[1:], 2)
    with pytest.raises(TypeError, match=r"targets\[1\] must be an int \(an output index\), got 0.5"):
        gate_sum(res, feats, gates, [targets[0], 0.5, *targets[2:]], 2)
    with pytest.raises(ValueError, match="num_outputs is required"):
        gate_sum(None, feats, gates, targets)
    with pytest.raises(ValueError, match=r"gates\[1\] has shape"):
        gate_sum(res, feats, [gates[0], gates[1][:, :1]], targets, 2)
    with pytest.raises(ValueError, match=r"scale must be a tensor of shape \[C\] = \[2\]"):
        gate_sum(res, feats, gates, targets, 2, torch.ones(3))
    with pytest.raises(TypeError, match=r"feats\[1\] has dtype torch.float64"):
        gate_sum(res, [feats[0], feats[1].double()], gates, targets, 2)
