"""Compiles every Triton launch of mtl_kernels for sm_90 (H100) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks the kernels' arithmetic but not what only the
compiler sees: types it rejects, tl.dot shapes, shared memory, launch grids. So this script
runs the ops' real Python wrappers, forward and backward, on CPU tensors while
- triton's active driver is a stand-in that names an sm_90 target (triton compiles for a
  target; only loading and launching need the CUDA driver);
- every launch is compiled with JITFunction.run(warmup=True), never launched: the outputs
  are left uninitialised, which the wrappers' later steps do not mind;
- mtl_kernels.triton._device answers as for an H100 (on_gpu, 132 SMs), so the wrappers pick
  the tiles, warps and grids they pick for CUDA tensors.
It prints one JSON line per distinct compiled kernel. tests/test_triton_sm90.py runs it in a
subprocess (the interpreter must stay off, and it is on in the test process) and checks them.

    python tests/triton_sm90.py
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

# mtl_kernels registers its Triton ops only where a GPU (or the interpreter) is present.
torch.cuda.is_available = lambda: True

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
SM90_SMS = 132
SM90_MAX_SHARED = 232448  # bytes of shared memory a block may opt into on sm_90 (227 KiB)


class _SM90Driver:
    """What JITFunction.run asks of the driver before it compiles."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return SM90

    def __getattr__(self, name):
        raise AttributeError(f"the sm_90 stand-in driver has no {name!r}: only compiling is possible here")


compiled: dict[tuple, dict] = {}
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    bound = dict(zip(self.arg_names, args)) | kwargs
    grid = grid(bound) if callable(grid) else grid
    grid = tuple(grid) + (1,) * (3 - len(grid))
    constexprs = {
        p.name: str(bound[p.name]) for p in self.params if p.is_constexpr and p.name in bound
    }  # the specialisation, readable
    name = f"{self.fn.__module__}.{self.__name__}"
    key = (name, json.dumps(constexprs, sort_keys=True), kernel.metadata.num_warps)
    compiled.setdefault(
        key,
        {
            "kernel": name,
            "constexprs": constexprs,
            "num_warps": kernel.metadata.num_warps,
            "num_stages": kernel.metadata.num_stages,
            "shared": kernel.metadata.shared,
            "grids": [],
        },
    )["grids"].append(list(grid))
    return kernel


driver.set_active(_SM90Driver())
JITFunction.run = _compile_only

from mtl_kernels import _backend  # noqa: E402
from mtl_kernels.ops import combine, cross_stitch, dense_loss, gate_sum, gram, nddr  # noqa: E402
from mtl_kernels.ops.dense_loss import dense_loss_group_stats  # noqa: E402
from mtl_kernels.triton import _device  # noqa: E402

_backend._INTERPRET = True  # lets backend="triton" take the CPU tensors that stand in for CUDA ones
_device.on_gpu = lambda device: True
_device.num_sms = lambda device: SM90_SMS
_device.device_guard = lambda device: contextlib.nullcontext()
_device.upload = lambda ts, device: ts

FMT = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (dtype, layout, T, shape): each kernel meets every dtype and layout, several T, aligned
# (H*W % 16 == 0) and ragged rows, channel counts below and above the tiles, and the
# survey's large shapes (their grids; the tensors are never written, so never paged in).
CASES = [
    (torch.float32, "nchw", 2, (8, 2048, 60, 80)),
    (torch.bfloat16, "nhwc", 3, (8, 256, 120, 160)),
    (torch.float32, "nchw", 2, (2, 64, 16, 20)),
    (torch.bfloat16, "nhwc", 3, (2, 18, 15, 20)),
    (torch.float16, "nchw", 4, (1, 36, 7, 9)),
    (torch.float64, "nhwc", 5, (2, 8, 6, 10)),
    (torch.float32, "nhwc", 3, (2, 144, 15, 20)),
    (torch.bfloat16, "nchw", 2, (2, 256, 8, 12)),
]


# Nothing runs, so inputs need no values: torch.empty leaves even the large ones unpaged.
def _feats(T, shape, dtype, layout):
    return [torch.empty(shape, dtype=dtype, memory_format=FMT[layout], requires_grad=True) for _ in range(T)]


def _backward(outs, leaves):
    torch.autograd.grad(outs, leaves, [torch.empty_like(o) for o in outs], allow_unused=True)


def run_cross_stitch(dtype, layout, T, shape):
    xs = _feats(T, shape, dtype, layout)
    alpha = torch.empty(T, T, shape[1], dtype=dtype, requires_grad=True)
    _backward(cross_stitch(xs, alpha, backend="triton"), [*xs, alpha])


