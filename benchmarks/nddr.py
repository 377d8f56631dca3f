"""NDDR benchmark: the survey's eager module vs torch.compile of it vs the fused backends.

    python benchmarks/nddr.py [--quick] [--full] [--no-save] [--device cpu|cuda] [--impls ...]

impls (each in training mode, bn=train, and in eval mode, bn=eval)
  eager    mtl_kernels.reference.NDDRLayer, the survey code's module (torch.cat
           of the T task features, then per task Conv2d 1x1 (T*C -> C, no
           bias) + BatchNorm2d (momentum 0.05) + ReLU)
  compile  torch.compile(that module, dynamic=False), compiled once per shape,
           dtype and mode
  cpu/cuda mtl_kernels.convert(copy of that module, backend=...), i.e.
           mtl_kernels.nn.NDDR with the same weights, for each backend this
           build has for the device (cpu; cuda and triton on a GPU)

Leaves (their gradients are computed): the T input features and the module's
parameters (conv weights, BN weight and bias), in both modes. In training
mode every rep also updates the BN running statistics, as training does.

Shapes (the issue's grid): T in {2, 3}, B=8, C in {64, 256, 512},
H x W in {120 x 160, 60 x 80}; fp32, and bf16 on GPU (the modules cast with
.to(dtype)). On CPU that grid is far too slow for a small machine (T=3,
C=512 at 120 x 160 is ~300 GFLOP per forward), so on CPU the default is a
reduced grid: T in {2, 3}, C in {64, 256} at 60 x 80, and C=64 at 120 x 160;
--full runs the issue's grid there too (on GPU it is always the default).
--quick: T=3, C=64, 60 x 80 only, fewer reps.

Bytes moved, N = B*C*H*W elements per task, s = element size (weights and
BN parameters ignored):
  forward   reads T inputs, writes T outputs                    2*T*N*s
  backward  reads T output grads + T inputs, writes T input grads  3*T*N*s
            bn=train: + reads the saved pre-BN activations
            (T*C channels)                                        4*T*N*s
  both      the sum                         bn=eval 5*T*N*s, bn=train 6*T*N*s
NDDR is a GEMM (per pixel, [T*C] -> [T*C]: 2*B*H*W*(T*C)^2 FLOP forward,
twice that backward), so at large C it is compute-bound, not memory-bound:
the GB/s and % bw columns are only indicative there; compare times.
"""

from __future__ import annotations

import copy
import gc
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mtl_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import mtl_kernels
from benchmarks import harness
from mtl_kernels import available_backends
from mtl_kernels.reference import NDDRLayer

OP = "nddr"
B = 8
MODES_BN = ("train", "eval")

# (T, C, H, W) grids
FULL_GRID = [(T, C, H, W) for (H, W) in ((120, 160), (60, 80)) for C in (64, 256, 512) for T in (2, 3)]
CPU_GRID = [(T, C, 60, 80) for C in (64, 256) for T in (2, 3)] + [(T, 64, 120, 160) for T in (2, 3)]
QUICK_GRID = [(3, 64, 60, 80)]


def fused_backends(device: torch.device, available: list[str]) -> list[str]:
    wanted = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    return [b for b in wanted if b in available]


def bytes_moved(T: int, C: int, H: int, W: int, dtype: torch.dtype, bn: str) -> dict[str, int]:
    n = B * C * H * W * torch.empty((), dtype=dtype).element_size()
    backward = (4 if bn == "train" else 3) * T * n
    return {"forward": 2 * T * n, "backward": backward, "both": 2 * T * n + backward}


