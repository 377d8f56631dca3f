"""Triton kernels of gram and combine, as the opaque ops mtl_kernels::gram_triton and
mtl_kernels::combine_triton (contracts in csrc/ops.cpp, definitions in
mtl_kernels/reference/gram.py and combine.py).

One launch per shared tensor k: its kernel gets the tuple of the T tasks' k-th gradients (T a
constexpr, unrolled with tl.static_range), so each element of every task is read once. gram's
programs each write a partial [T, T] of their block to a row of their own; torch adds the rows
(deterministic). combine writes out[k] directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _device

_BLOCK = 1024


@triton.jit
def _gram_kernel(gs, part_ptr, N, T: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    x = ()
    for t in tl.static_range(T):
        x = x + (tl.load(gs[t] + i, mask=mask, other=0.0).to(ACC),)
    for s in tl.static_range(T):
        for t in tl.static_range(T):
            if t >= s:
                tl.store(part_ptr + pid * T * T + s * T + t, tl.sum(x[s] * x[t]).to(tl.float64))


@triton.jit
def _combine_kernel(gs, w_ptr, out_ptr, N, T: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
                    ACC: tl.constexpr):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    if ACCUMULATE:
        acc = tl.load(out_ptr + i, mask=mask, other=0.0).to(ACC)
    else:
        acc = tl.zeros((BLOCK,), ACC)
    for t in tl.static_range(T):
        acc += tl.load(w_ptr + t).to(ACC) * tl.load(gs[t] + i, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@torch.library.custom_op("mtl_kernels::gram_triton", mutates_args=())
def gram_triton(grads: list[torch.Tensor], tasks: int) -> torch.Tensor:
    T, K = tasks, len(grads) // tasks
    any_double = any(g.dtype == torch.float64 for g in grads)
    G = torch.zeros(T, T, dtype=torch.float64, device=grads[0].device)
    with _device.device_guard(grads[0].device):
        for k in range(K):
            n = grads[k].numel()
            if n == 0:
                continue
            programs = triton.cdiv(n, _BLOCK)
            part = torch.zeros(programs, T, T, dtype=torch.float64, device=G.device)
            gs = tuple(grads[t * K + k] for t in range(T))
            _gram_kernel[(programs,)](gs, part, n, T=T, BLOCK=_BLOCK, ACC=_acc(grads[k].dtype))
            G += part.sum(0)
    G = G.triu() + G.triu(1).T
    return G.to(torch.float64 if any_double else torch.float32)


@gram_triton.register_fake
def _(grads, tasks):
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    return grads[0].new_empty((tasks, tasks), dtype=dtype)


@torch.library.custom_op("mtl_kernels::combine_triton", mutates_args=("out",))
def combine_triton(weights: torch.Tensor, grads: list[torch.Tensor], out: list[torch.Tensor], accumulate: bool) -> None:
    T = weights.numel()
    K = len(grads) // T
    acc_w = weights.to(torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32)
    with _device.device_guard(weights.device):
        for k in range(K):
            n = grads[k].numel()
            if n == 0:
                continue
            gs = tuple(grads[t * K + k] for t in range(T))
            _combine_kernel[(triton.cdiv(n, _BLOCK),)](
                gs, acc_w, out[k], n, T=T, ACCUMULATE=accumulate, BLOCK=_BLOCK, ACC=_acc(grads[k].dtype)
            )


@combine_triton.register_fake
def _(weights, grads, out, accumulate):
    return None
