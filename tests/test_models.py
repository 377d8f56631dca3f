"""mk.models: every survey architecture builds for the NYUD and PASCAL task sets, runs forward and
backward, gives the same outputs and gradients fused and reference (and through mk.convert), compiles,
and rejects unknown names. Kept small: CI runs it on 2 cores (narrow ResNet-18, 32 x 40 inputs)."""

import copy

import pytest
import torch
from conftest import fused_backends

import mtl_kernels as mk
from mtl_kernels.models import DEEP_SUPERVISION, MODELS

NYUD = dict(tasks=["semseg", "depth"], num_classes=40, auxiliary_tasks=["normals", "edge"])
PASCAL = dict(tasks=["semseg", "human_parts", "sal", "normals", "edge"], num_classes=21)
TASK_SETS = {"nyud": NYUD, "pascal": PASCAL}
EXPECTED = {"semseg": None, "human_parts": 7, "depth": 1, "normals": 3, "edge": 1, "sal": 1}
NARROW = {"channels": (8, 16, 32, 64), "stem_width": 8}  # a narrow ResNet-18 through timm
FUSED_MODELS = ["cross_stitch", "nddr_cnn", "mtan", "pad_net", "mti_net", "jtrl"]
FUSED = fused_backends("cpu")[0] if fused_backends("cpu") else None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a loaded 2-core machine two threads'
    barriers made single steps 10-50x slower (measured: an HRNet MTI-Net step 0.3 s -> 22 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name, task_set, **kw):
    spec = dict(TASK_SETS[task_set])
    tasks = spec.pop("tasks")
    if not MODELS[name].uses_auxiliary_tasks:
        spec.pop("auxiliary_tasks", None)
    backbone = kw.pop("backbone", None) or MODELS[name].default_backbone
    if backbone.startswith("resnet"):
        kw.setdefault("backbone_kwargs", NARROW)
    if name in ("single_task", "multi_task", "cross_stitch", "nddr_cnn", "mtan"):
        kw.setdefault("head_kwargs", {"channels": 16})  # the ASPP's width (256 in the survey)
    if name in ("pad_net", "jtrl"):
        kw.setdefault("channels", 16)
    return mk.models.build(name, tasks, backbone, **spec, **kw)


def image(model, dtype=torch.float32):
    hrnet = model.backbone_kind == "hrnet"
    return torch.randn(2, 3, 32, 32 if hrnet else 40, dtype=dtype)


def finals(out):
    return {t: y for t, y in out.items() if t != DEEP_SUPERVISION}


def all_outputs(out):
    """Final and deep-supervision predictions as one flat {name: tensor}."""
    flat = dict(finals(out))
    for stage, preds in out.get(DEEP_SUPERVISION, {}).items():
        flat.update({f"{stage}/{t}": y for t, y in preds.items()})
    return flat


