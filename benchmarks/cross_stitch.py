"""Cross-stitch benchmark: the survey's eager module vs torch.compile of it vs the fused backends.

    python benchmarks/cross_stitch.py [--quick] [--no-save] [--device cpu|cuda]

impls
  eager    mtl_kernels.reference.CrossStitchUnit, the survey code's module
           (per task: stack of T per-channel products, then sum)
  compile  torch.compile(that module, dynamic=False), compiled once per shape
  cpu/cuda/triton  mtl_kernels.ops.cross_stitch(xs, alpha, backend=...), each
           backend this build has for the device (no triton on CPU: the
           interpreter is a debugging tool, not a benchmark)

Shapes: T in {2, 3, 5}, B=8, C in {64, 256}, H x W = 120 x 160; fp32, and
bf16 on GPU (alpha in the features' dtype, the module cast with .to(dtype)).
--quick: T=3, C=64 only, fewer reps.

Bytes moved, N = B*C*H*W elements per task, s = element size (alpha ignored):
  forward   reads T inputs, writes T outputs               2*T*N*s
  backward  reads T output grads + T inputs, writes T grads 3*T*N*s
  both      the sum                                        5*T*N*s
"""

from __future__ import annotations

import gc
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mtl_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness
from mtl_kernels import available_backends
from mtl_kernels.ops.cross_stitch import cross_stitch
from mtl_kernels.reference import CrossStitchUnit

OP = "cross_stitch"
B, H, W = 8, 120, 160


def fused_backends(device: torch.device, available: list[str]) -> list[str]:
    wanted = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    return [b for b in wanted if b in available]


def bytes_moved(T: int, C: int, dtype: torch.dtype) -> dict[str, int]:
    n = B * C * H * W * torch.empty((), dtype=dtype).element_size()
    return {"forward": 2 * T * n, "backward": 3 * T * n, "both": 5 * T * n}


def make_cases(T: int, C: int, dtype: torch.dtype, device: torch.device, impls: list[str]):
    """Yields one Case per impl; all share the inputs and alpha values."""
    gen = torch.Generator().manual_seed(0)
    tasks = [f"task{i}" for i in range(T)]
    xs = [torch.randn(B, C, H, W, generator=gen).to(device, dtype).requires_grad_() for _ in range(T)]
    # The survey's init (0.9 on the diagonal, 0.1 off it) plus noise, so no weight is special.
    alpha0 = torch.full((T, T, C), 0.1) + 0.8 * torch.eye(T)[:, :, None] + 0.01 * torch.randn(T, T, C, generator=gen)
    alpha = alpha0.to(device, dtype).requires_grad_()
    params = {"T": T, "B": B, "C": C, "H": H, "W": W}
    moved = bytes_moved(T, C, dtype)
    common = dict(op=OP, params=params, dtype=dtype, device=device, bytes_moved=moved)

    def survey_module():
        m = CrossStitchUnit(tasks, C)
        with torch.no_grad():
            for i, ti in enumerate(tasks):
                for j, tj in enumerate(tasks):
                    m.cross_stitch_unit[ti][tj].param.copy_(alpha0[i, j])
        return m.to(device, dtype)

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

            def forward(backend=impl):
                return cross_stitch(xs, alpha, backend=backend)

            yield harness.Case(impl=impl, forward=forward, leaves=[*xs, alpha], **common)
        gc.collect()


def run(device: torch.device, quick: bool = False, impls: list[str] | None = None) -> list[dict]:
    available = available_backends()
    all_impls = ["eager", "compile", *fused_backends(device, available)]
    impls = [i for i in all_impls if impls is None or i in impls]
    Ts, Cs = ((3,), (64,)) if quick else ((2, 3, 5), (64, 256))
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    settings = harness.Settings.default(device, quick)
    print(f"{OP}: impls {impls} (backends available: {available}), device {harness.device_name(device)}", flush=True)
    rows = []
    for dtype in dtypes:
        for C in Cs:
            for T in Ts:
                cases = list(make_cases(T, C, dtype, device, impls))
                print(
                    f"  {','.join(c.impl for c in cases)} T={T} C={C} {str(dtype).removeprefix('torch.')}", flush=True
                )
                rows += harness.run_cases(cases, settings)
                del cases
                harness.release(device)
    return rows


def main(argv=None) -> list[dict]:
    return harness.main(argv, __doc__, OP, run, quick_help="T=3, C=64 only, fewer reps")


if __name__ == "__main__":
    main()
