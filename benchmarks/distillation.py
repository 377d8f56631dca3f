"""Distillation benchmark: PAD-Net/MTI-Net distillation, the gate_sum op alone
and MTAN attention; the survey's eager modules vs torch.compile of them vs the
fused backends.

    python benchmarks/distillation.py [--quick] [--full] [--no-save] [--device cpu|cuda] [--impls ...]

Three ops, each its own op name in the rows:

padnet_distillation
  eager    mtl_kernels.reference.MultiTaskDistillationModule(tasks, tasks, C),
           the survey code's module (per target t and source a != t an SABlock:
           conv3x3(F_a) * sigmoid(conv3x3(F_a)); stack, sum, add F_t); input
           keys features_<task>
  compile  torch.compile(that module, dynamic=False), once per shape and dtype
  cpu/cuda/triton  mtl_kernels.convert(copy of that module, backend=...), i.e.
           mtl_kernels.nn.MultiModalDistillation with the same weights (one
           stacked conv per source, then one gate_sum)
  Leaves: the T input features and the module's weights.

gate_sum (the op alone, on PAD-Net's pattern)
  Each source a has a stacked [B, 2*(T-1)*C, H, W] tensor (what its stacked
  convolution would output), sliced into (feature, gate) channel slices, one
  pair per other target, as MultiModalDistillation slices it. The slices
  themselves are the leaves (views, read in place), with the T residuals.
  eager    outs[t] = res[t] + sum over sources a != t of f * torch.sigmoid(g)
  compile  torch.compile of that function, dynamic=False
  cpu/cuda/triton  mtl_kernels.ops.gate_sum(res, feats, gates, targets, T, backend=...)

mtan_attention (training mode, mask * features)
  eager    mtl_kernels.reference.AttentionLayer(C, C, C)(x) * u (the survey's use)
  compile  torch.compile of that function, dynamic=False
  cpu/cuda/triton  mtl_kernels.convert(copy of that layer, backend=...), i.e.
           mtl_kernels.nn.MTANAttention, called as fused(x, u)
  Leaves: x, u and the layer's parameters; every rep updates the BN running
  statistics, as training does.

Fused backends: mtl_kernels.ops.gate_sum.IMPLEMENTED that this build and
machine have (available_backends()), without "reference" (that is the eager
expression again) and without triton on CPU (the interpreter is a debugging
tool, not a benchmark).

Shapes (the issue's grid; B=8; fp32, and bf16 on GPU):
  padnet_distillation and gate_sum: T in {2, 3, 4} (tasks = auxiliary tasks),
    C=256 at 120 x 160; and MTI-Net's four HRNet-W18 scales at T=3: C = 18,
    36, 72, 144 at 120 x 160, 60 x 80, 30 x 40, 15 x 20.
  mtan_attention: in = mid = out = C in {64, 256} at 120 x 160.
On CPU that grid is far too slow for a small machine (the 3x3 convolutions),
so the CPU default is a reduced grid: T in {2, 3} at C=64, 60 x 80 plus the
four MTI-Net scales at T=3; MTAN at 60 x 80. --full runs the issue's grid
there too (on GPU it is always the default). --quick: T=3, C=64, 60 x 80
only (MTAN: C=64, 60 x 80), fewer reps.

Bytes moved, N = B*C*H*W elements, s = element size (weights ignored):
  padnet_distillation  forward reads T inputs, writes T outputs       2*T*N*s
                       backward reads T output grads + T inputs,
                       writes T input grads                           3*T*N*s
                       (the convolutions make it compute-bound: GB/s
                       and % bw are only indicative; compare times)
  gate_sum   forward   reads T residuals + 2*T*(T-1) slices,
                       writes T outputs                    (2*T + 2*T*(T-1))*N*s
             backward  reads T output grads + 2*T*(T-1) slices,
                       writes 2*T*(T-1) slice grads        (T + 4*T*(T-1))*N*s
  mtan_attention       forward reads x, u, writes the output          3*N*s
                       backward reads the output grad, x, u,
                       writes the grads of x and u                    5*N*s
  both = forward + backward.
"""

from __future__ import annotations

import copy
import gc
import importlib
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mtl_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import mtl_kernels
from benchmarks import harness
from mtl_kernels import available_backends
from mtl_kernels.reference import AttentionLayer, MultiTaskDistillationModule

# the module (mtl_kernels.ops.gate_sum is the function of the same name)
gate_sum_module = importlib.import_module("mtl_kernels.ops.gate_sum")

OPS = ("padnet_distillation", "gate_sum", "mtan_attention")
B = 8

