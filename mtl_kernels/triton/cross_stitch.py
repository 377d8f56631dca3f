"""Triton kernels of cross_stitch, as the opaque ops mtl_kernels::cross_stitch_triton(_backward).

ys[i][b, c, h, w] = sum_j alpha[i, j, c] * xs[j][b, c, h, w]; backward
grad_xs[j] = sum_i alpha[i, j, c] * grad_ys[i] and
grad_alpha[i, j, c] = sum_{b, h, w} grad_ys[i] * xs[j].

Fake kernels and autograd are registered in mtl_kernels/ops/cross_stitch.py.

The T task tensors are passed as tuples of pointers and unrolled with
tl.static_range, so one launch reads every input once and writes every output
once, without stacking the T tensors into one buffer first.

Each tensor is seen as a [C, R] grid of tiles, per image or for the whole batch:
  NCHW:          element (b, c, p) at b*C*P + c*P + p  -> rows r = p,         (sB, sC, sR) = (C*P, P, 1)
  channels_last: element (b, c, p) at (b*P + p)*C + c  -> rows r = b*P + p,   (sB, sC, sR) = (0, 1, C), one "image"
Triton specialises integer arguments equal to 1, so it knows which tile axis is
contiguous and vectorises / coalesces along it in either layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._layout import dense_format, empty_like_all
from . import _device

_NUM_WARPS = 4
# channels_last tiles are at most this wide in C, so that a tile spans several
# rows and each alpha vector loaded is reused over them.
_CL_MAX_BLOCK_C = 64


@triton.jit
def _tile(tile, c, c_mask, n_rt, R, sB, sC, sR, BLOCK_R: tl.constexpr, INT64: tl.constexpr):
    """Offsets and mask of row tile `tile` (image b, row block) for the channels c."""
    if INT64:
        tile = tl.cast(tile, tl.int64)
    b = tile // n_rt
    r = (tile - b * n_rt) * BLOCK_R + tl.arange(0, BLOCK_R)
    if INT64:
        r = r.to(tl.int64)
    offs = b * sB + c[:, None] * sC + r[None, :] * sR
    mask = c_mask[:, None] & (r < R)[None, :]
    return offs, mask


@triton.jit
def _cross_stitch_fwd_kernel(
    xs,  # tuple of T pointers
    ys,  # tuple of T pointers
    alpha,  # [T, T, C], contiguous
    C,
    R,
    n_rt,
    sB,
    sC,
    sR,
    T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    # One [BLOCK_C, BLOCK_R] tile per program: grid (row tiles, channel tiles).
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if INT64:
        c = c.to(tl.int64)
    offs, mask = _tile(tl.program_id(0), c, c_mask, n_rt, R, sB, sC, sR, BLOCK_R, INT64)

    # All T input tiles stay in registers: each input is read once.
    x = ()
    for j in tl.static_range(T):
        x = x + (tl.load(xs[j] + offs, mask=mask, other=0.0).to(ACC),)
    for i in tl.static_range(T):
        y = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
        for j in tl.static_range(T):
            # alpha is tiny and stays in L1/L2; loading one vector at a time keeps registers low.
            a = tl.load(alpha + (i * T + j) * C + c, mask=c_mask, other=0.0).to(ACC)
            y += a[:, None] * x[j]
        tl.store(ys[i] + offs, y.to(ys[i].dtype.element_ty), mask=mask)


@triton.jit
def _cross_stitch_bwd_kernel(
    grad_ys,  # tuple of T pointers
    xs,  # tuple of T pointers
    grad_xs,  # tuple of T pointers
    alpha,  # [T, T, C], contiguous
    partial,  # [num_chunks, T, T, C] in ACC: this program's sums of grad_ys[i] * xs[j]
    C,
    R,
    n_rt,
    n_tiles,
    tiles_per_chunk,
    sB,
    sC,
    sR,
    T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RED: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    # Grid (row chunks, channel tiles); a program walks its chunk of row tiles so
    # that the grad_alpha partials it writes are few (one [T, T, BLOCK_C] per chunk).
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if INT64:
        c = c.to(tl.int64)

    # T*T running sums of grad_ys[i] * xs[j], kept per thread: the reduction
    # over rows across threads (shuffles, shared memory) happens once, at the end.
    acc = ()
    for _ in tl.static_range(T * T):
        acc = acc + (tl.zeros([BLOCK_C, BLOCK_R // RED], dtype=ACC),)

    # alpha is loop-invariant: load its T*T vectors once. (Loading them in the
    # loop makes the compiler hoist T*T 64-bit pointers instead: more registers.)
    a = ()
    for k in tl.static_range(T * T):
        a = a + (tl.load(alpha + k * C + c, mask=c_mask, other=0.0).to(ACC)[:, None],)

    start = chunk * tiles_per_chunk
    end = tl.minimum(start + tiles_per_chunk, n_tiles)
    for tile in range(start, end):
        offs, mask = _tile(tile, c, c_mask, n_rt, R, sB, sC, sR, BLOCK_R, INT64)
        g = ()
        for i in tl.static_range(T):
            g = g + (tl.load(grad_ys[i] + offs, mask=mask, other=0.0).to(ACC),)
        new_acc = ()
        for j in tl.static_range(T):
            # x_j is needed only for this j: load it here, not all T up front.
            x = tl.load(xs[j] + offs, mask=mask, other=0.0).to(ACC)
            gx = a[j] * g[0]
            for i in tl.static_range(1, T):
                gx += a[i * T + j] * g[i]
            tl.store(grad_xs[j] + offs, gx.to(grad_xs[j].dtype.element_ty), mask=mask)
            for i in tl.static_range(T):
                prod = g[i] * x
                if RED > 1:
                    # NCHW with RED-wide vector loads: each thread holds RED
                    # adjacent row elements, so this sum stays in the thread and
                    # the running sums take 1 register per thread instead of RED.
                    prod = tl.sum(tl.reshape(prod, [BLOCK_C, BLOCK_R // RED, RED]), axis=2)
                new_acc = new_acc + (acc[j * T + i] + prod,)
        acc = new_acc

    # Masked lanes loaded zeros, so they add nothing to the sums.
    base = partial + chunk.to(tl.int64) * (T * T) * C + c
    for j in tl.static_range(T):
        for i in tl.static_range(T):
            tl.store(base + (i * T + j) * C, tl.sum(acc[j * T + i], axis=1), mask=c_mask)


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


class _Plan(NamedTuple):
    block_c: int
    block_r: int
    red: int  # row elements each thread sums in registers before accumulating (backward)
    R: int  # rows of the [C, R] grid
    n_rt: int  # row tiles per image
    n_tiles: int  # row tiles in all
    sB: int
    sC: int
    sR: int


def _plan(shape, fmt: torch.memory_format, dtype: torch.dtype, T: int, backward: bool, aligned: bool) -> _Plan:
    """Tile shape for one launch.

    A thread holds `e` elements of each tile, ideally one 16-byte vector. The
    register budget bounds e: forward keeps T input tiles live; backward keeps
    T grad_ys tiles, T*T alpha values and T*T running sums per thread (each
    sum RED-times smaller when the NCHW pre-reduction applies)."""
    B, C, H, W = shape
    P = H * W
    vec = 16 // dtype.itemsize
    regs = 160 if dtype != torch.float64 else 80  # 32-bit registers for data, per thread
    threads = 32 * _NUM_WARPS
    nchw = fmt != torch.channels_last
    # Aligned NCHW rows: Triton sees (P % 16 == 0, 16-byte pointers) and loads `e`-wide vectors along P.
    pre_reduce = backward and nchw and aligned
    if not backward:
        e = min(8, _pow2_floor(64 // T))
    elif pre_reduce:
        e = _pow2_floor((regs - 2 * T * T) // (T + 2))
    else:
        e = _pow2_floor(regs // (2 * T * T + T + 2))
    e = max(1, min(e, vec) if backward else e)
    n = threads * e
    if nchw:
        # Contiguous in P: each image is a [C, P] grid with row stride 1.
        block_r = min(triton.next_power_of_2(P), n)
        block_c = min(triton.next_power_of_2(C), max(1, n // block_r))
        n_rt = triton.cdiv(P, block_r)
        R, n_tiles, sB, sC, sR = P, B * n_rt, C * P, P, 1
    else:
        # Contiguous in C: the whole batch is one [C, B*P] grid with row stride C.
        block_c = min(triton.next_power_of_2(C), _CL_MAX_BLOCK_C, n)
        block_r = min(triton.next_power_of_2(B * P), max(1, n // block_c))
        R = B * P
        n_rt = triton.cdiv(R, block_r)
        n_tiles, sB, sC, sR = n_rt, 0, 1, C
    # Triton gives each thread min(16-byte vector, tile / threads) contiguous
    # elements; the pre-reduction must sum exactly those to stay in-thread.
    red = min(e, max(1, block_c * block_r // threads)) if pre_reduce else 1
    return _Plan(block_c, block_r, red, R, n_rt, n_tiles, sB, sC, sR)


def _target_programs(device: torch.device) -> int:
    """How many backward programs to aim for: a few per SM keeps every SM busy
    while the partial grad_alpha buffer stays small."""
    return 8 * _device.num_sms(device) if _device.on_gpu(device) else 4


def _in_format(ts: list[torch.Tensor], fmt: torch.memory_format) -> tuple[torch.Tensor, ...]:
    # A no-op for tensors already dense in `fmt`; others are copied once.
    return tuple(t.contiguous(memory_format=fmt) for t in ts)


@torch.library.custom_op("mtl_kernels::cross_stitch_triton", mutates_args=())
def cross_stitch_triton(xs: list[torch.Tensor], alpha: torch.Tensor) -> list[torch.Tensor]:
    fmt = dense_format(xs[0])
    ys = empty_like_all(xs, fmt)
    x0 = xs[0]
    if x0.numel() == 0:
        return ys
    T = len(xs)
    xs_f = _in_format(xs, fmt)
    alpha = alpha.contiguous()
    pl = _plan(x0.shape, fmt, x0.dtype, T, backward=False, aligned=False)
    acc_tl, _ = _acc_dtype(x0.dtype)
    grid = (pl.n_tiles, triton.cdiv(x0.shape[1], pl.block_c))
    with _device.device_guard(x0.device):
        _cross_stitch_fwd_kernel[grid](
            xs_f, tuple(ys), alpha, x0.shape[1], pl.R, pl.n_rt, pl.sB, pl.sC, pl.sR,
            T=T, BLOCK_C=pl.block_c, BLOCK_R=pl.block_r, ACC=acc_tl, INT64=_device.needs_int64(xs_f[0]),
            num_warps=_NUM_WARPS,
        )  # fmt: skip
    return ys


@torch.library.custom_op("mtl_kernels::cross_stitch_triton_backward", mutates_args=())
def cross_stitch_triton_backward(
    grad_ys: list[torch.Tensor], xs: list[torch.Tensor], alpha: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    fmt = dense_format(xs[0])
    grad_xs = empty_like_all(xs, fmt)
    x0 = xs[0]
    T, C = len(xs), x0.shape[1]
    acc_tl, acc_torch = _acc_dtype(x0.dtype)
    if x0.numel() == 0:
        return grad_xs, torch.zeros((T, T, C), dtype=alpha.dtype, device=alpha.device)
    xs_f = _in_format(xs, fmt)
    gys_f = _in_format(grad_ys, fmt)
    alpha = alpha.contiguous()
    P = x0.shape[2] * x0.shape[3]
    aligned = P % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in (*xs_f, *gys_f, *grad_xs))
    pl = _plan(x0.shape, fmt, x0.dtype, T, backward=True, aligned=aligned)
    n_ct = triton.cdiv(C, pl.block_c)
    # Split the row tiles into chunks: about _target_programs programs in all,
    # every chunk non-empty, so that every partial row gets written.
    n_chunks = max(1, min(pl.n_tiles, _target_programs(x0.device) // n_ct))
    tiles_per_chunk = triton.cdiv(pl.n_tiles, n_chunks)
    n_chunks = triton.cdiv(pl.n_tiles, tiles_per_chunk)
    partial = torch.empty((n_chunks, T, T, C), dtype=acc_torch, device=x0.device)
    with _device.device_guard(x0.device):
        _cross_stitch_bwd_kernel[(n_chunks, n_ct)](
            gys_f, xs_f, tuple(grad_xs), alpha, partial, C, pl.R, pl.n_rt, pl.n_tiles, tiles_per_chunk,
            pl.sB, pl.sC, pl.sR,
            T=T, BLOCK_C=pl.block_c, BLOCK_R=pl.block_r, RED=pl.red, ACC=acc_tl, INT64=_device.needs_int64(xs_f[0]),
            num_warps=_NUM_WARPS,
        )  # fmt: skip
    # Fixed-order reduction over chunks: deterministic, no atomics.
    grad_alpha = partial.sum(dim=0).to(alpha.dtype)
    return grad_xs, grad_alpha
