"""Gradient-balancing kernels benchmark: gram and combine over a ResNet-50-sized shared encoder.

    python benchmarks/gram.py [--quick] [--no-save] [--device cpu|cuda]

The gradients: T tasks' gradients of the parameters of a ResNet-50 (its 161 parameter tensors,
25.5M elements; shapes built here, no torchvision needed). Ops, mode "forward" (no autograd):
  gram     G[s, t] = g_s . g_t over all tensors      -> [T, T]
  combine  out[k] = sum_t w_t g_t[k] for every tensor -> written into K .grad-like tensors
impls
  peer     what peer libraries do: flatten each task's gradient into one copy (torch.cat), then a
           Python loop of torch.dot over the pairs (gram), or reshape a weighted sum of the flat
           copies back into the tensors (combine)
  eager    mtl_kernels.reference (per tensor: stack and matmul / weighted sum; no flat copy)
  cpu/cuda/triton  mtl_kernels.ops.gram / combine(backend=...)
T in {2, 3, 5}, fp32 (and bf16 on GPU). --quick: T=3 only.

Bytes moved, N = 25.5M elements of size s: gram reads T*N*s; combine reads T*N*s, writes N*s.
"""

from __future__ import annotations

import gc
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mtl_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness
from mtl_kernels import available_backends, reference
from mtl_kernels.ops import combine, gram

OP = "gram"


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's ResNet-50 (conv, BN weight and bias, fc)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            cout = width * 4
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            shapes += [(cout, width, 1, 1), (cout,), (cout,)]
            if b == 0:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return [*shapes, (1000, 2048), (1000,)]


def peer_gram(grads):
    flat = [torch.cat([g.reshape(-1) for g in task]) for task in grads]
    T = len(flat)
    G = torch.zeros(T, T, device=flat[0].device)
    for s in range(T):
        for t in range(s, T):
            G[s, t] = G[t, s] = torch.dot(flat[s], flat[t])
    return G


def peer_combine(w, grads, out):
    flat = torch.stack([torch.cat([g.reshape(-1) for g in task]) for task in grads])
    total = (w[:, None] * flat).sum(0)
    offset = 0
    for o in out:
        o.copy_(total[offset : offset + o.numel()].view_as(o))
        offset += o.numel()
    return out


def fused_backends(device: torch.device, available: list[str]) -> list[str]:
    wanted = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    return [b for b in wanted if b in available]


def make_cases(T, dtype, device, impls):
    gen = torch.Generator().manual_seed(0)
    shapes = resnet50_shapes()
    grads = [[torch.randn(s, generator=gen).to(device, dtype) for s in shapes] for _ in range(T)]
    out = [torch.zeros(s, device=device, dtype=dtype) for s in shapes]
    w = torch.rand(T, generator=gen).to(device)
    n = sum(g.numel() for g in grads[0]) * grads[0][0].element_size()
    params = {"T": T, "tensors": len(shapes), "numel": sum(g.numel() for g in grads[0])}
    for op, moved in (("gram", T * n), ("combine", (T + 1) * n)):
        common = dict(params=params, dtype=dtype, device=device, leaves=[], bytes_moved={"forward": moved})
        for impl in impls:
            yield harness.Case(op=op, impl=impl, forward=step(op, impl, grads, w, out), **common)
        gc.collect()


def step(op, impl, grads, w, out):
    """One call of `op` by `impl`, returning a list of tensors as harness.Case wants."""
    if op == "gram":
        if impl == "peer":
            return lambda: [peer_gram(grads)]
        if impl == "eager":
            return lambda: [reference.gram(grads)]
        return lambda: [gram(grads, backend=impl)]
    if impl == "peer":
        return lambda: peer_combine(w, grads, out)
    if impl == "eager":
        return lambda: reference.combine(w, grads, out)
    return lambda: combine(w, grads, out, backend=impl)


def run(device: torch.device, quick: bool = False, impls: list[str] | None = None) -> list[dict]:
    available = available_backends()
    all_impls = ["peer", "eager", *fused_backends(device, available)]
    impls = [i for i in all_impls if impls is None or i in impls]
    Ts = (3,) if quick else (2, 3, 5)
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    settings = harness.Settings.default(device, quick)
    print(f"{OP}: impls {impls} (backends available: {available}), device {harness.device_name(device)}", flush=True)
    rows = []
    for dtype in dtypes:
        for T in Ts:
            cases = list(make_cases(T, dtype, device, impls))
            for op in dict.fromkeys(c.op for c in cases):  # gram, then combine: each op's impls together
                group = [c for c in cases if c.op == op]
                print(
                    f"  {op:8s} {','.join(c.impl for c in group)} T={T} {str(dtype).removeprefix('torch.')}", flush=True
                )
                rows += harness.run_cases(group, settings, modes=("forward",))
            del cases, group
            harness.release(device)
    return rows


def main(argv=None) -> list[dict]:
    return harness.main(argv, __doc__, OP, run, quick_help="T=3 only")


if __name__ == "__main__":
    main()
