"""MultiModalDistillation and MTANAttention against the survey-structured references, convert() and bad input."""

import copy

import pytest
import torch
from conftest import fused_backends

import mtl_kernels as mk
from mtl_kernels.ops.gate_sum import IMPLEMENTED
from mtl_kernels.reference import AttentionLayer, MultiTaskDistillationModule

BACKENDS = ["reference", *(b for b in fused_backends("cpu") if b in IMPLEMENTED)]


def survey_inputs(aux, C=6, shape=(2, 5, 7), dtype=torch.float64):
    B, H, W = shape
    return {f"features_{a}": torch.randn(B, C, H, W, dtype=dtype, requires_grad=True) for a in aux}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "tasks,aux",
    [
        (["semseg", "depth"], ["semseg", "depth"]),
        (["semseg", "depth", "normals"], ["semseg", "depth", "normals"]),
        (["semseg", "depth"], ["semseg", "depth", "normals", "edge"]),  # PAD-Net on NYUD
        (["a", "b", "c", "d", "e"], ["a", "b", "c", "d", "e"]),
    ],
)
def test_distillation_equals_survey_module(backend, tasks, aux):
    survey = MultiTaskDistillationModule(tasks, aux, 6).double()
    fused = mk.nn.MultiModalDistillation(tasks, aux, 6, backend=backend).double()
    fused.load_state_dict(survey.state_dict())
    x = survey_inputs(aux)
    out = fused({a: x[f"features_{a}"] for a in aux})
    expected = survey(x)
    assert list(out) == tasks
    leaves = list(x.values()) + list(fused.parameters())
    survey_leaves = list(x.values()) + list(survey.parameters())
    for t in tasks:
        torch.testing.assert_close(out[t], expected[t])
    grad_out = {t: torch.randn_like(out[t]) for t in tasks}
    got = torch.autograd.grad([out[t] for t in tasks], leaves, [grad_out[t] for t in tasks])
    want = torch.autograd.grad([expected[t] for t in tasks], survey_leaves, [grad_out[t] for t in tasks])
    for g, w in zip(got[: len(aux)], want[: len(aux)]):  # the features' gradients
        torch.testing.assert_close(g, w)
    # the stacked weights' gradients, laid out as the survey's per-block ones
    fused_grads = dict(zip([f"weights.{a}" for a in fused.weights], got[len(aux) :]))
    survey_grads = dict(zip([n for n, _ in survey.named_parameters()], want[len(aux) :]))
    for a, targets in fused.targets_of.items():
        if not targets:
            continue
        blocks = [
            survey_grads[f"self_attention.{t}.{a}.{k}"] for t in targets for k in ("conv.weight", "attention.0.weight")
        ]
        torch.testing.assert_close(fused_grads[f"weights.{a}"], torch.cat(blocks))