# MTI-Net's four HRNet-W18 scales, T=3: (T, C, H, W)
MTINET = [(3, 18, 120, 160), (3, 36, 60, 80), (3, 72, 30, 40), (3, 144, 15, 20)]
# padnet_distillation / gate_sum grids: (T, C, H, W); mtan grids: (C, H, W)
FULL_GRID = [(T, 256, 120, 160) for T in (2, 3, 4)] + MTINET
CPU_GRID = [(T, 64, 60, 80) for T in (2, 3)] + MTINET
QUICK_GRID = [(3, 64, 60, 80)]
FULL_MTAN = [(C, 120, 160) for C in (64, 256)]
CPU_MTAN = [(C, 60, 80) for C in (64, 256)]
QUICK_MTAN = [(64, 60, 80)]


def fused_backends(device: torch.device, available: list[str]) -> list[str]:
    wanted = [b for b in gate_sum_module.IMPLEMENTED if b != "reference"]
    if device.type == "cpu":
        wanted = [b for b in wanted if b not in ("triton", "cuda")]
    else:
        wanted = [b for b in wanted if b != "cpu"]
    return [b for b in wanted if b in available]


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _both(fwd: int, bwd: int) -> dict[str, int]:
    return {"forward": fwd, "backward": bwd, "both": fwd + bwd}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- PAD-Net distillation


def padnet_cases(T, C, H, W, dtype, device, impls):
    gen = torch.Generator().manual_seed(0)
    tasks = [f"task{i}" for i in range(T)]
    xs = [torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_() for _ in range(T)]
    torch.manual_seed(0)
    survey_state = MultiTaskDistillationModule(tasks, tasks, C).state_dict()
    n = B * C * H * W * _size(dtype)
    common = dict(
        op="padnet_distillation",
        params={"T": T, "B": B, "C": C, "H": H, "W": W},
        dtype=dtype,
        device=device,
        bytes_moved=_both(2 * T * n, 3 * T * n),
    )

    def survey_module():
        m = MultiTaskDistillationModule(tasks, tasks, C)
        m.load_state_dict(survey_state)
        return m.to(device, dtype).train()

    def module_forward(m):
        feats = {f"features_{t}": x for t, x in zip(tasks, xs)}

        def forward():
            out = m(feats)
            return [out[t] for t in tasks]

        return forward

    for impl in impls:
        m = survey_module()
        if impl == "eager":
            yield harness.Case(impl="eager", forward=module_forward(m), leaves=[*xs, *m.parameters()], **common)
        elif impl == "compile":
            compiled = harness.compile_reference(m)
            yield harness.Case(
                impl="compile", forward=module_forward(compiled), leaves=[*xs, *m.parameters()], compiled=True, **common
            )
        else:
            m = mtl_kernels.convert(copy.deepcopy(m), backend=impl)
            assert isinstance(m, mtl_kernels.nn.MultiModalDistillation)
            yield harness.Case(impl=impl, forward=module_forward(m), leaves=[*xs, *m.parameters()], **common)
        del m
        gc.collect()


# --------------------------------------------------------------------------- gate_sum alone


def eager_gate_sum(residuals, feats, gates, targets, num_outputs):
    """outs[t] = res[t] + sum of f * sigmoid(g) over the pairs targeting t, in plain PyTorch."""
    outs = list(residuals)
    for f, g, t in zip(feats, gates, targets):
        outs[t] = outs[t] + f * torch.sigmoid(g)
    return outs


def gate_sum_cases(T, C, H, W, dtype, device, impls):
    gen = torch.Generator().manual_seed(0)
    residuals = [torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_() for _ in range(T)]
    feats, gates, targets = [], [], []
    for a in range(T):  # source a feeds every other target, in order, as MultiModalDistillation slices it
        stacked = torch.randn(B, 2 * (T - 1) * C, H, W, generator=gen).to(device, dtype)
        for k, t in enumerate(t for t in range(T) if t != a):
            feats.append(stacked[:, 2 * k * C : (2 * k + 1) * C].requires_grad_())
            gates.append(stacked[:, (2 * k + 1) * C : (2 * k + 2) * C].requires_grad_())
            targets.append(t)
    pairs = 2 * T * (T - 1)
    n = B * C * H * W * _size(dtype)
    common = dict(
        op="gate_sum",
        params={"T": T, "B": B, "C": C, "H": H, "W": W},
        dtype=dtype,
        device=device,
        bytes_moved=_both((2 * T + pairs) * n, (T + 2 * pairs) * n),
        leaves=[*residuals, *feats, *gates],
    )
    for impl in impls:
        if impl == "eager":
            yield harness.Case(
                impl="eager", forward=lambda: eager_gate_sum(residuals, feats, gates, targets, T), **common
            )
        elif impl == "compile":
            fn = harness.compile_reference(eager_gate_sum)
            yield harness.Case(
                impl="compile", forward=lambda fn=fn: fn(residuals, feats, gates, targets, T), compiled=True, **common
            )
        else:

            def forward(backend=impl):
                return mtl_kernels.ops.gate_sum(residuals, feats, gates, targets, T, backend=backend)

            yield harness.Case(impl=impl, forward=forward, **common)
        gc.collect()


