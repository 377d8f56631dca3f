"""Triton kernels of NDDR fusion, as the opaque ops mtl_kernels::nddr_{train,eval}_triton(_backward).

Same signatures, return conventions and math as the C++ ops mtl_kernels::nddr_train,
nddr_train_backward, nddr_eval and nddr_eval_backward (csrc/ops.cpp, csrc/common/nddr.h):

  z = weight @ concat_j xs[j]              (the 1x1 convolution; the concatenation is never built)
  train: mean, var = batch statistics of z per channel k = t*C + c (biased variance),
         ys[t] = ReLU(z[:, tC:(t+1)C] * scale + shift), scale = bn_weight / sqrt(var + eps),
         shift = bn_bias - mean * scale
  eval:  ys[t] = ReLU(z[:, tC:(t+1)C] + bias)  (BN folded into weight / bias by the caller)

Fake kernels and autograd are registered in mtl_kernels/ops/nddr.py.

What runs where (every GEMM is a Triton tl.dot kernel; torch only does O(T*C) and
O(T*C*T*C) vector work and the fixed-order reduction of partial buffers):
  _gemm_fwd_kernel    ONE launch for all T tasks' convolutions: each program computes an
                      output tile [BLOCK_K out channels of one task x BLOCK_P pixels], its
                      K loop runs over the T inputs (tl.static_range, read in place) and over
                      channel blocks of each. Training: stores the tile into z and writes
                      the tile's per-channel (mean, M2) into a partial buffer (pixel
                      counts per tile come from the shape, host side); the partials are
                      merged with Chan's parallel formula by torch ops (fp64, fixed order:
                      deterministic, no atomics). Eval: + bias, ReLU, and the
                      tile goes straight into ys[t] (no z).
  _bn_relu_kernel     training epilogue: ys[t] = ReLU(z * scale + shift), all T tasks per program.
  _relu_sums_kernel   training backward: per-channel partial sums of dy' and dy' * (z - mean),
                      dy' = dy masked by z * scale + shift > 0; reduced over chunks by torch.
  _grad_x_kernel      grad_xs[j] = weight[:, jC:(j+1)C]^T @ dz (tl.dot), K loop over the T
                      grad_ys / z tensors in place.
  _grad_w_kernel      grad_weight = dz @ concat_j xs[j]^T summed over the batch (tl.dot), one
                      [BLOCK_K, BLOCK_C] tile per program and chunk of pixel tiles; partial
                      tiles reduced over chunks by torch (fixed order). Eval also sums dz
                      per channel here for grad_bias.
  In both backward GEMMs dz is never materialised: each dz tile is computed on the fly
  from dy and z (training: dz = dy' * scale + z * a + b) or dy and y (eval: dz = dy * [y > 0]),
  rounded to the features' dtype as the reference's materialised dz is.

Interpreter (CPU tensors, TRITON_INTERPRET=1): its tl.dot multiplies bf16 operands' raw bits,
so bf16 tiles are upcast to fp32 before tl.dot there (UPCAST; exact). GPU tile sizes / warps
were chosen by compiling for sm_90 (no spills but a few in the fp32 / fp64 training backward),
not by timing.

Precision: fp16 / bf16 operands with fp32 accumulation; fp32 with input_precision="ieee"
(no TF32); fp64 operands with tl.dot in fp64 (the interpreter supports it; for sm_90 Triton
lowers it to DMMA: checked by compiling every kernel without a GPU, never run on one).

Layouts: every tensor is walked as a [channels, rows] grid, per image or for the whole
batch (as in cross_stitch.py):
  NCHW:          (b, c, p) at b*Cn*P + c*P + p   -> rows r = p,       (sB, sC, sR) = (Cn*P, P, 1)
  channels_last: (b, c, p) at (b*P + p)*Cn + c   -> rows r = b*P + p, (sB, sC, sR) = (0, 1, Cn), one "image"
with Cn = C for the task tensors and T*C for z.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._layout import dense_format, empty_like_all
from . import _device
from .cross_stitch import _acc_dtype

_NUM_WARPS = 4
_MIN_DOT = 16  # tl.dot needs every tile dimension >= 16


# ----------------------------------------------------------------- kernels


@triton.jit
def _rows(tile, n_rt, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """Image index b and row indices r of row tile `tile`."""
    if INT64:
        tile = tl.cast(tile, tl.int64)
    b = tile // n_rt
    r = (tile - b * n_rt) * BLOCK_P + tl.arange(0, BLOCK_P)
    if INT64:
        r = r.to(tl.int64)
    return b, r


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: bf16 operands under the interpreter, whose tl.dot multiplies
    their raw bits; fp32 products of bf16 values are exact, so this changes nothing else."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # out_dtype spelled out: Triton before 3.8 (3.6 on the GPU image) takes fp32 by default
    # and rejects an fp64 accumulator.
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def _select(ptrs, i, T: tl.constexpr):
    """ptrs[i] for a run-time index i (ptrs: a tuple of T pointers)."""
    p = ptrs[0]
    for t in tl.static_range(1, T):
        if i == t:
            p = ptrs[t]
    return p


@triton.jit
def _dz_tile(
    gy_ptr, zy_ptr, k, co, co_mask, b, r, r_mask,
    sxB, sxC, sxR, szB, szC, szR,
    scale, shift, a, bb,
    TRAIN: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr,
):  # fmt: skip
    """dz[k, r] for the channels k = t*C + co of task t, as [len(co), BLOCK_P] in ACC,
    rounded to the features' dtype DT; zero outside the masks.

    TRAIN: dz = dy' * scale + z * a + b, dy' = dy * [z * scale + shift > 0], zy_ptr = z.
    Eval:  dz = dy * [y > 0], zy_ptr = ys[t]."""
    m = co_mask[:, None] & r_mask[None, :]
    gy = tl.load(gy_ptr + b * sxB + co[:, None] * sxC + r[None, :] * sxR, mask=m, other=0.0).to(ACC)
    if TRAIN:
        zt = tl.load(zy_ptr + b * szB + k[:, None] * szC + r[None, :] * szR, mask=m, other=0.0).to(ACC)
        sc = tl.load(scale + k, mask=co_mask, other=0.0)[:, None]
        sh = tl.load(shift + k, mask=co_mask, other=0.0)[:, None]
        av = tl.load(a + k, mask=co_mask, other=0.0)[:, None]
        bv = tl.load(bb + k, mask=co_mask, other=0.0)[:, None]
        dy = tl.where(zt * sc + sh <= 0, 0.0, gy)
        dz = tl.where(m, dy * sc + zt * av + bv, 0.0)
    else:
        yt = tl.load(zy_ptr + b * sxB + co[:, None] * sxC + r[None, :] * sxR, mask=m, other=0.0).to(ACC)
        dz = tl.where(yt <= 0, 0.0, gy)  # not yt > 0: a NaN output passes dy, as F.relu's backward
    return dz.to(DT)


@triton.jit
def _gemm_fwd_kernel(
    xs,  # tuple of T pointers, [B, C, H, W] each
    w,  # [T*C, T*C], contiguous
    z,  # TRAIN: [B, T*C, H, W]
    ys,  # eval: tuple of T pointers
    bias,  # eval: [T*C]
    partial,  # TRAIN: [n_tiles, 2, T*C] in ACC: mean and M2 of this tile's pixels (counts: host side)
    C, R, n_rt, n_kb,
    sxB, sxC, sxR, szB, szC, szR,
    T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    TRAIN: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # Grid (row tiles, T * n_kb): output tile = channels [kb*BLOCK_K, +BLOCK_K) of task t.
    tile = tl.program_id(0)
    t = tl.program_id(1) // n_kb
    kb = tl.program_id(1) - t * n_kb
    TC = T * C
    b, r = _rows(tile, n_rt, BLOCK_P, INT64)
    r_mask = r < R
    co = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    co_mask = co < C
    k = t * C + co
    if INT64:  # every index that multiplies a stride, not only the tile's start
        k = k.to(tl.int64)
        co = co.to(tl.int64)
    DT = xs[0].dtype.element_ty

    acc = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
    # K loop: the T inputs in place, then channel blocks of each.
    for j in tl.static_range(T):
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < C
            if INT64:
                c = c.to(tl.int64)
            wt = tl.load(
                w + k[:, None] * TC + (j * C + c)[None, :], mask=co_mask[:, None] & c_mask[None, :], other=0.0
            ).to(DT)  # the reference converts the weight to the features' dtype
            xt = tl.load(
                xs[j] + b * sxB + c[:, None] * sxC + r[None, :] * sxR,
                mask=c_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            acc = _mma(wt, xt, acc, UPCAST)

    m = co_mask[:, None] & r_mask[None, :]
    # z is stored in the features' dtype; everything downstream sees the rounded value.
    zq = acc.to(DT)
    if TRAIN:
        tl.store(z + b * szB + k[:, None] * szC + r[None, :] * szR, zq, mask=m)
        v = zq.to(ACC)
        cnt = tl.sum(r_mask.to(ACC), axis=0)  # >= 1: no tile is empty
        mu = tl.sum(tl.where(m, v, 0.0), axis=1) / cnt
        d = tl.where(m, v - mu[:, None], 0.0)
        m2 = tl.sum(d * d, axis=1)
        base = partial + tile.to(tl.int64) * 2 * TC + k
        tl.store(base, mu, mask=co_mask)
        tl.store(base + TC, m2, mask=co_mask)
    else:
        bv = tl.load(bias + k, mask=co_mask, other=0.0).to(ACC)
        y = zq.to(ACC) + bv[:, None]
        y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as F.relu
        offs = b * sxB + co[:, None] * sxC + r[None, :] * sxR
        for i in tl.static_range(T):
            if i == t:
                tl.store(ys[i] + offs, y.to(DT), mask=m)


@triton.jit
def _bn_relu_kernel(
    z, ys, scale, shift,
    C, R, n_rt,
    sxB, sxC, sxR, szB, szC, szR,
    T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    # Grid (row tiles, channel tiles); all T tasks per program.
    b, r = _rows(tl.program_id(0), n_rt, BLOCK_P, INT64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if INT64:
        c = c.to(tl.int64)
    m = c_mask[:, None] & (r < R)[None, :]
    offs_y = b * sxB + c[:, None] * sxC + r[None, :] * sxR
    for t in tl.static_range(T):
        k = t * C + c
        zt = tl.load(z + b * szB + k[:, None] * szC + r[None, :] * szR, mask=m, other=0.0)
        sc = tl.load(scale + k, mask=c_mask, other=0.0)
        sh = tl.load(shift + k, mask=c_mask, other=0.0)
        y = zt.to(sc.dtype) * sc[:, None] + sh[:, None]
        y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as F.relu
        tl.store(ys[t] + offs_y, y.to(ys[t].dtype.element_ty), mask=m)


@triton.jit
def _relu_sums_kernel(
    grad_ys, z, scale, shift, mean,
    partial,  # [n_chunks, 2, T*C] in ACC: sums of dy' and dy' * (z - mean)
    C, R, n_rt, n_tiles, tiles_per_chunk,
    sxB, sxC, sxR, szB, szC, szR,
    T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    # Grid (row chunks, channel tiles); all T tasks per program.
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if INT64:
        c = c.to(tl.int64)
    s1 = ()
    s2 = ()
    sc = ()
    sh = ()
    mu = ()
    for t in tl.static_range(T):
        s1 = s1 + (tl.zeros([BLOCK_C], dtype=ACC),)
        s2 = s2 + (tl.zeros([BLOCK_C], dtype=ACC),)
        sc = sc + (tl.load(scale + t * C + c, mask=c_mask, other=0.0)[:, None],)
        sh = sh + (tl.load(shift + t * C + c, mask=c_mask, other=0.0)[:, None],)
        mu = mu + (tl.load(mean + t * C + c, mask=c_mask, other=0.0)[:, None],)
    start = chunk * tiles_per_chunk
    end = tl.minimum(start + tiles_per_chunk, n_tiles)
    for tile in range(start, end):
        b, r = _rows(tile, n_rt, BLOCK_P, INT64)
        m = c_mask[:, None] & (r < R)[None, :]
        offs_y = b * sxB + c[:, None] * sxC + r[None, :] * sxR
        n1 = ()
        n2 = ()
        for t in tl.static_range(T):
            k = t * C + c
            zt = tl.load(z + b * szB + k[:, None] * szC + r[None, :] * szR, mask=m, other=0.0).to(ACC)
            gy = tl.load(grad_ys[t] + offs_y, mask=m, other=0.0).to(ACC)
            dy = tl.where(m, tl.where(zt * sc[t] + sh[t] <= 0, 0.0, gy), 0.0)  # NaN passes, as F.relu's
            n1 = n1 + (s1[t] + tl.sum(dy, axis=1),)
            n2 = n2 + (s2[t] + tl.sum(dy * (zt - mu[t]), axis=1),)
        s1 = n1
        s2 = n2
    base = partial + chunk.to(tl.int64) * 2 * T * C + c
    for t in tl.static_range(T):
        tl.store(base + t * C, s1[t], mask=c_mask)
        tl.store(base + T * C + t * C, s2[t], mask=c_mask)


@triton.jit
def _grad_x_kernel(
    grad_ys,  # tuple of T pointers
    zy,  # TRAIN: z; eval: tuple of T pointers ys
    w,  # [T*C, T*C], contiguous
    grad_xs,  # tuple of T pointers
    scale, shift, a, bb,  # TRAIN: [T*C] in ACC
    C, R, n_rt, n_cb,
    sxB, sxC, sxR, szB, szC, szR,
    T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    TRAIN: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # Grid (row tiles, T * n_cb): tile [BLOCK_C channels of grad_xs[j] x BLOCK_P pixels].
    tile = tl.program_id(0)
    j = tl.program_id(1) // n_cb
    cb = tl.program_id(1) - j * n_cb
    TC = T * C
    b, r = _rows(tile, n_rt, BLOCK_P, INT64)
    r_mask = r < R
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if INT64:
        c = c.to(tl.int64)
    DT = grad_xs[0].dtype.element_ty

    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    # K loop over the T*C channels of dz: the T tasks' tensors in place, then channel blocks.
    for t in tl.static_range(T):
        if TRAIN:
            zy_t = zy
        else:
            zy_t = zy[t]
        for k0 in range(0, C, BLOCK_K):
            co = k0 + tl.arange(0, BLOCK_K)
            co_mask = co < C
            k = t * C + co
            if INT64:
                co = co.to(tl.int64)
                k = k.to(tl.int64)
            dz = _dz_tile(
                grad_ys[t], zy_t, k, co, co_mask, b, r, r_mask, sxB, sxC, sxR, szB, szC, szR,
                scale, shift, a, bb, TRAIN, ACC, DT,
            )  # fmt: skip
            wt = tl.load(
                w + k[None, :] * TC + (j * C + c)[:, None], mask=c_mask[:, None] & co_mask[None, :], other=0.0
            ).to(DT)  # [BLOCK_C, BLOCK_K] = weight[k, jC + c]^T
            acc = _mma(wt, dz, acc, UPCAST)

    offs = b * sxB + c[:, None] * sxC + r[None, :] * sxR
    m = c_mask[:, None] & r_mask[None, :]
    for i in tl.static_range(T):
        if i == j:
            tl.store(grad_xs[i] + offs, acc.to(DT), mask=m)


@triton.jit
def _grad_w_kernel(
    grad_ys,  # tuple of T pointers
    zy,  # TRAIN: z; eval: tuple of T pointers ys
    xs,  # tuple of T pointers
    scale, shift, a, bb,  # TRAIN: [T*C] in ACC
    partial_w,  # [n_chunks, T*C, T*C] in ACC
    partial_b,  # eval: [n_chunks, T*C] in ACC, sums of dz
    C, R, n_rt, n_tiles, tiles_per_chunk, n_kb, n_cb,
    sxB, sxC, sxR, szB, szC, szR,
    T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    TRAIN: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # Grid (row chunks, T * n_kb, T * n_cb): tile grad_weight[tC + co, jC + c] over a chunk of row tiles.
    chunk = tl.program_id(0)
    t = tl.program_id(1) // n_kb
    kb = tl.program_id(1) - t * n_kb
    j = tl.program_id(2) // n_cb
    cb = tl.program_id(2) - j * n_cb
    TC = T * C
    co = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    co_mask = co < C
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    k = t * C + co
    if INT64:
        k = k.to(tl.int64)
        co = co.to(tl.int64)
        c = c.to(tl.int64)
    DT = xs[0].dtype.element_ty
    gy_ptr = _select(grad_ys, t, T)
    x_ptr = _select(xs, j, T)
    if TRAIN:
        zy_ptr = zy
    else:
        zy_ptr = _select(zy, t, T)

    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC)
    sum_dz = tl.zeros([BLOCK_K], dtype=ACC)
    start = chunk * tiles_per_chunk
    end = tl.minimum(start + tiles_per_chunk, n_tiles)
    for tile in range(start, end):
        b, r = _rows(tile, n_rt, BLOCK_P, INT64)
        r_mask = r < R
        dz = _dz_tile(
            gy_ptr, zy_ptr, k, co, co_mask, b, r, r_mask, sxB, sxC, sxR, szB, szC, szR,
            scale, shift, a, bb, TRAIN, ACC, DT,
        )  # fmt: skip
        xt = tl.load(
            x_ptr + b * sxB + c[None, :] * sxC + r[:, None] * sxR, mask=r_mask[:, None] & c_mask[None, :], other=0.0
        )  # [BLOCK_P, BLOCK_C]
        acc = _mma(dz, xt, acc, UPCAST)
        if not TRAIN:
            sum_dz += tl.sum(dz.to(ACC), axis=1)

    base = partial_w + chunk.to(tl.int64) * TC * TC
    tl.store(base + k[:, None] * TC + (j * C + c)[None, :], acc, mask=co_mask[:, None] & c_mask[None, :])
    if not TRAIN:
        # One program per output channel block writes the bias partial.
        first = tl.program_id(2) == 0
        tl.store(partial_b + chunk.to(tl.int64) * TC + k, sum_dz, mask=co_mask & first)


# ----------------------------------------------------------------- host side


class _Geom(NamedTuple):
    R: int  # rows of the [channels, R] grid
    n_rt: int  # row tiles per image
    n_tiles: int  # row tiles in all
    sx: tuple[int, int, int]  # (sB, sC, sR) of a task tensor, C channels
    sz: tuple[int, int, int]  # (sB, sC, sR) of z, T*C channels


def _geom(shape, T: int, fmt: torch.memory_format, block_p: int) -> _Geom:
    B, C, H, W = shape
    P = H * W
    TC = T * C
    if fmt == torch.channels_last:
        R = B * P
        n_rt = triton.cdiv(R, block_p)
        return _Geom(R, n_rt, n_rt, (0, 1, C), (0, 1, TC))
    n_rt = triton.cdiv(P, block_p)
    return _Geom(P, n_rt, B * n_rt, (C * P, P, 1), (TC * P, P, 1))


def _rows_of(shape, fmt) -> int:
    B, _, H, W = shape
    return B * H * W if fmt == torch.channels_last else H * W


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


class _Blocks(NamedTuple):
    out: int  # output-tile channels (BLOCK_K of the forward and grad_weight, BLOCK_C of grad_x)
    red: int  # channels per step of the K loop (BLOCK_C of the forward and grad_weight, BLOCK_K of grad_x)
    pix: int  # BLOCK_P
    num_warps: int
    num_stages: int


def _gemm_blocks(shape, fmt, dtype, device) -> _Blocks:
    """Tiles of the GEMM kernels, every dimension >= 16 (tl.dot), at most the problem's size
    rounded up to a power of 2."""
    C = shape[1]
    rows = _rows_of(shape, fmt)
    if not _device.on_gpu(device):
        # The interpreter runs one program at a time, numpy per op: few big tiles are fastest.
        return _Blocks(_pow2(C, _MIN_DOT, 64), _pow2(C, _MIN_DOT, 64), _pow2(rows, _MIN_DOT, 256), 4, 1)
    # Checked for sm_90 (compiled without a GPU): 8 warps with these tiles keep every kernel,
    # dz-on-the-fly ones included, within 255 registers (fp32 / fp64 backward: a few spills).
    red = 64 if dtype.itemsize <= 2 else 32
    return _Blocks(_pow2(C, _MIN_DOT, 64), _pow2(C, _MIN_DOT, red), _pow2(rows, _MIN_DOT, 64), 8, 2)


def _ew_blocks(shape, fmt, device):
    """(BLOCK_C, BLOCK_P) of the elementwise / reduction kernels: a tile of about 1-2K elements."""
    C = shape[1]
    rows = _rows_of(shape, fmt)
    n = 2048 if _device.on_gpu(device) else 8192
    if fmt == torch.channels_last:
        bc = _pow2(C, 1, 64)
        return bc, _pow2(rows, 1, max(1, n // bc))
    bp = _pow2(rows, 1, n)
    return _pow2(C, 1, max(1, n // bp)), bp


def _target_programs(device: torch.device) -> int:
    return 4 * _device.num_sms(device) if _device.on_gpu(device) else 4


def _chunks(n_tiles: int, other_programs: int, device: torch.device) -> tuple[int, int]:
    """(n_chunks, tiles_per_chunk): about _target_programs programs in all, no chunk empty."""
    n_chunks = max(1, min(n_tiles, _target_programs(device) // max(1, other_programs)))
    per = triton.cdiv(n_tiles, n_chunks)
    return triton.cdiv(n_tiles, per), per


def _upcast(x: torch.Tensor) -> bool:
    # The interpreter (CPU tensors) mishandles bf16 in tl.dot: feed it fp32 copies of the tiles.
    return x.dtype == torch.bfloat16 and not _device.on_gpu(x.device)


def _in_format(ts, fmt: torch.memory_format) -> tuple[torch.Tensor, ...]:
    return tuple(t.contiguous(memory_format=fmt) for t in ts)


def _z_empty(xs, fmt):
    x0 = xs[0]
    shape = (x0.shape[0], len(xs) * x0.shape[1], x0.shape[2], x0.shape[3])
    return torch.empty(shape, dtype=x0.dtype, device=x0.device, memory_format=fmt)


def _conv(xs_f, weight, fmt, *, z=None, ys=None, bias=None):
    """The forward GEMM: z and per-tile statistics (z given) or ys = ReLU(. + bias) (ys given).
    Returns the per-tile pixel counts [n_tiles] and (mean, M2) [n_tiles, 2, T*C] (training) or None."""
    x0 = xs_f[0]
    T, C = len(xs_f), x0.shape[1]
    acc_tl, acc_torch = _acc_dtype(x0.dtype)
    bl = _gemm_blocks(x0.shape, fmt, x0.dtype, x0.device)
    g = _geom(x0.shape, T, fmt, bl.pix)
    n_kb = triton.cdiv(C, bl.out)
    train = z is not None
    w = weight.contiguous()
    partial = torch.empty((g.n_tiles, 2, T * C), dtype=acc_torch, device=x0.device) if train else None
    dummy = w  # never dereferenced: the branch using it is compiled out
    with _device.device_guard(x0.device):
        _gemm_fwd_kernel[(g.n_tiles, T * n_kb)](
            xs_f, w, z if train else dummy, tuple(ys) if ys is not None else xs_f,
            bias if bias is not None else dummy, partial if train else dummy,
            C, g.R, g.n_rt, n_kb, *g.sx, *g.sz,
            T=T, BLOCK_K=bl.out, BLOCK_C=bl.red, BLOCK_P=bl.pix, TRAIN=train, ACC=acc_tl,
            INT64=_device.needs_int64(x0, w) or (train and _device.needs_int64(z)), UPCAST=_upcast(x0),
            num_warps=bl.num_warps, num_stages=bl.num_stages,
        )  # fmt: skip
    if not train:
        return None
    # Pixels in each row tile: all BLOCK_P of them but in an image's last tile.
    first_row = torch.arange(g.n_tiles, device=x0.device, dtype=torch.int64) % g.n_rt * bl.pix
    counts = (g.R - first_row).clamp(max=bl.pix)
    return counts, partial


def _merge_stats(counts: torch.Tensor, partial: torch.Tensor, acc_torch: torch.dtype):
    """Mean and biased variance per channel from per-tile (count, mean, M2): Chan et al.'s
    parallel formula in fp64, in a fixed order (deterministic)."""
    p = partial.double()
    cnt, mu, m2 = counts.double()[:, None], p[:, 0], p[:, 1]
    n = cnt.sum(0)
    mean = (cnt * mu).sum(0) / n
    var = (m2.sum(0) + (cnt * (mu - mean).square()).sum(0)) / n
    return mean.to(acc_torch), var.clamp_min(0).to(acc_torch)


def _conv_backward(grad_ys_f, zy, xs_f, weight, fmt, train, vecs):
    """grad_xs, grad_weight (ACC dtype) and, in eval, the per-channel sums of dz; dz on the fly."""
    x0 = xs_f[0]
    T, C = len(xs_f), x0.shape[1]
    TC = T * C
    acc_tl, acc_torch = _acc_dtype(x0.dtype)
    dev = x0.device
    grad_xs = empty_like_all(xs_f, fmt)
    w = weight.contiguous()
    scale, shift, a, bb = vecs if train else (w, w, w, w)  # unused in eval
    zy_arg = zy if train else tuple(zy)
    int64 = _device.needs_int64(x0, w) or (train and _device.needs_int64(zy))
    bl = _gemm_blocks(x0.shape, fmt, x0.dtype, dev)
    g = _geom(x0.shape, T, fmt, bl.pix)
    with _device.device_guard(dev):
        n_cb = triton.cdiv(C, bl.out)  # output channel blocks of grad_xs[j]
        _grad_x_kernel[(g.n_tiles, T * n_cb)](
            tuple(grad_ys_f), zy_arg, w, tuple(grad_xs), scale, shift, a, bb,
            C, g.R, g.n_rt, n_cb, *g.sx, *g.sz,
            T=T, BLOCK_C=bl.out, BLOCK_K=bl.red, BLOCK_P=bl.pix, TRAIN=train, ACC=acc_tl, INT64=int64,
            UPCAST=_upcast(x0), num_warps=bl.num_warps, num_stages=bl.num_stages,
        )  # fmt: skip
        n_kb, n_cb = triton.cdiv(C, bl.out), triton.cdiv(C, bl.red)  # grad_weight tile: rows, columns
        n_chunks, per = _chunks(g.n_tiles, T * n_kb * T * n_cb, dev)
        partial_w = torch.empty((n_chunks, TC, TC), dtype=acc_torch, device=dev)
        partial_b = torch.empty((n_chunks, TC), dtype=acc_torch, device=dev) if not train else partial_w
        _grad_w_kernel[(n_chunks, T * n_kb, T * n_cb)](
            tuple(grad_ys_f), zy_arg, xs_f, scale, shift, a, bb, partial_w, partial_b,
            C, g.R, g.n_rt, g.n_tiles, per, n_kb, n_cb, *g.sx, *g.sz,
            T=T, BLOCK_K=bl.out, BLOCK_C=bl.red, BLOCK_P=bl.pix, TRAIN=train, ACC=acc_tl, INT64=int64,
            UPCAST=_upcast(x0), num_warps=bl.num_warps, num_stages=bl.num_stages,
        )  # fmt: skip
    # Fixed-order reductions over chunks: deterministic, no atomics.
    grad_w = partial_w.sum(0)
    sum_dz = None if train else partial_b.sum(0)
    return grad_xs, grad_w, sum_dz


@torch.library.custom_op("mtl_kernels::nddr_train_triton", mutates_args=())
def nddr_train_triton(
    xs: list[torch.Tensor], weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, eps: float
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    x0 = xs[0]
    T, C = len(xs), x0.shape[1]
    fmt = dense_format(x0)
    acc_tl, acc_torch = _acc_dtype(x0.dtype)
    ys = empty_like_all(xs, fmt)
    z = _z_empty(xs, fmt)
    if x0.numel() == 0:  # the caller rejects this (n > 1 values per channel); stay defined anyway
        nan = torch.full((T * C,), float("nan"), dtype=acc_torch, device=x0.device)
        return ys, z, nan, nan.clone()
    xs_f = _in_format(xs, fmt)
    mean, var = _merge_stats(*_conv(xs_f, weight, fmt, z=z), acc_torch)
    scale = bn_weight.to(acc_torch) * torch.rsqrt(var + eps)
    shift = bn_bias.to(acc_torch) - mean * scale
    bc, bp = _ew_blocks(x0.shape, fmt, x0.device)
    g = _geom(x0.shape, T, fmt, bp)
    with _device.device_guard(x0.device):
        _bn_relu_kernel[(g.n_tiles, triton.cdiv(C, bc))](
            z, tuple(ys), scale.contiguous(), shift.contiguous(), C, g.R, g.n_rt, *g.sx, *g.sz,
            T=T, BLOCK_C=bc, BLOCK_P=bp, INT64=_device.needs_int64(z), num_warps=_NUM_WARPS,
        )  # fmt: skip
    return ys, z, mean, var


@torch.library.custom_op("mtl_kernels::nddr_train_backward_triton", mutates_args=())
def nddr_train_backward_triton(
    grad_ys: list[torch.Tensor],
    xs: list[torch.Tensor],
    z: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    x0 = xs[0]
    T, C = len(xs), x0.shape[1]
    TC = T * C
    fmt = dense_format(x0)
    acc_tl, acc_torch = _acc_dtype(x0.dtype)
    dev = x0.device
    if x0.numel() == 0:
        return (
            [torch.zeros_like(x, memory_format=fmt) for x in xs],
            torch.zeros_like(weight, memory_format=torch.contiguous_format),
            torch.zeros_like(bn_weight, memory_format=torch.contiguous_format),
            torch.zeros_like(bn_bias, memory_format=torch.contiguous_format),
        )
    xs_f = _in_format(xs, fmt)
    gys_f = _in_format(grad_ys, fmt)
    zc = z.contiguous(memory_format=fmt)
    n = float(x0.shape[0] * x0.shape[2] * x0.shape[3])
    mu = mean.to(acc_torch).contiguous()
    invstd = torch.rsqrt(var.to(acc_torch) + eps)
    scale = (bn_weight.to(acc_torch) * invstd).contiguous()
    shift = (bn_bias.to(acc_torch) - mu * scale).contiguous()

    bc, bp = _ew_blocks(x0.shape, fmt, dev)
    g = _geom(x0.shape, T, fmt, bp)
    n_cb = triton.cdiv(C, bc)
    n_chunks, per = _chunks(g.n_tiles, n_cb, dev)
    partial = torch.empty((n_chunks, 2, TC), dtype=acc_torch, device=dev)
    with _device.device_guard(dev):
        _relu_sums_kernel[(n_chunks, n_cb)](
            gys_f, zc, scale, shift, mu, partial, C, g.R, g.n_rt, g.n_tiles, per, *g.sx, *g.sz,
            T=T, BLOCK_C=bc, BLOCK_P=bp, ACC=acc_tl, INT64=_device.needs_int64(zc), num_warps=_NUM_WARPS,
        )  # fmt: skip
    sums = partial.sum(0)  # fixed order
    sum_dy, sum_dy_zc = sums[0], sums[1]
    # BN backward with batch statistics, per channel: dz = dy' * scale + z * a + b.
    a = (-scale * invstd * invstd * sum_dy_zc / n).contiguous()
    b = (-scale * sum_dy / n - mu * a).contiguous()
    grad_xs, grad_w, _ = _conv_backward(gys_f, zc, xs_f, weight, fmt, True, (scale, shift, a, b))
    return (
        grad_xs,
        grad_w.to(weight.dtype),
        (sum_dy_zc * invstd).to(bn_weight.dtype),
        sum_dy.to(bn_bias.dtype).contiguous(),
    )


@torch.library.custom_op("mtl_kernels::nddr_eval_triton", mutates_args=())
def nddr_eval_triton(xs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> list[torch.Tensor]:
    x0 = xs[0]
    fmt = dense_format(x0)
    ys = empty_like_all(xs, fmt)
    if x0.numel() == 0:
        return ys
    _conv(_in_format(xs, fmt), weight, fmt, ys=ys, bias=bias.contiguous())
    return ys


@torch.library.custom_op("mtl_kernels::nddr_eval_backward_triton", mutates_args=())
def nddr_eval_backward_triton(
    grad_ys: list[torch.Tensor], xs: list[torch.Tensor], ys: list[torch.Tensor], weight: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    x0 = xs[0]
    fmt = dense_format(x0)
    if x0.numel() == 0:
        return (
            [torch.zeros_like(x, memory_format=fmt) for x in xs],
            torch.zeros_like(weight, memory_format=torch.contiguous_format),
            torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
        )
    grad_xs, grad_w, sum_dz = _conv_backward(
        _in_format(grad_ys, fmt), _in_format(ys, fmt), _in_format(xs, fmt), weight, fmt, False, None
    )
    return grad_xs, grad_w.to(weight.dtype), sum_dz.to(weight.dtype)