def test_distillation_state_dict_round_trip_and_convert():
    tasks, aux = ["semseg", "depth"], ["semseg", "depth", "normals"]
    survey = MultiTaskDistillationModule(tasks, aux, 4)
    fused = mk.convert(copy.deepcopy(survey))
    assert isinstance(fused, mk.nn.MultiModalDistillation)
    x = survey_inputs(aux, C=4, dtype=torch.float32)
    x["semseg"] = torch.randn(2, 40, 5, 7)  # the survey's dict also carries predictions: ignored
    for t in tasks:
        torch.testing.assert_close(fused(x)[t], survey(x)[t])
    other = mk.nn.MultiModalDistillation(tasks, aux, 4)
    other.load_state_dict(fused.state_dict())
    for a in fused.weights:
        torch.testing.assert_close(other.weights[a], fused.weights[a])


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_compiles_fullgraph(backend):
    tasks = ["semseg", "depth"]
    fused = mk.nn.MultiModalDistillation(tasks, tasks, 4, backend=backend)
    x = {t: torch.randn(2, 4, 5, 6) for t in tasks}
    compiled = torch.compile(fused, fullgraph=True)
    out, expected = compiled(x), fused(x)
    for t in tasks:
        torch.testing.assert_close(out[t], expected[t])
    g = {t: torch.randn_like(out[t]) for t in tasks}  # and the backward through the compiled graph
    got = torch.autograd.grad([out[t] for t in tasks], list(fused.parameters()), [g[t] for t in tasks])
    want = torch.autograd.grad([expected[t] for t in tasks], list(fused.parameters()), [g[t] for t in tasks])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mtan_attention_compiles_fullgraph(backend, train):
    fused = mk.nn.MTANAttention(8, 4, 6, backend=backend).train(train)
    twin = copy.deepcopy(fused)
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    u = torch.randn(2, 6, 5, 7, requires_grad=True)
    out, expected = torch.compile(fused, fullgraph=True)(x, u), twin(x, u)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, u, *fused.parameters()], g)
    want = torch.autograd.grad(expected, [x, u, *twin.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fused.state_dict(), twin.state_dict())  # running statistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_dtypes_against_the_survey(backend, layout, dtype):
    # The survey's modules in float32 NCHW define the result; the fused ones take the same inputs
    # in `layout` and `dtype` (bfloat16: its rounding, about 1e-2).
    tol = dict(rtol=2e-2, atol=3e-2) if dtype == torch.bfloat16 else {}
    tasks = ["semseg", "depth", "normals"]
    survey = MultiTaskDistillationModule(tasks, tasks, 8)
    fused = mk.convert(copy.deepcopy(survey), backend=backend).to(dtype)
    x = {t: torch.randn(2, 8, 5, 6) for t in tasks}
    xf = {f"features_{t}": v.to(dtype).contiguous(memory_format=layout) for t, v in x.items()}
    out = fused(xf)
    expected = survey({f"features_{t}": v.to(dtype).float() for t, v in x.items()})
    for t in tasks:
        torch.testing.assert_close(out[t].float(), expected[t], **tol)
    attention = AttentionLayer(8, 4, 6)
    mtan = mk.convert(copy.deepcopy(attention), backend=backend).to(dtype)
    a, u = torch.randn(2, 8, 5, 7).to(dtype), torch.randn(2, 6, 5, 7).to(dtype)
    out = mtan(a.contiguous(memory_format=layout), u.contiguous(memory_format=layout))
    torch.testing.assert_close(out.float(), attention(a.float()) * u.float(), **tol)


@pytest.mark.parametrize("momentum", [0.1, None])  # None: BN's cumulative average
@pytest.mark.parametrize("backend", BACKENDS)
def test_mtan_attention_equals_survey_layer(backend, momentum):
    survey = AttentionLayer(8, 4, 6).double()
    with torch.no_grad():
        for p in survey.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fused = mk.nn.MTANAttention(8, 4, 6, backend=backend).double()
    fused.load_state_dict(survey.state_dict())
    for bn in (survey[1], survey[4], fused[1], fused[4]):
        bn.momentum = momentum
    assert list(fused.state_dict()) == list(survey.state_dict())
    for _ in range(3):  # training steps: same outputs, gradients and running statistics
        _assert_mtan_step_equal(survey, fused)
    fused.eval()
    survey.eval()
    _assert_mtan_step_equal(survey, fused)


def _mtan_pair(survey, backend):
    """survey with perturbed weights and running statistics, and mk.convert of a copy of it."""
    with torch.no_grad():
        for p in survey.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for i in (1, 4):
            if survey[i].running_mean is not None:
                survey[i].running_mean.normal_()
                survey[i].running_var.uniform_(0.5, 2.0)
    return survey, mk.convert(copy.deepcopy(survey), backend=backend)


def _assert_mtan_step_equal(survey, fused):
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    out, expected = fused(x, u), survey(x) * u
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, u, *fused.parameters()], g)
    want = torch.autograd.grad(expected, [x, u, *survey.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fused(x), survey(x))  # the mask alone
    torch.testing.assert_close(fused.state_dict(), survey.state_dict())  # running statistics too


@pytest.mark.parametrize("frozen", [(1,), (4,), (1, 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mtan_attention_frozen_batch_norms(backend, frozen):
    # Fine-tuning: the model trains, some BNs are frozen (eval). Each BN follows its own mode, as
    # in the survey's nn.Sequential, and convert keeps the modes.
    survey = AttentionLayer(8, 4, 6).double().train()
    for i in frozen:
        survey[i].eval()
    survey, fused = _mtan_pair(survey, backend)
    assert [m.training for m in fused] == [m.training for m in survey]
    for _ in range(2):
        _assert_mtan_step_equal(survey, fused)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mtan_attention_batch_norm_configurations(backend, train):
    # BNs without running statistics or without affine convert and run as the survey's do.
    survey = AttentionLayer(8, 4, 6).double()
    survey[1] = torch.nn.BatchNorm2d(4, track_running_stats=False).double()
    survey[4] = torch.nn.BatchNorm2d(6, eps=1e-3, momentum=None, affine=False).double()
    survey, fused = _mtan_pair(survey.train(train), backend)
    for _ in range(2):
        _assert_mtan_step_equal(survey, fused)


def test_mtan_convert_and_bad_input():
    survey = AttentionLayer(8, 4, 6)
    fused = mk.convert(survey)
    assert isinstance(fused, mk.nn.MTANAttention)
    with pytest.raises(ValueError, match="features have shape"):
        fused(torch.randn(2, 8, 3, 3), torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 8, 1, 1), torch.randn(1, 6, 1, 1))


def test_distillation_bad_input():
    with pytest.raises(ValueError, match="must also be auxiliary tasks"):
        mk.nn.MultiModalDistillation(["semseg", "depth"], ["semseg"], 4)
    fused = mk.nn.MultiModalDistillation(["a", "b"], ["a", "b"], 4)
    with pytest.raises(KeyError, match="lack task 'b'"):
        fused({"a": torch.randn(1, 4, 3, 3)})
    with pytest.raises(ValueError, match=r"features\['b'\] has 3 channels, expected 4"):
        fused({"a": torch.randn(1, 4, 3, 3), "b": torch.randn(1, 3, 3, 3)})
    a = torch.randn(1, 4, 3, 3)
    for b in (torch.randn(1, 4, 3, 4), torch.randn(2, 4, 3, 3), a.double()):
        with pytest.raises(ValueError, match=r"features\['b'\] is .* but features\['a'\] is .*must share shape"):
            fused({"a": a, "b": b})
    survey_keys = mk.nn.MultiModalDistillation(["a", "b"], ["a", "b"], 4, key_format="features_{}")
    with pytest.raises(KeyError, match=r"features lack \['features_b'\]"):
        survey_keys({"features_a": a, "b": a})