@pytest.mark.parametrize("task_set", ["nyud", "pascal"])
@pytest.mark.parametrize("name", list(MODELS))
def test_builds_forward_backward(name, task_set):
    model = build(name, task_set)
    n = mk.models.num_parameters(model)
    print(f"{name} ({task_set}, {model.backbone_name}): {n:,} parameters")
    assert n > 0
    x = image(model)
    out = model(x)
    spec = TASK_SETS[task_set]
    assert list(finals(out)) == spec["tasks"]
    for t, y in finals(out).items():
        channels = EXPECTED[t] or spec["num_classes"]
        assert y.shape == (2, channels, *x.shape[-2:]), (t, y.shape)
    if name == "pad_net":
        assert list(out[DEEP_SUPERVISION]) == ["initial"]
    elif name == "mti_net":
        assert list(out[DEEP_SUPERVISION]) == ["scale_0", "scale_1", "scale_2", "scale_3"]
        sizes = [out[DEEP_SUPERVISION][f"scale_{s}"]["semseg"].shape[-1] for s in range(4)]
        assert sizes == [x.shape[-1] // r for r in (4, 8, 16, 32)]
    else:
        assert DEEP_SUPERVISION not in out
    for preds in out.get(DEEP_SUPERVISION, {}).values():
        aux = spec["tasks"] + [a for a in spec.get("auxiliary_tasks", []) if a not in spec["tasks"]]
        assert list(preds) == aux
        assert all(p.shape[1] == (EXPECTED[a] or spec["num_classes"]) for a, p in preds.items())
    sum(y.float().square().mean() for y in all_outputs(out).values()).backward()
    unused = [k for k, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


def _grads(model):
    return {k: p.grad for k, p in model.named_parameters()}


def _step(model, x):
    torch.manual_seed(1)  # the same dropout masks in every copy
    out = all_outputs(model(x))
    g = torch.Generator().manual_seed(2)
    loss = sum((y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() for y in out.values())
    (grad_x,) = torch.autograd.grad(loss, x, retain_graph=True)
    loss.backward()
    return out, grad_x


@pytest.mark.skipif(FUSED is None, reason="no compiled CPU kernels")
@pytest.mark.parametrize("name", FUSED_MODELS)
def test_fused_equals_reference_and_convert(name):
    """Same weights, fp64: the survey's plain modules, mk.convert of them onto the reference backend and
    onto the fused one give the same outputs, input and parameter gradients, and BN statistics."""
    survey = build(name, "nyud", survey_modules=True).double()
    reference = mk.convert(copy.deepcopy(survey), backend="reference")
    fused = mk.convert(copy.deepcopy(survey), backend=FUSED)
    assert not any(type(m).__module__.startswith("mtl_kernels.reference") for m in fused.modules())
    assert any(isinstance(m, mk.models._base.FUSED_MODULES) for m in fused.modules())
    # a model built with fused modules has the same state_dict as the converted one
    built = build(name, "nyud", backend=FUSED).double()
    built.load_state_dict(fused.state_dict())
    built.load_state_dict(survey.state_dict())  # and loads the survey's keys
    x = image(survey, torch.float64).requires_grad_()
    results = {k: _step(m, x) for k, m in (("survey", survey), ("reference", reference), ("fused", fused))}
    for other in ("reference", "fused"):
        for t, y in results["survey"][0].items():
            torch.testing.assert_close(results[other][0][t], y, msg=f"{other} output {t}")
        torch.testing.assert_close(results[other][1], results["survey"][1], msg=f"{other} input grad")
    # parameters named alike in all three (backbones, heads, MTAN's attention) have the same gradients
    survey_grads, ref_grads, fused_grads = _grads(survey), _grads(reference), _grads(fused)
    for k, g in survey_grads.items():
        if k in fused_grads and fused_grads[k].shape == g.shape:
            torch.testing.assert_close(fused_grads[k], g, msg=k)
    assert ref_grads.keys() == fused_grads.keys()
    for k, g in ref_grads.items():
        torch.testing.assert_close(fused_grads[k], g, msg=k)
    for (k, a), b in zip(reference.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, msg=k)  # BN running statistics (NDDR's, MTAN's) too
    # eval mode: running statistics (MTANAttention folds its BNs)
    reference.eval(), fused.eval()
    with torch.no_grad():
        a, b = all_outputs(reference(x)), all_outputs(fused(x))
    for t in a:
        torch.testing.assert_close(b[t], a[t], msg=f"eval {t}")


def _close(got, expected, tol, floor, msg):
    """max |got - expected| <= tol * max(|expected|, floor): relative to the tensor's scale, since a
    different summation order (NHWC convolutions) moves fp64 results by far less than a layout bug."""
    scale = max(expected.abs().max().item(), floor)
    err = (got - expected).abs().max().item()
    assert err <= tol * scale, f"{msg}: max error {err:.3g} > {tol} x {scale:.3g}"


@pytest.mark.skipif(FUSED is None, reason="no compiled CPU kernels")
@pytest.mark.parametrize("name", FUSED_MODELS)
def test_channels_last_fused_equals_nchw_reference(name):
    """build(memory_format="channels_last") with the fused modules, fed an NHWC image: every output
    stays NHWC (the layout runs through the fused kernels) and outputs, input gradient and parameter
    gradients equal the NCHW reference's for the same weights (fp64, training mode)."""
    kw = {"head_kwargs": {"channels": 16, "dropout": 0.0}} if name in ("cross_stitch", "nddr_cnn", "mtan") else {}
    reference = build(name, "nyud", backend="reference", **kw).double()
    fused = build(name, "nyud", backend=FUSED, memory_format="channels_last", **kw).double()
    fused.load_state_dict(reference.state_dict())
    convs = [m.weight for m in fused.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = image(reference, torch.float64)
    if reference.backbone_kind == "hrnet":  # 2 x 2 at stride 32: a BN over 2 values is too ill-conditioned
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected, grad_x = _step(reference, x.clone().requires_grad_())
    got, got_grad_x = _step(fused, x.contiguous(memory_format=torch.channels_last).requires_grad_())
    for t, y in expected.items():
        if y.shape[1] > 1:
            assert got[t].is_contiguous(memory_format=torch.channels_last), f"output {t} is not NHWC"
        _close(got[t], y, 1e-5, 0.0, f"output {t}")
    _close(got_grad_x, grad_x, 1e-4, 0.0, "input grad")
    expected_grads, got_grads = _grads(reference), _grads(fused)
    floor = max(g.abs().max().item() for g in expected_grads.values()) * 1e-6  # BN-cancelled biases: ~0
    for k, g in expected_grads.items():
        _close(got_grads[k], g, 1e-4, floor, k)


def test_memory_format_option():
    model = build("multi_task", "nyud", memory_format=torch.channels_last)
    assert model.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"memory_format must be torch.contiguous_format or torch.channels_last"):
        build("multi_task", "nyud", memory_format="nhwc")
    with pytest.raises(ValueError, match="memory_format"):
        build("multi_task", "nyud", memory_format=torch.preserve_format)


def test_set_backend_switches_every_fused_module():
    model = build("mtan", "nyud", backend="reference")
    mk.models.set_backend(model, FUSED)
    backends = {m.backend for m in model.modules() if isinstance(m, mk.models._base.FUSED_MODULES)}
    assert backends == {FUSED}


@pytest.mark.parametrize("name", ["multi_task", "cross_stitch"])
def test_compile(name):
    """torch.compile(fullgraph=True), forward and backward, matches eager (training mode; no dropout,
    one block per ResNet stage to keep the compile short)."""
    kw = dict(backbone_kwargs={**NARROW, "layers": (1, 1, 1, 1)}, head_kwargs={"channels": 8, "dropout": 0.0})
    model = build(name, "nyud", backend=FUSED, **kw)
    twin = copy.deepcopy(model)
    x = image(model)
    expected = model(x)
    sum(y.mean() for y in expected.values()).backward()
    got = torch.compile(twin, fullgraph=True)(x)
    sum(y.mean() for y in got.values()).backward()
    for t in expected:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-4, atol=1e-4)
    for (k, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=k)


def test_backbones():
    resnet = mk.models.build_backbone("resnet18", **NARROW)
    feats = resnet(torch.randn(1, 3, 32, 40))
    assert resnet.channels == [8, 16, 32, 64] and resnet.reductions == [4, 8, 8, 8]
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 8, 10), (16, 4, 5), (32, 4, 5), (64, 4, 5)]
    assert mk.models.build_backbone("resnet50").channels == [256, 512, 1024, 2048]
    hrnet = mk.models.build_backbone("hrnet_w18_small_v2")
    assert hrnet.channels == [18, 36, 72, 144] and hrnet.reductions == [4, 8, 16, 32]
    # any size, as the survey's HRNet: every stride-2 conv rounds up, the fuse resizes to the finer branch
    feats = hrnet(torch.randn(2, 3, 64, 80))
    assert [tuple(f.shape[1:]) for f in feats] == [(18, 16, 20), (36, 8, 10), (72, 4, 5), (144, 2, 3)]


