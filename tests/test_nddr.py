"""NDDR: every fused backend against the reference (training and eval mode), the module, convert() and bad input."""

import copy

import pytest
import torch
from conftest import fused_backends

import mtl_kernels as mk
from mtl_kernels.ops import nddr
from mtl_kernels.ops.nddr import IMPLEMENTED
from mtl_kernels.reference import NDDRLayer
from mtl_kernels.reference.nddr import nddr_init_weight

NDDR_BACKENDS = [b for b in fused_backends("cpu") if b in IMPLEMENTED]
CASES = [("cpu", b) for b in NDDR_BACKENDS] + [
    pytest.param("cuda", b, marks=pytest.mark.cuda) for b in ("cuda", "triton") if b in IMPLEMENTED
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


def make_inputs(T, shape, dtype, device, layout="contiguous", param_dtype=None):
    B, C, H, W = shape
    xs = []
    for _ in range(T):
        if layout == "channels_last":
            x = torch.randn(B, C, H, W, device=device).to(dtype).to(memory_format=torch.channels_last)
        elif layout == "strided":
            x = torch.randn(B, C + 2, H, 2 * W, device=device).to(dtype)[:, 1 : C + 1, :, ::2]
        else:
            x = torch.randn(B, C, H, W, device=device).to(dtype)
        xs.append(x.requires_grad_())
    pd = param_dtype or dtype
    weight = nddr_init_weight(T, C, 0.9, 0.1) + 0.2 * torch.randn(T, C, T * C)
    params = {
        "weight": weight.to(device, pd).requires_grad_(),
        "bn_weight": (1 + 0.2 * torch.randn(T, C)).to(device, pd).requires_grad_(),
        "bn_bias": (0.2 * torch.randn(T, C)).to(device, pd).requires_grad_(),
    }
    stats = {"running_mean": 0.1 * torch.randn(T, C), "running_var": 0.5 + torch.rand(T, C)}
    return xs, params, {k: v.to(device, pd) for k, v in stats.items()}


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def check_against_reference(xs, params, stats, training, backend):
    """Outputs, gradients and (training) updated running statistics equal the fp64 reference's."""
    dtype = xs[0].dtype
    stats_fused = {k: v.clone() for k, v in stats.items()}
    ys = nddr(xs, *params.values(), *stats_fused.values(), training, backend=backend)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    params64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    stats64 = {k: v.double() for k, v in stats.items()}
    refs = nddr(xs64, *params64.values(), *stats64.values(), training, backend="reference")
    for y, r, x in zip(ys, refs, xs):
        assert y.shape == x.shape and y.dtype == x.dtype
        assert rel_err(y, r) <= TOL[dtype]
    for k in stats:
        assert rel_err(stats_fused[k], stats64[k]) <= TOL[dtype], k
    grad_ys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, [*xs, *params.values()], grad_ys)
    ref_grads = torch.autograd.grad(refs, [*xs64, *params64.values()], [g.double() for g in grad_ys])
    # In fp16/bf16 a pre-activation near zero can round to the other side of the ReLU: one flipped
    # element of 5760 moved a bias gradient by 0.5% (seen here), so gradients get a looser bound.
    tols = [GRAD_TOL.get(dtype, TOL[dtype])] * len(grads)
    for g, r, x, tol in zip(grads, ref_grads, [*xs, *params.values()], tols):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert rel_err(g, r) <= tol


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(device, backend, T, dtype, layout, training):
    xs, params, stats = make_inputs(T, (2, 3, 7, 5), dtype, device, layout)
    check_against_reference(xs, params, stats, training, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_half_storage_with_fp32_params(device, backend, dtype, training):
    xs, params, stats = make_inputs(3, (2, 16, 6, 10), dtype, device, param_dtype=torch.float32)
    check_against_reference(xs, params, stats, training, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_backward_sums_in_float(device, backend, dtype, layout):
    """The backward GEMMs of half features sum in float: grad_xs, grad_weight and grad_bias within
    two roundings of the fp64 result for the same ReLU mask (the given ys fix it: no pre-activation
    near zero can flip, which is what the end-to-end tests' looser gradient bounds allow for)."""
    xs, params, _ = make_inputs(3, (2, 16, 6, 10), dtype, device, layout)
    w = params["weight"].detach().reshape(48, 48)
    ys = [torch.randn_like(x) for x in xs]
    grad_ys = [torch.randn_like(x) for x in xs]
    op = (
        torch.ops.mtl_kernels.nddr_eval_backward_triton
        if backend == "triton"
        else torch.ops.mtl_kernels.nddr_eval_backward
    )
    grad_xs, grad_w, grad_b = op(grad_ys, [x.detach() for x in xs], ys, w)
    dz = torch.cat([g.double() * (y > 0) for g, y in zip(grad_ys, ys)], 1)  # [B, T*C, H, W]
    x64 = torch.cat([x.detach().double() for x in xs], 1)
    want_xs = torch.einsum("kc,bkhw->bchw", w.double(), dz).split(16, 1)
    want_w = torch.einsum("bkhw,bchw->kc", dz, x64)
    eps = torch.finfo(dtype).eps
    for g, want in zip(grad_xs, want_xs):
        assert rel_err(g, want) <= 2 * eps
    assert rel_err(grad_w, want_w) <= 2 * eps
    assert rel_err(grad_b, dz.sum((0, 2, 3))) <= 2 * eps


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(device, backend, training):
    xs, params, stats = make_inputs(2, (2, 3, 3, 4), torch.float64, device)

    def f(*tensors):
        # fresh copies so the running-statistics update does not change what is checked
        return nddr(tensors[:2], *tensors[2:], *(v.clone() for v in stats.values()), training, backend=backend)

    assert torch.autograd.gradcheck(f, (*xs, *params.values()))


@pytest.mark.parametrize("device,backend", CASES)
def test_opcheck(device, backend):
    for layout in ("contiguous", "channels_last"):
        xs, params, _ = make_inputs(2, (2, 3, 4, 5), torch.float32, device, layout)
        w, g, b = params["weight"].reshape(6, 6), params["bn_weight"].reshape(-1), params["bn_bias"].reshape(-1)
        torch.library.opcheck(torch.ops.mtl_kernels.nddr_train, (xs, w, g, b, 1e-5))
        torch.library.opcheck(torch.ops.mtl_kernels.nddr_eval, (xs, w, b))


@pytest.mark.parametrize("device,backend", CASES)
def test_unused_output_and_empty_of_gradients(device, backend):
    xs, params, stats = make_inputs(3, (2, 3, 4, 4), torch.float64, device)
    ys = nddr(xs, *params.values(), *stats.values(), True, backend=backend)
    refs = nddr(xs, *params.values(), *{k: v.clone() for k, v in stats.items()}.values(), True, backend="reference")
    g = torch.autograd.grad(ys[1].sum(), xs)
    r = torch.autograd.grad(refs[1].sum(), xs)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ module


def perturbed_survey_layer(tasks, channels):
    layer = NDDRLayer(tasks, channels)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("backend", ["reference", *NDDR_BACKENDS])
def test_module_tracks_survey_layer_over_training_steps(backend):
    """Same outputs, same running statistics after several steps, then the same eval output."""
    tasks = ["semseg", "depth", "normals"]
    survey = perturbed_survey_layer(tasks, 4)
    fused = mk.nn.NDDR(tasks, 4, backend=backend)
    fused.load_state_dict(survey.state_dict())
    for _ in range(4):
        feats = {t: torch.randn(2, 4, 5, 6) for t in tasks}
        out, expected = fused(feats), survey(feats)
        for t in tasks:
            torch.testing.assert_close(out[t], expected[t])
    for i, t in enumerate(tasks):
        bn = survey.layer[t][1]
        torch.testing.assert_close(fused.running_mean[i], bn.running_mean)
        torch.testing.assert_close(fused.running_var[i], bn.running_var)
    assert fused.num_batches_tracked.item() == 4
    fused.eval()
    survey.eval()
    feats = {t: torch.randn(2, 4, 5, 6) for t in tasks}
    out, expected = fused(feats), survey(feats)
    for t in tasks:
        torch.testing.assert_close(out[t], expected[t])
    fused.train()  # and back
    out, expected = fused(feats), survey.train()(feats)
    for t in tasks:
        torch.testing.assert_close(out[t], expected[t])


def test_module_init_matches_survey_and_round_trips():
    tasks = ["a", "b"]
    fused, survey = mk.nn.NDDR(tasks, 3, alpha=0.8, beta=0.2), NDDRLayer(tasks, 3, alpha=0.8, beta=0.2)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(fused.weight[i], survey.layer[t][0].weight.flatten(1))
    assert sorted(fused.state_dict()) == sorted(
        ["weight", "bn_weight", "bn_bias", "running_mean", "running_var", "num_batches_tracked"]
    )
    other = mk.nn.NDDR(tasks, 3)
    other.load_state_dict(fused.state_dict())
    torch.testing.assert_close(other.weight, fused.weight)


def test_module_rejects_incomplete_survey_state_dict():
    state = NDDRLayer(["a", "b"], 3).state_dict()
    del state["layer.b.1.running_var"]
    with pytest.raises(RuntimeError, match="layer.b.1.running_var"):
        mk.nn.NDDR(["a", "b"], 3).load_state_dict(state)


@pytest.mark.parametrize("backend", ["reference", *NDDR_BACKENDS])
@pytest.mark.parametrize("training", [True, False])
def test_module_compiles_fullgraph(backend, training):
    tasks = ["semseg", "depth"]
    unit = mk.nn.NDDR(tasks, 4, backend=backend).train(training)
    twin = copy.deepcopy(unit)
    feats = {t: torch.randn(2, 4, 3, 5, requires_grad=True) for t in tasks}
    compiled = torch.compile(unit, fullgraph=True)
    out, expected = compiled(feats), twin(feats)
    for t in tasks:
        torch.testing.assert_close(out[t], expected[t])
    torch.testing.assert_close(unit.running_var, twin.running_var)
    g = torch.autograd.grad(sum(o.sum() for o in out.values()), unit.weight)
    g_ref = torch.autograd.grad(sum(o.sum() for o in expected.values()), twin.weight)
    torch.testing.assert_close(g[0], g_ref[0])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_nan_propagates_like_the_reference(device, backend, training):
    xs, params, stats = make_inputs(2, (2, 3, 4, 4), torch.float32, device)
    with torch.no_grad():
        xs[0][0, 0, 0, 0] = float("nan")
    ys = nddr(xs, *params.values(), *{k: v.clone() for k, v in stats.items()}.values(), training, backend=backend)
    refs = nddr(xs, *params.values(), *stats.values(), training, backend="reference")
    for y, r in zip(ys, refs):
        assert torch.equal(y.isnan(), r.isnan())
    # and the backward: F.relu passes the gradient of a NaN output (its mask is not y <= 0)
    g = [torch.randn_like(y) for y in ys]
    leaves = [*xs, *params.values()]
    for a, b in zip(torch.autograd.grad(ys, leaves, g), torch.autograd.grad(refs, leaves, g)):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=1e-4)


class SurveyNDDRNet(torch.nn.Module):
    def __init__(self, tasks):
        super().__init__()
        self.tasks = tasks
        self.convs = torch.nn.ModuleDict({t: torch.nn.Conv2d(3, 8, 3, padding=1) for t in tasks})
        self.nddr = NDDRLayer(tasks, 8)

    def forward(self, x):
        return self.nddr({t: self.convs[t](x) for t in self.tasks})


@pytest.mark.parametrize("backend", NDDR_BACKENDS)
def test_convert_swaps_survey_layers(backend):
    tasks = ["semseg", "depth"]
    model = SurveyNDDRNet(tasks)
    original = copy.deepcopy(model)
    converted = mk.convert(model, backend=backend)
    assert isinstance(converted.nddr, mk.nn.NDDR)
    x = torch.randn(2, 3, 6, 7)
    for mode in ("train", "eval"):
        getattr(converted, mode)()
        getattr(original, mode)()
        out, expected = converted(x), original(x)
        for t in tasks:
            torch.testing.assert_close(out[t], expected[t])


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", ["reference", *NDDR_BACKENDS])
def test_one_value_per_channel_in_training_is_an_error(backend):
    unit = mk.nn.NDDR(["a", "b"], 4, backend=backend)
    feats = {"a": torch.randn(1, 4, 1, 1), "b": torch.randn(1, 4, 1, 1)}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        unit(feats)
    unit.eval()
    assert all(torch.isfinite(y).all() for y in unit(feats).values())


def test_bad_features_and_params():
    unit = mk.nn.NDDR(["a", "b"], 4)
    with pytest.raises(KeyError, match="lack task 'b'"):
        unit({"a": torch.randn(2, 4, 3, 3)})
    with pytest.raises(ValueError, match=r"features\['b'\] has 5 channels, expected 4"):
        unit({"a": torch.randn(2, 4, 3, 3), "b": torch.randn(2, 5, 3, 3)})
    xs, params, stats = make_inputs(2, (2, 3, 4, 4), torch.float32, "cpu")
    params["weight"] = params["weight"][:, :, :5]
    with pytest.raises(ValueError, match=r"weight must have shape \[T, ...\] = \[2, 3, 6\]"):
        nddr(xs, *params.values(), *stats.values(), True)
    xs, params, stats = make_inputs(2, (2, 3, 4, 4), torch.float32, "cpu")
    stats["running_var"] = stats["running_var"].double()
    with pytest.raises(TypeError, match="running_var must have the features' dtype"):
        nddr(xs, *params.values(), *stats.values(), True)
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
        nddr(
            xs, *params.values(), *make_inputs(2, (2, 3, 4, 4), torch.float32, "cpu")[2].values(), True, backend="cuda"
        )
    with pytest.raises(ValueError, match="momentum must be in"):
        mk.nn.NDDR(["a"], 4, momentum=2.0)
    with pytest.raises(TypeError, match="momentum must be a number, got None"):
        mk.nn.NDDR(["a"], 4, momentum=None)
    with pytest.raises(ValueError, match="eps must be positive"):
        mk.nn.NDDR(["a"], 4, eps=0.0)
    with pytest.raises(ValueError, match=r"features\['b'\] is .* but features\['a'\] is"):
        unit({"a": torch.randn(2, 4, 3, 3), "b": torch.randn(2, 4, 3, 3).double()})