# --------------------------------------------------------------------------- MTAN attention


def mtan_cases(C, H, W, dtype, device, impls):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_()
    u = torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_()
    torch.manual_seed(0)
    survey_state = AttentionLayer(C, C, C).state_dict()
    for key, value in survey_state.items():  # BN parameters away from their identity values
        if key.endswith(("1.weight", "4.weight")):
            value.copy_(1.0 + 0.1 * torch.rand(value.shape, generator=gen))
        elif key.endswith(("1.bias", "4.bias")):
            value.copy_(0.1 * torch.randn(value.shape, generator=gen))
    n = B * C * H * W * _size(dtype)
    common = dict(
        op="mtan_attention",
        params={"B": B, "C": C, "H": H, "W": W},
        dtype=dtype,
        device=device,
        bytes_moved=_both(3 * n, 5 * n),
    )

    def survey_layer():
        m = AttentionLayer(C, C, C)
        m.load_state_dict(survey_state)
        return m.to(device, dtype).train()

    for impl in impls:
        m = survey_layer()
        if impl in ("eager", "compile"):

            def masked(x, u, m=m):
                return m(x) * u

            fn = masked if impl == "eager" else harness.compile_reference(masked)
            yield harness.Case(
                impl=impl,
                forward=lambda fn=fn: [fn(x, u)],
                leaves=[x, u, *m.parameters()],
                compiled=impl == "compile",
                **common,
            )
        else:
            fused = mtl_kernels.convert(copy.deepcopy(m), backend=impl)
            assert isinstance(fused, mtl_kernels.nn.MTANAttention) and fused.training
            yield harness.Case(
                impl=impl, forward=lambda fused=fused: [fused(x, u)], leaves=[x, u, *fused.parameters()], **common
            )
        del m
        gc.collect()


# --------------------------------------------------------------------------- driver


def grid_for(device: torch.device, quick: bool, full: bool):
    """(name, padnet/gate_sum grid, mtan grid)"""
    if quick:
        return "quick: T=3, C=64, 60x80 (MTAN: C=64, 60x80)", QUICK_GRID, QUICK_MTAN
    if full or device.type != "cpu":
        return (
            "full (the issue's grid): T in {2,3,4} at C=256, 120x160 + MTI-Net's 4 scales at T=3; "
            "MTAN C in {64,256} at 120x160",
            FULL_GRID,
            FULL_MTAN,
        )
    return (
        "reduced CPU grid: T in {2,3} at C=64, 60x80 + MTI-Net's 4 scales at T=3; MTAN C in {64,256} at 60x80 "
        "(--full for the issue's)",
        CPU_GRID,
        CPU_MTAN,
    )


def run(device: torch.device, quick: bool = False, impls: list[str] | None = None, full: bool = False) -> list[dict]:
    available = available_backends()
    all_impls = ["eager", "compile", *fused_backends(device, available)]
    impls = [i for i in all_impls if impls is None or i in impls]
    grid_name, grid, mtan_grid = grid_for(device, quick, full)
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    settings = harness.Settings.default(device, quick)
    print(f"distillation: impls {impls} (backends available: {available}), device {harness.device_name(device)}")
    print(f"distillation: grid {grid_name}; dtypes {[_dtype_name(d) for d in dtypes]}", flush=True)
    rows = []
    for dtype in dtypes:
        for make in (padnet_cases, gate_sum_cases):
            for T, C, H, W in grid:
                cases = list(make(T, C, H, W, dtype, device, impls))
                impl_names = ",".join(c.impl for c in cases)
                print(f"  {cases[0].op:20s} {impl_names} T={T} C={C} {H}x{W} {_dtype_name(dtype)}", flush=True)
                rows += harness.run_cases(cases, settings)
                del cases
                harness.release(device)
        for C, H, W in mtan_grid:
            cases = list(mtan_cases(C, H, W, dtype, device, impls))
            print(
                f"  {'mtan_attention':20s} {','.join(c.impl for c in cases)} C={C} {H}x{W} {_dtype_name(dtype)}",
                flush=True,
            )
            rows += harness.run_cases(cases, settings)
            del cases
            harness.release(device)
    return rows


def main(argv=None) -> list[dict]:
    return harness.main(
        argv,
        __doc__,
        "distillation",
        run,
        quick_help="T=3, C=64, 60x80 only, fewer reps",
        full_help="the issue's grid on CPU too (default there: a reduced grid)",
    )


if __name__ == "__main__":
    main()