def test_hrnet_fuse_is_the_surveys():
    """With sides that are multiples of 32 the backbone is timm's HRNet, same weights and state_dict
    keys, with the survey's bilinear upsampling in the fuse layers (timm's own is nearest)."""
    import timm

    hrnet = mk.models.build_backbone("hrnet_w18_small_v2").eval()
    plain = timm.create_model(
        "hrnet_w18_small_v2", features_only=True, feature_location="", out_indices=(1, 2, 3, 4)
    ).eval()
    plain.load_state_dict(hrnet.body.state_dict())
    ups = [m for m in plain.modules() if isinstance(m, torch.nn.Upsample)]
    assert ups and all(m.mode == "nearest" for m in ups)
    for m in ups:
        m.mode = "bilinear"  # align_corners None: False, as the survey's F.interpolate(mode="bilinear")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for got, expected in zip(hrnet(x), plain(x)):
            torch.testing.assert_close(got, expected)


def test_pad_net_follows_the_survey_on_hrnet():
    """The survey's PAD-Net on HRNet: HighResolutionFuse keeps all 270 channels (1x1 conv with bias,
    BN, ReLU); each initial head's first bottleneck reduces 270 -> 256 through a 1x1 conv + BN
    shortcut, the second has none; the final heads and the distillation run at 256."""
    model = mk.models.build("pad_net", ["semseg", "depth"], num_classes=40, auxiliary_tasks=["normals", "edge"])
    conv, bn, _ = model.fuse.last_layer
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias is not None) == (270, 270, (1, 1), True)
    assert bn.num_features == 270 and model.fuse.out_channels == 270
    for t in ("semseg", "depth", "normals", "edge"):
        first, second = model.initial_task_prediction_heads.layers[t]
        assert (first.conv1.in_channels, first.conv1.out_channels, first.conv3.out_channels) == (270, 64, 256)
        shortcut, shortcut_bn = first.downsample
        assert (shortcut.in_channels, shortcut.out_channels, shortcut.bias) == (270, 256, None)
        assert shortcut_bn.num_features == 256 and second.downsample is None
    keys = model.state_dict().keys()
    assert {"fuse.last_layer.0.weight", "fuse.last_layer.0.bias", "fuse.last_layer.1.running_mean"} <= keys
    assert "initial_task_prediction_heads.layers.semseg.0.downsample.0.weight" in keys
    assert model.heads["semseg"][0].conv1.in_channels == 256 and model.heads["semseg"][0].downsample is None