def make_cases(T: int, C: int, H: int, W: int, dtype: torch.dtype, bn: str, device: torch.device, impls: list[str]):
    """Yields one Case per impl; all share the inputs and start from the same module weights."""
    gen = torch.Generator().manual_seed(0)
    tasks = [f"task{i}" for i in range(T)]
    xs = [torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_() for _ in range(T)]
    # The survey's init (diag 0.9 / 0.1 blocks) plus noise, so no weight is special;
    # BN parameters and running statistics away from their identity values.
    survey_state = NDDRLayer(tasks, C).state_dict()
    for key, value in survey_state.items():
        if key.endswith(".0.weight"):
            value.add_(0.01 * torch.randn(value.shape, generator=gen))
        elif key.endswith((".1.weight", ".1.running_var")):
            value.copy_(1.0 + 0.1 * torch.rand(value.shape, generator=gen))
        elif key.endswith((".1.bias", ".1.running_mean")):
            value.copy_(0.1 * torch.randn(value.shape, generator=gen))
    params = {"T": T, "B": B, "C": C, "H": H, "W": W, "bn": bn}
    moved = bytes_moved(T, C, H, W, dtype, bn)
    common = dict(op=OP, params=params, dtype=dtype, device=device, bytes_moved=moved)

    def survey_module():
        m = NDDRLayer(tasks, C)
        m.load_state_dict(survey_state)
        return m.to(device, dtype).train(bn == "train")

    def module_forward(m):
        feats = dict(zip(tasks, xs))

        def forward():
            out = m(feats)
            return [out[t] for t in tasks]

        return forward

    for impl in impls:
        if impl == "eager":
            m = survey_module()
            yield harness.Case(impl="eager", forward=module_forward(m), leaves=[*xs, *m.parameters()], **common)
        elif impl == "compile":
            m = survey_module()
            compiled = harness.compile_reference(m)
            yield harness.Case(
                impl="compile", forward=module_forward(compiled), leaves=[*xs, *m.parameters()], compiled=True, **common
            )
        else:
            m = mtl_kernels.convert(copy.deepcopy(survey_module()), backend=impl)
            assert isinstance(m, mtl_kernels.nn.NDDR) and m.training == (bn == "train")
            yield harness.Case(impl=impl, forward=module_forward(m), leaves=[*xs, *m.parameters()], **common)
        del m
        gc.collect()


def grid_for(device: torch.device, quick: bool, full: bool) -> tuple[str, list[tuple[int, int, int, int]]]:
    if quick:
        return "quick: T=3, C=64, 60x80", QUICK_GRID
    if full or device.type != "cpu":
        return "full (the issue's grid): T in {2,3}, C in {64,256,512}, HxW in {120x160, 60x80}", FULL_GRID
    return "reduced CPU grid: T in {2,3}, C in {64,256} at 60x80, C=64 at 120x160 (--full for the issue's)", CPU_GRID


def run(device: torch.device, quick: bool = False, impls: list[str] | None = None, full: bool = False) -> list[dict]:
    available = available_backends()
    all_impls = ["eager", "compile", *fused_backends(device, available)]
    impls = [i for i in all_impls if impls is None or i in impls]
    grid_name, grid = grid_for(device, quick, full)
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    settings = harness.Settings.default(device, quick)
    print(f"{OP}: impls {impls} (backends available: {available}), device {harness.device_name(device)}", flush=True)
    print(f"{OP}: grid {grid_name}; dtypes {[str(d).removeprefix('torch.') for d in dtypes]}", flush=True)
    rows = []
    for dtype in dtypes:
        for T, C, H, W in grid:
            for bn in MODES_BN:
                cases = list(make_cases(T, C, H, W, dtype, bn, device, impls))
                impl_names = ",".join(c.impl for c in cases)
                print(f"  {impl_names} T={T} C={C} {H}x{W} bn={bn} {str(dtype).removeprefix('torch.')}", flush=True)
                rows += harness.run_cases(cases, settings)
                del cases
                harness.release(device)
    return rows


def main(argv=None) -> list[dict]:
    return harness.main(
        argv,
        __doc__,
        OP,
        run,
        quick_help="T=3, C=64, 60x80 only, fewer reps",
        full_help="the full grid on CPU too (default there: a reduced grid)",
    )


if __name__ == "__main__":
    main()
