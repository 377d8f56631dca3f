"""gram and combine (the multi-tensor ops of gradient balancing): every fused backend against a
float64 computation on flattened gradients, and bad input."""

import pytest
import torch
from conftest import fused_backends

from mtl_kernels.ops import combine, gram
from mtl_kernels.ops.gram import IMPLEMENTED

BACKENDS = [b for b in fused_backends("cpu") if b in IMPLEMENTED]
CASES = [("cpu", b) for b in ["reference", *BACKENDS]] + [
    pytest.param("cuda", b, marks=pytest.mark.cuda) for b in ("cuda", "triton")
]
SHAPES = [(8, 3, 3, 3), (8,), (130, 70), (1,), (5, 1, 7)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def task_grads(T, dtype, device, shapes=SHAPES):
    return [[torch.randn(s, device=device).to(dtype) for s in shapes] for _ in range(T)]


def flat(task):
    return torch.cat([g.double().reshape(-1) for g in task])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gram(device, backend, T, dtype):
    grads = task_grads(T, dtype, device)
    G = gram(grads, backend=backend)
    M = torch.stack([flat(task) for task in grads])
    want = M @ M.T
    assert G.shape == (T, T) and G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(G, G.T)
    assert ((G.double() - want).abs().max() / want.abs().max()).item() <= TOL[dtype]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_combine(device, backend, T, dtype, accumulate):
    grads = task_grads(T, dtype, device)
    w = torch.randn(T, device=device)
    out = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
    start = [o.clone() for o in out]
    got = combine(w, grads, out, accumulate=accumulate, backend=backend)
    assert all(g is o for g, o in zip(got, out))  # written in place
    for k, o in enumerate(out):
        want = sum(w[t].double() * grads[t][k].double() for t in range(T))
        if accumulate:
            want = want + start[k].double()
        scale = want.abs().max().clamp_min(1.0)
        assert ((o.double() - want).abs().max() / scale).item() <= TOL[dtype], k


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combine_strided_weights(device, backend, dtype):
    # weights as a column of a table (stride 2): read by their strides, not as a dense vector
    grads = task_grads(3, dtype, device)
    table = torch.tensor([[1.0, 100.0], [2.0, 200.0], [-3.0, 300.0]], device=device, dtype=dtype)
    w = table[:, 0]
    out = combine(w, grads, backend=backend)
    for k, o in enumerate(out):
        want = sum(w[t].double() * grads[t][k].double() for t in range(3))
        assert ((o.double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item() <= TOL[dtype], k


@pytest.mark.parametrize("device,backend", CASES)
def test_combine_fresh_and_mixed_dtypes(device, backend):
    # tensors of different dtypes in one list (fp32 and bf16 parameters); out=None allocates
    grads = [[torch.randn(40, device=device), torch.randn(9, device=device).bfloat16()] for _ in range(3)]
    w = torch.tensor([1.0, -0.5, 2.0], device=device)
    out = combine(w, grads, backend=backend)
    assert [o.dtype for o in out] == [torch.float32, torch.bfloat16]
    for k in range(2):
        want = sum(w[t].double() * grads[t][k].double() for t in range(3))
        assert torch.allclose(out[k].double(), want, rtol=1e-2, atol=1e-2)
    G = gram(grads, backend=backend)
    M = torch.stack([flat(task) for task in grads])
    assert torch.allclose(G.double(), M @ M.T, rtol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_combine_into_another_dtype(device, backend, accumulate):
    # float32 .grad buffers of bfloat16 task gradients (and the other way round): out keeps its dtype
    grads = [[torch.randn(3000, device=device).bfloat16(), torch.randn(5, 7, device=device)] for _ in range(3)]
    out = [torch.randn(3000, device=device), torch.randn(5, 7, device=device).bfloat16()]
    before = [o.double() for o in out]
    w = torch.tensor([1.0, -0.5, 2.0], device=device)
    combine(w, grads, out, accumulate=accumulate, backend=backend)
    assert [o.dtype for o in out] == [torch.float32, torch.bfloat16]
    for k, tol in ((0, 1e-5), (1, 1e-2)):
        want = sum(w[t].double() * grads[t][k].double() for t in range(3)) + (before[k] if accumulate else 0)
        assert torch.allclose(out[k].double(), want, rtol=tol, atol=tol), k


@pytest.mark.parametrize("device,backend", [pytest.param("cuda", "auto", marks=pytest.mark.cuda)])
def test_more_tasks_than_the_cuda_kernels_unroll(device, backend):
    grads = [[torch.randn(100, device=device), torch.randn(3, 4, device=device)] for _ in range(9)]
    G = gram(grads, backend=backend)  # auto: Triton, as the CUDA kernels take at most 8
    M = torch.stack([flat(task) for task in grads])
    assert torch.allclose(G.double(), M @ M.T, rtol=1e-5)
    out = combine(torch.ones(9, device=device), grads, backend=backend)
    assert torch.allclose(out[0], sum(g[0] for g in grads), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at most 8 tasks"):
        gram(grads, backend="cuda")


@pytest.mark.parametrize("device,backend", CASES)
def test_block_boundaries_and_empty_tensors(device, backend):
    # around the CPU chunk (16384), the CUDA block chunk (2048) and the Triton block (1024)
    shapes = [(0,), (1,), (1023,), (1024,), (1025,), (2047,), (2049,), (16383,), (16384,), (16385,), (0, 3)]
    grads = task_grads(3, torch.float32, device, shapes)
    M = torch.stack([flat(task) for task in grads])
    assert torch.allclose(gram(grads, backend=backend).double(), M @ M.T, rtol=1e-5)
    w = torch.tensor([0.5, -1.0, 2.0], device=device)
    for k, o in enumerate(combine(w, grads, backend=backend)):
        assert o.shape == shapes[k]
        assert torch.allclose(o.double(), sum(w[t].double() * grads[t][k].double() for t in range(3)), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_gradients(backend):
    grads = [[torch.randn(6, 8)[:, ::2], torch.randn(5)] for _ in range(2)]
    M = torch.stack([flat(task) for task in grads])
    assert torch.allclose(gram(grads, backend=backend).double(), M @ M.T, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_layouts_read_in_place(backend, monkeypatch):
    """Gradients that share one dense layout (channels_last conv weights, a transposed matrix) are read
    and out written in place, with no copy; mixed layouts are copied and still right."""
    from mtl_kernels.ops.gram import task_major

    cl = torch.channels_last
    grads = [[torch.randn(8, 3, 3, 3).to(memory_format=cl), torch.randn(7, 5).T, torch.randn(4)] for _ in range(3)]
    w = torch.randn(3)
    M = torch.stack([flat(task) for task in grads])
    views, _ = task_major(grads)
    assert [v.data_ptr() for v in views] == [g.data_ptr() for task in grads for g in task]  # no copies
    out = [torch.randn(8, 3, 3, 3).to(memory_format=cl), torch.randn(7, 5).T, torch.randn(4)]
    start = [o.clone() for o in out]
    with monkeypatch.context() as m:  # and no copy on the way either
        m.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("copied a gradient"))
        G = gram(grads, backend=backend)
        got = combine(w, grads, out, accumulate=True, backend=backend)
        fresh = combine(w, grads, backend=backend)
    assert torch.allclose(G.double(), M @ M.T, rtol=1e-5)
    assert all(g is o for g, o in zip(got, out))
    assert out[0].is_contiguous(memory_format=cl) and fresh[0].is_contiguous(memory_format=cl)
    for k in range(3):
        want = sum(w[t].double() * grads[t][k].double() for t in range(3))
        assert torch.allclose(out[k].double(), want + start[k].double(), atol=1e-5), k
        assert torch.allclose(fresh[k].double(), want, atol=1e-5), k
    # One task's gradient in another layout: copied contiguous, same result; out must then be contiguous.
    mixed = [list(task) for task in grads]
    mixed[1][0] = mixed[1][0].contiguous()
    M = torch.stack([flat(task) for task in mixed])
    assert torch.allclose(gram(mixed, backend=backend).double(), M @ M.T, rtol=1e-5)
    with pytest.raises(ValueError, match=r"out\[0\] must be contiguous, or share one dense layout"):
        combine(w, mixed, [o.clone() for o in out], backend=backend)
    plain = [o.contiguous() for o in out]
    combine(w, mixed, plain, backend=backend)
    assert torch.allclose(plain[0].double(), sum(w[t].double() * mixed[t][0].double() for t in range(3)), atol=1e-5)


def test_bad_input():
    grads = task_grads(2, torch.float32, "cpu")
    with pytest.raises(TypeError, match="non-empty list of T per-task lists"):
        gram([])
    with pytest.raises(ValueError, match=r"grads\[1\] has 4 tensors, expected 5"):
        gram([grads[0], grads[1][:4]])
    with pytest.raises(ValueError, match=r"grads\[1\]\[2\] has shape \(70, 130\), expected \(130, 70\)"):
        gram([grads[0], [*grads[1][:2], grads[1][2].T, *grads[1][3:]]])
    with pytest.raises(TypeError, match=r"grads\[0\]\[1\] must be a tensor, got NoneType .*materialize_grads"):
        gram([[grads[0][0], None], [grads[1][0], grads[1][1]]])
    with pytest.raises(TypeError, match=r"grads\[1\]\[0\] has dtype torch.bfloat16, expected torch.float32"):
        gram([grads[0], [grads[1][0].bfloat16(), *grads[1][1:]]])
    with pytest.raises(ValueError, match=r"weights must be a tensor of shape \[T\] = \[2\]"):
        combine(torch.ones(3), grads)
    with pytest.raises(ValueError, match="out has 1 tensors, expected 5"):
        combine(torch.ones(2), grads, [torch.zeros(3)])
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        combine(torch.ones(2), grads, accumulate=True)
    with pytest.raises(ValueError, match="weights are on meta"):
        combine(torch.ones(2, device="meta"), grads)
