"""Triton kernels of gram and combine, as the opaque ops mtl_kernels::gram_triton and
mtl_kernels::combine_triton (contracts in csrc/ops.cpp, definitions in
mtl_kernels/reference/gram.py and combine.py).

Multi-tensor, as apex's multi_tensor_apply: one launch per dtype covers every shared tensor.
Triton takes no arrays of pointers, so the tensors' addresses travel in a small table: an
int64 [T, L] of the T tasks' gradients of the L tensors, cast back to pointers in the kernel,
and a [tiles] map from each program to its tensor and offset. The table goes to the GPU by one
copy from pinned memory that does not wait for the GPU. Each program reads one tile of every
task once (T a constexpr, unrolled); gram writes a partial [T, T] to a row of its own that
torch adds up (deterministic); combine writes out directly.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import _device
from .cross_stitch import _acc_dtype

_BLOCK = 1024
_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _tile_of(addr, tile_tensor, tile_start, numel, L, t, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
             ALIGNED: tl.constexpr):  # fmt: skip
    """Program's tile of task t's gradient of its tensor: pointers, mask, and whether it is full."""
    pid = tl.program_id(0)
    k = tl.load(tile_tensor + pid)
    start = tl.load(tile_start + pid)
    p = tl.load(addr + t * L + k).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # 16-byte tensors and tiles: vector loads
        p = tl.multiple_of(p, 16)
        start = tl.multiple_of(start, BLOCK)
    i = start + tl.arange(0, BLOCK)
    n = tl.load(numel + k)
    return p + i, i < n, start + BLOCK <= n


@triton.jit
def _load(ptrs, mask, full, ACC: tl.constexpr):
    # A mask bounded by a value loaded from memory defeats vectorisation: every tile but each
    # tensor's last is full, and loads unmasked.
    if full:
        x = tl.load(ptrs).to(ACC)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    return x


@triton.jit
def _gram_kernel(addr, tile_tensor, tile_start, numel, part_ptr, L, T: tl.constexpr, DTYPE: tl.constexpr,
                 BLOCK: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    x = ()
    for t in tl.static_range(T):
        ptrs, mask, full = _tile_of(addr, tile_tensor, tile_start, numel, L, t, DTYPE, BLOCK, ALIGNED)
        x = x + (_load(ptrs, mask, full, ACC),)
    for s in tl.static_range(T):
        for t in tl.static_range(T):
            if t >= s:
                tl.store(part_ptr + pid.to(tl.int64) * T * T + s * T + t, tl.sum(x[s] * x[t]).to(tl.float64))


@triton.jit
def _combine_kernel(addr, tile_tensor, tile_start, numel, w_ptr, L, T: tl.constexpr, DTYPE: tl.constexpr,
                    OUT_DTYPE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                    ALIGNED: tl.constexpr):  # fmt: skip
    # addr row T holds out's addresses.
    out, mask, full = _tile_of(addr, tile_tensor, tile_start, numel, L, T, OUT_DTYPE, BLOCK, ALIGNED)
    if ACCUMULATE:
        acc = _load(out, mask, full, ACC)
    else:
        acc = tl.zeros((BLOCK,), ACC)
    for t in tl.static_range(T):
        ptrs, _, _ = _tile_of(addr, tile_tensor, tile_start, numel, L, t, DTYPE, BLOCK, ALIGNED)
        acc += tl.load(w_ptr + t).to(ACC) * _load(ptrs, mask, full, ACC)
    if full:
        tl.store(out, acc.to(OUT_DTYPE))
    else:
        tl.store(out, acc.to(OUT_DTYPE), mask=mask)


def _groups(grads: list[torch.Tensor], K: int, out: list[torch.Tensor] | None) -> dict[tuple, list[int]]:
    """The non-empty tensors k by (gradient dtype, out dtype), in order."""
    groups: dict[tuple, list[int]] = {}
    for k in range(K):
        if grads[k].numel() > 0:
            key = (grads[k].dtype, None if out is None else out[k].dtype)
            groups.setdefault(key, []).append(k)
    return groups


def _tables(rows: list[list[torch.Tensor]], device: torch.device):
    """Address table [len(rows), L], per-tile tensor index and start, numel [L], on `device`;
    with ALIGNED (every address on 16 bytes)."""
    L = len(rows[0])
    numel = np.array([x.numel() for x in rows[0]], dtype=np.int64)
    tiles = -(-numel // _BLOCK)
    tile_tensor = np.repeat(np.arange(L, dtype=np.int32), tiles)
    first = np.repeat(np.cumsum(tiles) - tiles, tiles)
    tile_start = (np.arange(tile_tensor.size, dtype=np.int64) - first) * _BLOCK
    addr = np.array([[x.data_ptr() for x in row] for row in rows], dtype=np.int64)
    aligned = bool((addr % 16 == 0).all() and all(x.element_size() * _BLOCK % 16 == 0 for x in rows[0]))
    tables = _device.upload([torch.from_numpy(a) for a in (addr, tile_tensor, tile_start, numel)], device)
    return (*tables, L, aligned)


@torch.library.custom_op("mtl_kernels::gram_triton", mutates_args=())
def gram_triton(grads: list[torch.Tensor], tasks: int) -> torch.Tensor:
    T, K = tasks, len(grads) // tasks
    any_double = any(g.dtype == torch.float64 for g in grads)
    device = grads[0].device
    G = torch.zeros(T, T, dtype=torch.float64, device=device)
    with _device.device_guard(device):
        for (dtype, _), ks in _groups(grads, K, None).items():
            addr, tile_tensor, tile_start, numel, L, aligned = _tables(
                [[grads[t * K + k] for k in ks] for t in range(T)], device
            )
            part = torch.zeros(tile_tensor.numel(), T, T, dtype=torch.float64, device=device)
            _gram_kernel[(tile_tensor.numel(),)](
                addr, tile_tensor, tile_start, numel, part, L,
                T=T, DTYPE=_TL_DTYPE[dtype], BLOCK=_BLOCK, ACC=_acc_dtype(dtype)[0], ALIGNED=aligned,
            )  # fmt: skip
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
    device = weights.device
    acc_w = weights.to(torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32)
    if acc_w.stride(0) != 1:  # the kernel reads weight t at w_ptr + t: a strided [T] view would be read wrong
        acc_w = torch.empty(T, dtype=acc_w.dtype, device=device).copy_(acc_w)
    with _device.device_guard(device):
        for (dtype, out_dtype), ks in _groups(grads, K, out).items():
            rows = [[grads[t * K + k] for k in ks] for t in range(T)] + [[out[k] for k in ks]]
            addr, tile_tensor, tile_start, numel, L, aligned = _tables(rows, device)
            _combine_kernel[(tile_tensor.numel(),)](
                addr, tile_tensor, tile_start, numel, acc_w, L,
                T=T, DTYPE=_TL_DTYPE[dtype], OUT_DTYPE=_TL_DTYPE[out_dtype], ACCUMULATE=accumulate, BLOCK=_BLOCK,
                ACC=_acc_dtype(dtype)[0], ALIGNED=aligned,
            )  # fmt: skip


@combine_triton.register_fake
def _(weights, grads, out, accumulate):
    return None
