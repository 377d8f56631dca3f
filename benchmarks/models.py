"""Models benchmark: one training step (forward, loss, backward, Adam step) of each of the
survey's architectures (mtl_kernels.models); the survey's eager modules vs torch.compile of
them vs the fused backends.

    python benchmarks/models.py [--quick] [--full] [--no-save] [--device cpu|cuda] [--impls ...]
                                [--models mti_net,pad_net,...] [--channels-last]

One op, "train_step", one row per (model, impl), mode "step":
  eager    mk.models.build(name, NYUD tasks, survey_modules=True): the survey code's plain
           modules (CrossStitchUnit, NDDRLayer, AttentionLayer, MultiTaskDistillationModule)
  compile  torch.compile(that model, dynamic=False); the optimiser step stays eager
  cpu/cuda/triton  mk.convert(copy of that model, backend=...): the same weights on the fused
           modules (only for the models that have some: not single_task / multi_task)
  --channels-last adds eager+nhwc and <backend>+nhwc: the same models built NHWC
           (model.to(memory_format=torch.channels_last), as mk.models.build(memory_format=...)
           does) and fed an NHWC image. Their rows share the NCHW rows' configuration, so
           "x eager" is against the survey's NCHW eager step (compile is not run NHWC).
Every impl starts from the same weights. A step: zero_grad(set_to_none=True), forward,
loss = sum over every output (deep supervision too) of mean(y^2), backward, Adam(lr=1e-4).step().
Time is the whole step (the harness's "forward" mode over a step function; its own backward is
not used); peak memory is that of one step above the weights, optimiser state and input.

Tasks: NYUD, semseg (40 classes) and depth; pad_net and mti_net also predict normals and edge
as auxiliary tasks. Backbones: each model's default (resnet18 dilated to output stride 8;
pad_net and mti_net hrnet_w18_small_v2). fp32.

Sizes: GPU B=8 at 480 x 640 (NYUD). CPU: B=8 at 96 x 128 (--full: 480 x 640 there too);
--quick: B=2 at 64 x 64, fewer reps. GB/s is not reported meaningfully (bytes_moved 0): the
steps are dominated by convolutions; compare times and memory.
"""

from __future__ import annotations

import copy
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mtl_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import mtl_kernels as mk
from benchmarks import harness
from mtl_kernels.models import MODELS

TASKS = ["semseg", "depth"]
AUXILIARY = ["normals", "edge"]
NUM_CLASSES = 40
WITHOUT_FUSED = ("single_task", "multi_task")


def sizes(device: torch.device, quick: bool, full: bool) -> tuple[int, int, int]:
    """(B, H, W)."""
    if quick:
        return 2, 64, 64
    if device.type == "cuda" or full:
        return 8, 480, 640
    return 8, 96, 128


def fused_backends(device: torch.device, available: list[str]) -> list[str]:
    if device.type == "cpu":
        wanted = ["cpu"]  # the Triton interpreter is a debugging tool, not a benchmark
    else:
        wanted = ["cuda", "triton"]
    return [b for b in wanted if b in available]


def _outputs(out) -> list[torch.Tensor]:
    flat = [y for t, y in out.items() if t != mk.models.DEEP_SUPERVISION]
    for preds in out.get(mk.models.DEEP_SUPERVISION, {}).values():
        flat += list(preds.values())
    return flat


NHWC = "+nhwc"  # impl suffix of the channels_last runs


def model_cases(name: str, B: int, H: int, W: int, device: torch.device, impls: list[str]):
    cls = MODELS[name]
    torch.manual_seed(0)
    aux = AUXILIARY if cls.uses_auxiliary_tasks else None
    survey_modules = {"survey_modules": True} if name not in WITHOUT_FUSED else {}
    base = mk.models.build(name, TASKS, num_classes=NUM_CLASSES, auxiliary_tasks=aux, **survey_modules)
    x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(0)).to(device)
    params = {
        "model": name,
        "backbone": base.backbone_name,
        "B": B,
        "H": H,
        "W": W,
        "params_M": round(mk.models.num_parameters(base) / 1e6, 2),
    }
    for impl in impls:
        kind = impl.removesuffix(NHWC)
        if kind not in ("eager", "compile") and name in WITHOUT_FUSED:
            continue  # no fused module: the same model as eager
        if kind in ("eager", "compile"):
            model = copy.deepcopy(base)
        else:
            model = mk.convert(copy.deepcopy(base), backend=kind)
        fmt = torch.channels_last if impl.endswith(NHWC) else torch.contiguous_format
        model = model.to(device, memory_format=fmt).train()
        run = harness.compile_reference(model) if impl == "compile" else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        image = x.contiguous(memory_format=fmt)

        def step(model=model, run=run, opt=opt, x=image):
            opt.zero_grad(set_to_none=True)
            loss = sum(y.float().square().mean() for y in _outputs(run(x)))
            loss.backward()
            opt.step()
            return [loss.detach()]

        yield harness.Case(
            op="train_step",
            impl=impl,
            params=params,
            dtype=torch.float32,
            device=device,
            forward=step,
            leaves=list(model.parameters()),  # their last .grad cleared before the peak memory's baseline
            bytes_moved={"forward": 0, "backward": 0, "both": 0},
            compiled=impl == "compile",
        )
        del model, run, opt, step


def run(
    device: torch.device,
    quick: bool = False,
    impls: list[str] | None = None,
    full: bool = False,
    models: list[str] | None = None,
    channels_last: bool = False,
) -> list[dict]:
    available = mk.available_backends()
    fused = fused_backends(device, available)
    all_impls = ["eager", "compile", *fused]
    if channels_last:
        all_impls += [i + NHWC for i in ("eager", *fused)]
    impls = [i for i in all_impls if impls is None or i in impls or i.removesuffix(NHWC) in impls]
    names = list(MODELS) if models is None else models
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; valid models are {list(MODELS)}")
    B, H, W = sizes(device, quick, full)
    settings = harness.Settings.default(device, quick)
    print(f"models: impls {impls} (backends available: {available}), device {harness.device_name(device)}")
    print(f"models: {names}; B={B}, {H} x {W}, fp32", flush=True)
    rows = []
    for name in names:
        cases = list(model_cases(name, B, H, W, device, impls))
        print(f"  train_step {name:13s} {','.join(c.impl for c in cases)}", flush=True)
        for row in harness.run_cases(cases, settings, modes=("forward",)):
            row["mode"] = "step"
            rows.append(row)
        del cases
        harness.release(device)
    return rows


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    models = None
    if "--models" in argv:  # our own options; the rest is the harness's command line
        i = argv.index("--models")
        models = argv[i + 1].split(",")
        del argv[i : i + 2]
    channels_last = "--channels-last" in argv
    if channels_last:
        argv.remove("--channels-last")

    def run_models(device, quick=False, impls=None, full=False):
        return run(device, quick=quick, impls=impls, full=full, models=models, channels_last=channels_last)

    return harness.main(
        argv,
        __doc__,
        "models (training step)",
        run_models,
        quick_help="B=2 at 64 x 64, fewer reps",
        full_help="NYUD size (B=8, 480 x 640) on CPU too (default there: 96 x 128)",
    )


if __name__ == "__main__":
    main()
