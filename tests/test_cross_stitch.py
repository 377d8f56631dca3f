"""Cross-stitch: every fused backend against the reference, the module, convert() and bad input."""

import copy

import pytest
import torch
from conftest import fused_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtl_kernels as mk
from mtl_kernels.ops import cross_stitch
from mtl_kernels.reference import CrossStitchUnit
from mtl_kernels.reference import cross_stitch as reference

CASES = [("cpu", b) for b in fused_backends("cpu")] + [
    pytest.param("cuda", b, marks=pytest.mark.cuda) for b in ("cuda", "triton")
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(T, shape, dtype, device, layout="contiguous", alpha_dtype=None):
    """T task features in `layout` and a random alpha, all requiring grad."""
    B, C, H, W = shape
    xs = []
    for _ in range(T):
        if layout == "channels_last":
            x = torch.randn(B, C, H, W, device=device).to(dtype).to(memory_format=torch.channels_last)
        elif layout == "strided":  # a channel slice of a wider tensor with every other column
            x = torch.randn(B, C + 2, H, 2 * W, device=device).to(dtype)[:, 1 : C + 1, :, ::2]
        else:
            x = torch.randn(B, C, H, W, device=device).to(dtype)
        xs.append(x.requires_grad_())
    alpha = torch.randn(T, T, C, device=device, dtype=alpha_dtype or dtype, requires_grad=True)
    return xs, alpha


def assert_close(actual, expected, dtype):
    tol = TOL[dtype]
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


def check_against_reference(xs, alpha, backend):
    """Forward and backward of `backend` equal the fp64 reference on the same (rounded) inputs."""
    ys = cross_stitch(xs, alpha, backend=backend)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    alpha64 = alpha.detach().double().requires_grad_()
    refs = reference(xs64, alpha64)
    assert len(ys) == len(xs)
    for y, r, x in zip(ys, refs, xs):
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert_close(y, r, x.dtype)
    grad_ys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, [*xs, alpha], grad_ys)
    refs_grad = torch.autograd.grad(refs, [*xs64, alpha64], [g.double() for g in grad_ys])
    for g, r, x in zip(grads, refs_grad, [*xs, alpha]):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert_close(g, r, xs[0].dtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_reference(device, backend, T, dtype, layout):
    xs, alpha = make_inputs(T, (2, 3, 7, 5), dtype, device, layout)
    check_against_reference(xs, alpha, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("T", [6, 8])
def test_many_tasks(device, backend, T):
    xs, alpha = make_inputs(T, (1, 5, 4, 3), torch.float32, device)
    check_against_reference(xs, alpha, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_storage_with_fp32_alpha(device, backend, dtype, layout):
    """Autocast-style: half/bf16 features, an fp32 alpha, fp32 accumulation."""
    xs, alpha = make_inputs(3, (2, 16, 9, 11), dtype, device, layout, alpha_dtype=torch.float32)
    check_against_reference(xs, alpha, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_larger_than_one_block(device, backend):
    """Rows longer than one block and more rows than threads: exercises the blocking and the reductions."""
    if backend == "triton" and device == "cpu":
        shape = (2, 33, 17, 19)  # the interpreter is slow
    else:
        shape = (3, 70, 31, 29)
    for layout in ("contiguous", "channels_last"):
        xs, alpha = make_inputs(3, shape, torch.float32, device, layout)
        check_against_reference(xs, alpha, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_output_layout_and_untouched_inputs(device, backend):
    xs, alpha = make_inputs(2, (2, 4, 3, 5), torch.float32, device, "channels_last")
    before = [x.detach().clone() for x in xs]
    ys = cross_stitch(xs, alpha, backend=backend)
    assert all(y.is_contiguous(memory_format=torch.channels_last) for y in ys)
    assert all(torch.equal(x, b) for x, b in zip(xs, before))
    xs, alpha = make_inputs(2, (2, 4, 3, 5), torch.float32, device, "strided")
    assert all(y.is_contiguous() for y in cross_stitch(xs, alpha, backend=backend))


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_batch(device, backend):
    xs, alpha = make_inputs(2, (0, 4, 3, 5), torch.float32, device)
    ys = cross_stitch(xs, alpha, backend=backend)
    assert [y.shape for y in ys] == [x.shape for x in xs]
    sum(y.sum() for y in ys).backward()
    assert torch.equal(alpha.grad, torch.zeros_like(alpha))


@pytest.mark.parametrize("device,backend", CASES)
def test_unused_output_gets_zero_gradient(device, backend):
    xs, alpha = make_inputs(3, (1, 2, 3, 3), torch.float64, device)
    ys = cross_stitch(xs, alpha, backend=backend)
    ys[1].sum().backward()  # ys[0] and ys[2] take no part
    expected = alpha.detach()[1]  # d(sum ys[1]) / d xs[j] = alpha[1, j, c]
    for j, x in enumerate(xs):
        assert torch.allclose(x.grad, expected[j].view(1, -1, 1, 1).expand_as(x))


@pytest.mark.parametrize("device,backend", CASES)
def test_gradcheck(device, backend):
    xs, alpha = make_inputs(3, (2, 3, 4, 5), torch.float64, device)
    assert torch.autograd.gradcheck(lambda *t: cross_stitch(t[:-1], t[-1], backend=backend), (*xs, alpha))


@pytest.mark.parametrize("device,backend", CASES)
def test_opcheck(device, backend):
    op = torch.ops.mtl_kernels.cross_stitch_triton if backend == "triton" else torch.ops.mtl_kernels.cross_stitch
    for layout in ("contiguous", "channels_last"):
        xs, alpha = make_inputs(3, (2, 3, 4, 5), torch.float32, device, layout)
        torch.library.opcheck(op, (xs, alpha))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 6),
    B=st.integers(1, 3),
    C=st.integers(1, 40),
    H=st.integers(1, 20),
    W=st.integers(1, 20),
    channels_last=st.booleans(),
)
def test_fuzz_shapes_cpu(T, B, C, H, W, channels_last):
    if "cpu" not in mk.available_backends():
        pytest.skip("compiled CPU kernels not built")
    xs, alpha = make_inputs(T, (B, C, H, W), torch.float64, "cpu", "channels_last" if channels_last else "contiguous")
    check_against_reference(xs, alpha, "cpu")


# ------------------------------------------------------------------ module


def survey_features(tasks, shape=(2, 4, 5, 6), dtype=torch.float32):
    return {t: torch.randn(*shape, dtype=dtype) for t in tasks}


@pytest.mark.parametrize("backend", ["reference", *fused_backends("cpu")])
def test_module_equals_survey_unit(backend):
    tasks = ["semseg", "depth", "normals"]
    survey = CrossStitchUnit(tasks, 4, alpha=0.8, beta=0.05)
    with torch.no_grad():
        for p in survey.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = mk.nn.CrossStitch(tasks, 4, backend=backend)
    fused.load_state_dict(survey.state_dict())
    feats = survey_features(tasks)
    out, expected = fused(feats), survey(feats)
    assert list(out) == tasks
    for t in tasks:
        torch.testing.assert_close(out[t], expected[t])


def test_module_init_and_state_dict_round_trip():
    unit = mk.nn.CrossStitch(["a", "b"], 3, alpha=0.9, beta=0.1)
    assert unit.alpha.shape == (2, 2, 3)
    assert torch.all(unit.alpha[0, 0] == 0.9) and torch.all(unit.alpha[0, 1] == torch.tensor(0.1))
    assert list(unit.state_dict()) == ["alpha"]
    other = mk.nn.CrossStitch(["a", "b"], 3, alpha=0.5, beta=0.5)
    other.load_state_dict(unit.state_dict())
    assert torch.equal(other.alpha, unit.alpha)


def test_module_loads_survey_keys_in_its_task_order():
    survey = CrossStitchUnit(["a", "b"], 3)
    with torch.no_grad():
        survey.cross_stitch_unit["a"]["b"].param.copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert "cross_stitch_unit.a.b.param" in survey.state_dict()
    unit = mk.nn.CrossStitch(["a", "b"], 3)
    unit.load_state_dict(survey.state_dict())
    assert torch.equal(unit.alpha[0, 1], torch.tensor([1.0, 2.0, 3.0]))


def test_module_rejects_incomplete_survey_state_dict():
    state = CrossStitchUnit(["a", "b"], 3).state_dict()
    del state["cross_stitch_unit.b.a.param"]
    with pytest.raises(RuntimeError, match="cross_stitch_unit.b.a.param"):
        mk.nn.CrossStitch(["a", "b"], 3).load_state_dict(state)


@pytest.mark.parametrize("backend", ["reference", *fused_backends("cpu")])
def test_module_compiles_fullgraph(backend):
    tasks = ["semseg", "depth"]
    unit = mk.nn.CrossStitch(tasks, 4, backend=backend)
    feats = {t: x.requires_grad_() for t, x in survey_features(tasks).items()}
    compiled = torch.compile(unit, fullgraph=True)
    out, expected = compiled(feats), unit(feats)
    for t in tasks:
        torch.testing.assert_close(out[t], expected[t])
    g_compiled = torch.autograd.grad(sum(o.sum() for o in out.values()), unit.alpha)
    g_eager = torch.autograd.grad(sum(o.sum() for o in expected.values()), unit.alpha)
    torch.testing.assert_close(g_compiled[0], g_eager[0])


def test_use_backend_context_and_available_backends():
    assert "reference" in mk.available_backends()
    feats = survey_features(["a", "b"])
    unit = mk.nn.CrossStitch(["a", "b"], 4)
    with mk.use_backend("reference"):
        out = unit(feats)
    expected = CrossStitchUnit(["a", "b"], 4)(feats)
    torch.testing.assert_close(out["a"], expected["a"])
    with pytest.raises(ValueError, match="backend must be one of"):
        with mk.use_backend("fast"):
            pass


# ----------------------------------------------------------------- convert


class SurveyNet(torch.nn.Module):
    """A tiny soft-sharing net in the survey's style: per-task convs, a cross-stitch between them."""

    def __init__(self, tasks):
        super().__init__()
        self.tasks = tasks
        self.convs = torch.nn.ModuleDict({t: torch.nn.Conv2d(3, 8, 3, padding=1) for t in tasks})
        self.stitch = torch.nn.ModuleList([CrossStitchUnit(tasks, 8)])

    def forward(self, x):
        feats = {t: torch.relu(self.convs[t](x)) for t in self.tasks}
        return self.stitch[0](feats)


@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_convert_swaps_survey_units_and_keeps_outputs(backend):
    tasks = ["semseg", "depth"]
    model = SurveyNet(tasks)
    with torch.no_grad():
        for p in model.stitch.parameters():
            p.add_(torch.randn_like(p))
    original = copy.deepcopy(model)
    converted = mk.convert(model, backend=backend)
    assert isinstance(converted.stitch[0], mk.nn.CrossStitch)
    assert not any(type(m).__name__ == "CrossStitchUnit" for m in converted.modules())
    x = torch.randn(2, 3, 6, 7)
    out, expected = converted(x), original(x)
    for t in tasks:
        torch.testing.assert_close(out[t], expected[t])


def test_convert_returns_fused_module_for_a_bare_unit():
    unit = CrossStitchUnit(["a", "b", "c"], 5).double().eval()
    fused = mk.convert(unit)
    assert isinstance(fused, mk.nn.CrossStitch)
    assert fused.tasks == ["a", "b", "c"] and fused.alpha.dtype == torch.float64 and not fused.training


# --------------------------------------------------------------- bad input


@pytest.fixture
def unit():
    return mk.nn.CrossStitch(["semseg", "depth"], 4)


def test_missing_task(unit):
    with pytest.raises(KeyError, match="lack task 'depth'"):
        unit({"semseg": torch.randn(1, 4, 2, 2)})


def test_unknown_task(unit):
    feats = {"semseg": torch.randn(1, 4, 2, 2), "depth": torch.randn(1, 4, 2, 2), "edge": torch.randn(1, 4, 2, 2)}
    with pytest.raises(KeyError, match="unknown task 'edge'"):
        unit(feats)


def test_wrong_channel_count(unit):
    with pytest.raises(ValueError, match=r"features\['depth'\] has 3 channels, expected 4"):
        unit({"semseg": torch.randn(1, 4, 2, 2), "depth": torch.randn(1, 3, 2, 2)})


def test_not_4d(unit):
    with pytest.raises(ValueError, match="4-D"):
        unit({"semseg": torch.randn(4, 2, 2), "depth": torch.randn(4, 2, 2)})


def test_shapes_disagree():
    with pytest.raises(ValueError, match=r"xs\[1\] has shape \(1, 4, 3, 2\), expected \(1, 4, 2, 2\)"):
        cross_stitch([torch.randn(1, 4, 2, 2), torch.randn(1, 4, 3, 2)], torch.randn(2, 2, 4))


def test_dtypes_disagree():
    with pytest.raises(TypeError, match=r"xs\[1\] has dtype torch.float64"):
        cross_stitch([torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2).double()], torch.randn(2, 2, 4))


def test_integer_features():
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        cross_stitch([torch.ones(1, 4, 2, 2, dtype=torch.int64)], torch.randn(1, 1, 4))


def test_devices_disagree():
    with pytest.raises(ValueError, match=r"xs\[1\] is on meta"):
        cross_stitch([torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2, device="meta")], torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="alpha is on meta"):
        cross_stitch([torch.randn(1, 4, 2, 2)], torch.randn(1, 1, 4, device="meta"))


def test_alpha_shape_and_dtype():
    xs = [torch.randn(1, 4, 2, 2) for _ in range(2)]
    with pytest.raises(ValueError, match=r"alpha must have shape \[T, T, C\] = \[2, 2, 4\], got \[3, 3, 4\]"):
        cross_stitch(xs, torch.randn(3, 3, 4))
    with pytest.raises(TypeError, match="alpha must have the features' dtype"):
        cross_stitch(xs, torch.randn(2, 2, 4, dtype=torch.float64))


def test_no_tasks():
    with pytest.raises(ValueError, match="at least one tensor"):
        cross_stitch([], torch.randn(0, 0, 4))
    with pytest.raises(ValueError, match="at least one task"):
        mk.nn.CrossStitch([], 4)
    with pytest.raises(ValueError, match="unique"):
        mk.nn.CrossStitch(["a", "a"], 4)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        mk.nn.CrossStitch(["a"], 0)


def test_backend_not_for_this_device():
    xs = [torch.randn(1, 4, 2, 2)]
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
        cross_stitch(xs, torch.randn(1, 1, 4), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        cross_stitch(xs, torch.randn(1, 1, 4), backend="gpu")


def test_compiled_op_checks_its_arguments():
    """Called directly, the C++ op checks too (no crash on a bad call)."""
    if "cpu" not in mk.available_backends():
        pytest.skip("compiled CPU kernels not built")
    with pytest.raises(RuntimeError, match="alpha must have shape"):
        torch.ops.mtl_kernels.cross_stitch([torch.randn(1, 4, 2, 2)], torch.randn(1, 1, 3))
    with pytest.raises(RuntimeError, match="at least one tensor"):
        torch.ops.mtl_kernels.cross_stitch([], torch.randn(1, 1, 3))


def test_auto_passes_over_a_backend_whose_task_limit_is_exceeded(monkeypatch):
    # As on a GPU machine: the CUDA kernels take at most 8 tasks (cross_stitch, gram, combine) or
    # 16 (nddr); "auto" takes Triton beyond, an explicit backend="cuda" is a clear error.
    monkeypatch.setattr(mk._backend, "_AVAILABLE", ("reference", "cuda", "triton"))
    cuda = torch.device("cuda")
    resolve = mk._backend.resolve
    assert resolve("auto", cuda, "cross_stitch", tasks=8, max_tasks={"cuda": 8}) == "cuda"
    assert resolve("auto", cuda, "cross_stitch", tasks=9, max_tasks={"cuda": 8}) == "triton"
    assert resolve(None, cuda, "cross_stitch", tasks=9, max_tasks={"cuda": 8}) == "triton"
    with pytest.raises(ValueError, match=r"backend 'cuda' takes at most 8 tasks, got 9"):
        resolve("cuda", cuda, "cross_stitch", tasks=9, max_tasks={"cuda": 8})
    monkeypatch.setattr(mk._backend, "_AVAILABLE", ("reference", "cuda"))
    assert resolve("auto", cuda, "cross_stitch", tasks=9, max_tasks={"cuda": 8}) == "reference"


@pytest.mark.cuda
def test_cuda_backend_rejects_more_than_eight_tasks():
    xs, alpha = make_inputs(9, (1, 2, 3, 3), torch.float32, "cuda")
    with pytest.raises(ValueError, match="at most 8 tasks"):
        cross_stitch(xs, alpha, backend="cuda")
    check_against_reference(xs, alpha, "auto")  # the Triton kernels take any T


def _fused_op_losses():
    """{op: loss(backend) -> (scalar, leaves)}: every fused op's autograd, on small inputs."""
    from mtl_kernels.ops import cross_stitch, dense_loss, gate_sum, nddr

    def leaves():
        x = [torch.randn(2, 3, 4, 5, requires_grad=True) for _ in range(2)]
        w = (torch.eye(6) + 0.1 * torch.randn(6, 6)).reshape(2, 3, 6).requires_grad_()
        return x, w, [torch.ones(2, 3, requires_grad=True), torch.zeros(2, 3, requires_grad=True)]

    def cs(b):
        x, _, _ = leaves()
        alpha = torch.rand(2, 2, 3, requires_grad=True)
        return sum(y.sum() for y in cross_stitch(x, alpha, backend=b)), [*x, alpha]

    def gs(b):
        x, _, _ = leaves()
        return gate_sum(None, [x[0]], [x[1]], [0], 1, backend=b)[0].sum(), x

    def nd(training):
        def run(b):
            x, w, bn = leaves()
            ys = nddr(x, w, *bn, torch.zeros(2, 3), torch.ones(2, 3), training, backend=b)
            return sum(y.sum() for y in ys), [*x, w, *bn]

        return run

    def dl(b):
        x, _, _ = leaves()
        return dense_loss(x[0], torch.randint(0, 3, (2, 4, 5)), "cross_entropy", backend=b), [x[0]]

    return {"cross_stitch": cs, "gate_sum": gs, "nddr": nd(True), "nddr eval": nd(False), "dense_loss": dl}


@pytest.mark.parametrize("op", list(_fused_op_losses()))
@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_double_backward_is_an_error_not_a_silent_zero(backend, op):
    # The fused backward kernels have no autograd of their own: a graph of the gradient
    # (create_graph=True) would treat them as constants. The reference differentiates twice.
    loss, leaves = _fused_op_losses()[op](backend)
    with pytest.raises(RuntimeError, match="double backward .* not supported by the fused backends"):
        torch.autograd.grad(loss, leaves, create_graph=True)
    loss, leaves = _fused_op_losses()[op]("reference")
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    assert any(g is not None and g.requires_grad for g in grads)


def test_bad_backend_is_an_error_at_construction():
    for make in (
        lambda b: mk.nn.CrossStitch(["a", "b"], 4, backend=b),
        lambda b: mk.nn.NDDR(["a", "b"], 4, backend=b),
        lambda b: mk.nn.MultiModalDistillation(["a", "b"], ["a", "b"], 4, backend=b),
        lambda b: mk.nn.MTANAttention(4, 2, 4, backend=b),
        lambda b: mk.nn.DenseMultiTaskLoss(["depth"], backend=b),
    ):
        with pytest.raises(ValueError, match="backend must be one of auto, reference, cpu, cuda, triton, got 'gpu'"):
            make("gpu")
        make(None), make("reference")


def test_convert_leaves_other_layouts_and_keeps_sharing():
    class CrossStitchUnit(torch.nn.Module):  # the survey's class name, another layout
        def __init__(self):
            super().__init__()
            self.cross_stitch_unit = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)})

    odd = CrossStitchUnit()
    assert mk.convert(odd) is odd
    survey = mk.reference.CrossStitchUnit(["a", "b"], 4, 0.9, 0.1)
    model = torch.nn.Sequential(survey, torch.nn.ReLU(), survey)  # one unit used twice
    model = mk.convert(model)
    assert isinstance(model[0], mk.nn.CrossStitch) and model[0] is model[2]
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.convert(model, backend="gpu")