def test_heads():
    head = mk.models.DeepLabHead(64, 5, channels=16)
    aspp = head[0]
    assert [c[0].dilation for c in aspp.convs[1:]] == [(12, 12), (24, 24), (36, 36)]
    assert aspp.project[-1].p == 0.5
    assert mk.models.DeepLabHead(64, 5)[0].project[0].out_channels == 256
    assert head([torch.randn(2, 32, 4, 5), torch.randn(2, 64, 4, 5)]).shape == (2, 5, 4, 5)
    hr = mk.models.HRNetHead([4, 6, 8, 10], 3)
    xs = [torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate([4, 6, 8, 10])]
    assert hr(xs).shape == (2, 3, 16, 16)


# the final predictions' stride with upsample=False: DeepLab-v3 at output stride 8; the HRNet head,
# PAD-Net's and JTRL's at the finest scale (4)
HEAD_STRIDE = {"pad_net": 4, "mti_net": 4, "jtrl": 4}


@pytest.mark.parametrize("name", list(MODELS))
def test_upsample_false_returns_the_heads_resolution(name):
    """upsample=False leaves the final predictions at the head's resolution; upsample=True is exactly
    their bilinear resize to the input size (eval mode: no dropout, the same running statistics)."""
    model = build(name, "nyud", upsample=False).eval()
    x = image(model)
    stride = HEAD_STRIDE.get(name, 8)
    with torch.no_grad():
        low = model(x)
        model.upsample = True
        full = model(x)
    for t, y in finals(low).items():
        assert y.shape[-2:] == (x.shape[-2] // stride, x.shape[-1] // stride), (t, y.shape)
        torch.testing.assert_close(full[t], mk.models.layers.upsample(y, x.shape[-2:]), msg=t)
    for stage, preds in low.get(DEEP_SUPERVISION, {}).items():  # untouched by the option
        for t, y in preds.items():
            torch.testing.assert_close(y, full[DEEP_SUPERVISION][stage][t], msg=f"{stage}/{t}")


@pytest.mark.parametrize("name", list(MODELS))
def test_a_bad_backend_is_an_error_at_build(name):
    """Every model, with fused modules or none, rejects an unknown backend when built, with the ops' message."""
    with pytest.raises(ValueError) as from_op:
        mk.ops.cross_stitch([torch.zeros(1, 1, 1, 1)] * 2, torch.ones(2, 2, 1), backend="cdua")
    with pytest.raises(ValueError) as from_build:
        build(name, "nyud", backend="cdua")
    assert str(from_build.value) == str(from_op.value)
    assert "backend must be one of auto, reference, cpu, cuda, triton, got 'cdua'" in str(from_build.value)
    model = build(name, "nyud", backend="reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.models.set_backend(model, "cdua")


def test_output_channels_table():
    assert mk.models.output_channels(PASCAL["tasks"], 21) == {
        "semseg": 21,
        "human_parts": 7,
        "sal": 1,
        "normals": 3,
        "edge": 1,
    }
    assert mk.models.output_channels({"mine": 5}) == {"mine": 5}
    assert mk.models.output_channels(["depth", "mine"], {"mine": 2}) == {"depth": 1, "mine": 2}


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model 'padnet'.*'pad_net'.*'mti_net'"):
        mk.models.build("padnet", ["semseg"], num_classes=21)
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet34'.*'resnet18', 'resnet50', 'hrnet_w18_small_v2'"):
        mk.models.build("multi_task", ["depth"], "resnet34")
    with pytest.raises(ValueError, match=r"unknown task 'segmentation'.*'depth'.*'semseg'"):
        mk.models.build("multi_task", ["segmentation", "depth"])
    with pytest.raises(ValueError, match="needs its number of classes"):
        mk.models.build("multi_task", ["semseg", "depth"])
    with pytest.raises(ValueError, match=r"CrossStitchNetwork needs one of the backbones \['resnet18', 'resnet50'\]"):
        mk.models.build("cross_stitch", ["depth", "normals"], "hrnet_w18_small_v2")
    with pytest.raises(ValueError, match=r"no auxiliary tasks.*'pad_net', 'mti_net'"):
        mk.models.build("mtan", ["depth", "normals"], auxiliary_tasks=["edge"])
    with pytest.raises(ValueError, match=r"unknown task 'edges'"):
        mk.models.build("pad_net", ["depth"], auxiliary_tasks=["edges"])
