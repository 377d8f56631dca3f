"""The Triton wrappers' GPU launch plans, run under the interpreter and checked against the reference.

On CPU tensors the wrappers pick interpreter plans (few big tiles and programs). For CUDA tensors
cross_stitch, gate_sum (with the affine's sums) and nddr pick other tiles, chunkings and grids: a
few programs per SM, 2K-element tiles, 64-row GEMM tiles. (dense_loss, gram and combine, and
gate_sum without the affine, plan alike for both.) test_triton_sm90.py compiles those launches for
sm_90 but cannot run them. Here mtl_kernels.triton._device answers as for an H100 (on_gpu, 132
SMs), so the CPU tensors get the CUDA plans and the interpreter runs them: every tile and chunk
boundary, partial buffer and reduction of the GPU plan is checked, forward and backward. What only
the GPU does (tf32 tl.dot, warps, the compiled code) is not; shapes are small, with rows longer
than one GPU tile.
"""

import contextlib

import pytest
import torch

from mtl_kernels import _backend
from mtl_kernels.ops import cross_stitch, gate_sum, nddr

pytestmark = pytest.mark.skipif(
    "triton" not in _backend.available_backends() or not _backend._INTERPRET,
    reason="needs Triton under TRITON_INTERPRET=1",
)

H100_SMS = 132
FMT = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (B, C, H, W): H*W = 2400, past the GPU plans' 2048-element elementwise tiles; ragged rows
SHAPE = (2, 6, 48, 50)
# 17 tiles of 64 channels_last rows: with 1 SM's 8 programs, 3 tiles a chunk and 6 chunks, not 8
TRIMMED = (2, 6, 17, 32)
SMALL = (2, 20, 9, 13)  # the GEMMs (NDDR): a few 64-row tiles, channels past one 16-wide tile


@pytest.fixture(params=[H100_SMS, 1], ids=["132sms", "1sm"])
def gpu_plans(monkeypatch, request):
    """The CUDA plans; with 1 SM, few programs, so each chunk takes several tiles."""
    from mtl_kernels.triton import _device

    asked = []
    monkeypatch.setattr(_device, "on_gpu", lambda device: asked.append(device) or True)
    monkeypatch.setattr(_device, "num_sms", lambda device: request.param)
    monkeypatch.setattr(_device, "device_guard", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_device, "upload", lambda ts, device: ts)
    yield
    assert asked, "the wrappers never asked for the device's plan"


def leaves(n, shape, layout, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=FMT[layout]).requires_grad_()
        for _ in range(n)
    ]


def both(fn, inputs):
    """fn's outputs and the gradients of every input (random output gradients from a fixed seed)."""
    outs = fn(*inputs)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    return [o.detach() for o in outs], torch.autograd.grad(outs, inputs, grads, allow_unused=True)


def assert_same(got, want, tol):
    (go, gg), (wo, wg) = got, want
    for a, b in [*zip(go, wo), *zip(gg, wg)]:
        if b is None:
            assert a is None or not a.any()
            continue
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err <= tol, err


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("shape", [SHAPE, TRIMMED])
def test_cross_stitch(gpu_plans, layout, T, shape):
    xs = leaves(T, shape, layout)
    alpha = torch.randn(T, T, shape[1], requires_grad=True)
    inputs = [*xs, alpha]

    def run(backend):
        return lambda *a: cross_stitch(list(a[:T]), a[T], backend=backend)

    assert_same(both(run("triton"), inputs), both(run("reference"), inputs), 1e-5)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [True])  # without it, one plan for every device
@pytest.mark.parametrize("shape", [SHAPE, TRIMMED])
def test_gate_sum(gpu_plans, layout, affine, shape):
    T = 3
    targets = [t for a in range(T) for t in range(T) if t != a]
    n = len(targets)
    feats, gates, res = leaves(n, shape, layout, seed=0), leaves(n, shape, layout, seed=1), leaves(T, shape, layout)
    aff = [torch.randn(shape[1], requires_grad=True) for _ in range(2)] if affine else []
    inputs = [*feats, *gates, *res, *aff]

    def run(backend):
        def f(*a):
            scale, shift = (a[-2], a[-1]) if affine else (None, None)
            return gate_sum(a[2 * n : 2 * n + T], a[:n], a[n : 2 * n], targets, T, scale, shift, backend=backend)

        return f

    assert_same(both(run("triton"), inputs), both(run("reference"), inputs), 1e-5)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nddr(gpu_plans, layout, training, dtype):
    T, C = 2, SMALL[1]
    xs = leaves(T, SMALL, layout, dtype)
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(T, C, T * C, generator=g) / (T * C) ** 0.5).to(dtype).requires_grad_()
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    bn_w = (1 + 0.1 * torch.randn(T, C, generator=g)).to(pd).requires_grad_()
    bn_b = (0.1 * torch.randn(T, C, generator=g)).to(pd).requires_grad_()
    stats = {}
    inputs = [*xs, w, bn_w, bn_b]

    def run(backend):
        mean, var = torch.zeros(T, C, dtype=pd), torch.ones(T, C, dtype=pd) * 1.5
        stats[backend] = (mean, var)
        return lambda *a: nddr(list(a[:T]), a[T], a[T + 1], a[T + 2], mean, var, training, backend=backend)

    # the GPU plans' tl.dot is fp32 here (the interpreter), so fp32 is held to fp32 accuracy
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_same(both(run("triton"), inputs), both(run("reference"), inputs), tol)
    for a, b in zip(stats["triton"], stats["reference"]):  # running statistics updated alike
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