def run_nddr(dtype, layout, T, shape):
    C = shape[1]
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    for training in (True, False):
        xs = _feats(T, shape, dtype, layout)
        w = torch.empty(T, C, T * C, dtype=dtype, requires_grad=True)
        bn_w, bn_b = (torch.empty(T, C, dtype=pd, requires_grad=True) for _ in range(2))
        mean, var = torch.zeros(T, C, dtype=pd), torch.ones(T, C, dtype=pd)
        ys = nddr(xs, w, bn_w, bn_b, mean, var, training, backend="triton")
        _backward(ys, [*xs, w, bn_w, bn_b])


def run_gate_sum(dtype, layout, T, shape):
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    for affine in (False, True):
        feats = _feats(T * (T - 1), shape, dtype, layout)
        gates = _feats(T * (T - 1), shape, dtype, layout)
        res = _feats(T, shape, dtype, layout)
        targets = [t for a in range(T) for t in range(T) if t != a]
        scale, shift = (
            (torch.empty(shape[1], dtype=pd, requires_grad=True) for _ in range(2)) if affine else (None, None)
        )
        outs = gate_sum(res, feats, gates, targets, T, scale, shift, backend="triton")
        _backward(outs, [*feats, *gates, *res, *([scale, shift] if affine else [])])


def run_dense_loss(dtype, layout, T, shape):
    B, _, H, W = shape
    fmt = FMT[layout]
    kinds = {"cross_entropy": 21, "l1": 1, "normals_l1": 3, "balanced_bce": 1}
    for kind, C in kinds.items():
        for upsample in (False, True):
            size = (H // 2, W // 2) if upsample else (H, W)
            pred = torch.empty(B, C, *size, dtype=dtype, memory_format=fmt, requires_grad=True)
            if kind == "cross_entropy":
                target = torch.empty(B, H, W, dtype=torch.int64)
            else:
                target = torch.empty(B, C, H, W, memory_format=fmt)
            for pos_weight in (None, 0.95) if kind == "balanced_bce" else (None,):
                loss = dense_loss(
                    pred, target, kind, pos_weight=pos_weight, check_targets=False, upsample=upsample, backend="triton"
                )
                _backward([loss], [pred])
    # dense_loss_group: every kind in one launch, its backward in one more (both scalings).
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    preds, targets = [], []
    for kind, C in kinds.items():
        preds.append(torch.empty(B, C, H, W, dtype=dtype, memory_format=fmt, requires_grad=True))
        ce = kind == "cross_entropy"
        targets.append(torch.empty(B, H, W, dtype=torch.int64) if ce else torch.empty_like(preds[-1], dtype=acc))
    for inplace in (False, True):
        stats = dense_loss_group_stats(preds, targets, list(kinds), [None, None, None, None], "255", "triton", inplace)
        _backward([s[0] for s in stats], preds)


def run_gram_combine(dtype, layout, T, shape):
    params = [torch.empty(shape, memory_format=FMT[layout]), torch.empty(shape[1])]
    grads = [[torch.empty_like(p, dtype=dtype) for p in params] for _ in range(T)]
    weights = torch.empty(T, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    # Then tensors off 16-byte alignment (no vector loads); out also in float32 (.grad of half gradients).
    misaligned = [[torch.empty(22, dtype=dtype)[1:].view(3, 7)] for _ in range(T)]
    for gs in (grads, misaligned):
        gram(gs, backend="triton")
        for out_dtype in {dtype, torch.float32}:
            out = [torch.empty_like(g, dtype=out_dtype) for g in gs[0]]
            for accumulate in (False, True):
                combine(weights, gs, out, accumulate=accumulate, backend="triton")


OPS = [run_cross_stitch, run_nddr, run_gate_sum, run_dense_loss, run_gram_combine]


def launchable_kernels() -> list[str]:
    """Every @triton.jit function the Triton modules define that is a kernel (named *_kernel)."""
    names = []
    for module in [m for name, m in sys.modules.items() if name.startswith("mtl_kernels.triton.")]:
        for name, value in vars(module).items():
            fn = getattr(value, "fn", None)
            if isinstance(value, JITFunction) and name.endswith("_kernel") and fn.__module__ == module.__name__:
                names.append(f"{module.__name__}.{name}")
    return sorted(names)


def main() -> None:
    assert "triton" in _backend.available_backends(), _backend.available_backends()
    # Then the 64-bit-offset variants (tensors of 2**31 elements or more), on the small cases.
    for int64, cases in ((False, CASES), (True, CASES[2:])):
        if int64:
            _device.needs_int64 = lambda *ts: True
        for run in OPS:
            for case in cases:
                try:
                    run(*case)
                except Exception as e:
                    raise RuntimeError(f"{run.__name__}{case} (int64 offsets: {int64}): {type(e).__name__}: {e}") from e
    for entry in compiled.values():
        print(json.dumps(entry))
    print(json.dumps({"launchable": launchable_kernels(), "triton": triton.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
