"""Triton kernels of gate_sum, as the opaque ops mtl_kernels::gate_sum_triton,
mtl_kernels::gate_sum_backward_triton and mtl_kernels::gate_sum_backward_out_triton
(the backward into gradients the caller allocated).

outs[t] = residuals[t] + sum_{i: targets[i] == t} feats[i] * s_i,
s_i = sigmoid(gates[i] * scale[c] + shift[c]); backward
grad_feats[i] = g_t * s_i, grad_gates[i] = d_i * scale[c] with
d_i = g_t * feats[i] * s_i * (1 - s_i), grad_shift[c] = sum d_i and
grad_scale[c] = sum d_i * gates[i] (sums over i, b, h, w), g_t = grad_outs[targets[i]].

Fake kernels and autograd are registered in mtl_kernels/ops/gate_sum.py.

The pairs are grouped by target on the host: one launch per output t, whose
kernel gets the tuple of that group's feats/gates (their count a constexpr,
unrolled with tl.static_range), so each input is read once and each output
written once. feats and gates are read in place with their own strides (channel
slices of PAD-Net's stacked convolution outputs included): every tensor is a
[B, C, P] view, element (b, c, p) at b*sB + c*sC + p*sP, with sP == 1 or
sC == 1 (mtl_kernels.ops.gate_sum.readable copies anything else first).

A launch walks a [C, R] grid of [BLOCK_C, BLOCK_R] tiles, per image (rows r = p)
or, when every tensor it touches has sB == P*sP (channels_last and its channel
slices), for the whole batch at once (rows r = b*P + p, one "image"). Triton
specialises integer arguments equal to 1 (tuple elements included), so it knows
which tile axis of each tensor is contiguous and vectorises along it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._layout import dense_format
from . import _device
from .cross_stitch import _acc_dtype

_NUM_WARPS = 4
# Channel-contiguous tiles are at most this wide in C, so that a tile spans
# several rows and each scale/shift vector loaded is reused over them.
_CL_MAX_BLOCK_C = 64
# Mixed tiles (some tensors channel-contiguous, others pixel-contiguous: the
# gradient of a channels_last channel slice is NCHW) are this wide in C, so
# that both kinds of access cover whole 128-byte lines.
_MIXED_BLOCK_C = 32


@triton.jit
def _offs(b, c, r, sB, sC, sR):
    return b * sB + c[:, None] * sC + r[None, :] * sR


@triton.jit
def _sigmoid(x):
    """sigmoid(x) and sigmoid'(x) = s * (1 - s), without overflow or cancellation."""
    z = tl.exp(-tl.abs(x))  # in (0, 1]
    inv = 1.0 / (1.0 + z)
    s = tl.where(x >= 0, inv, z * inv)
    return s, z * inv * inv


@triton.jit
def _tile_coords(tile, c_tile, n_rt, C, R, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, INT64: tl.constexpr):
    """Image b, channels c, rows r and the mask of row tile `tile`, channel tile `c_tile`."""
    c = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if INT64:
        tile = tl.cast(tile, tl.int64)
        c = c.to(tl.int64)
    b = tile // n_rt
    r = (tile - b * n_rt) * BLOCK_R + tl.arange(0, BLOCK_R)
    if INT64:
        r = r.to(tl.int64)
    mask = c_mask[:, None] & (r < R)[None, :]
    return b, c, c_mask, r, mask


@triton.jit
def _gate_sum_fwd_kernel(
    out,  # output t, dense in the outputs' format
    res,  # residuals[t] in the same format (unused unless HAS_RES)
    feats,  # tuple of G pointers: the pairs with target t
    gates,  # tuple of G pointers
    scale,  # [C] or unused
    shift,  # [C] or unused
    o_st,  # (sB, sC, sR) of out and res
    f_st,  # 3*G strides: (sB, sC, sR) of each feats[j]
    g_st,  # 3*G strides of each gates[j]
    C,
    R,
    n_rt,
    G: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    # One [BLOCK_C, BLOCK_R] tile per program: grid (row tiles, channel tiles).
    b, c, c_mask, r, mask = _tile_coords(tl.program_id(0), tl.program_id(1), n_rt, C, R, BLOCK_C, BLOCK_R, INT64)
    if HAS_SCALE:
        sc = tl.load(scale + c, mask=c_mask, other=1.0).to(ACC)[:, None]
    if HAS_SHIFT:
        sh = tl.load(shift + c, mask=c_mask, other=0.0).to(ACC)[:, None]
    o_offs = _offs(b, c, r, o_st[0], o_st[1], o_st[2])
    if HAS_RES:
        acc = tl.load(res + o_offs, mask=mask, other=0.0).to(ACC)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    for j in tl.static_range(G):
        f = tl.load(feats[j] + _offs(b, c, r, f_st[3 * j], f_st[3 * j + 1], f_st[3 * j + 2]), mask=mask, other=0.0)
        x = tl.load(gates[j] + _offs(b, c, r, g_st[3 * j], g_st[3 * j + 1], g_st[3 * j + 2]), mask=mask, other=0.0)
        x = x.to(ACC)
        if HAS_SCALE:
            x = x * sc
        if HAS_SHIFT:
            x = x + sh
        s, _ = _sigmoid(x)
        acc += f.to(ACC) * s
    tl.store(out + o_offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gate_sum_bwd_kernel(
    grad_out,  # grad_outs[t], dense in its format
    feats,  # tuple of G pointers: the pairs with target t
    gates,  # tuple of G pointers
    grad_feats,  # tuple of G pointers
    grad_gates,  # tuple of G pointers
    scale,  # [C] or unused
    shift,  # [C] or unused
    partial,  # [n_chunks, 2, C] in ACC: this program's sums of d and d * gate (unused unless SUMS)
    o_st,  # (sB, sC, sR) of grad_out
    f_st,  # 3*G strides of feats, gates, grad_feats, grad_gates
    g_st,
    gf_st,
    gg_st,
    C,
    R,
    n_rt,
    n_tiles,
    tiles_per_chunk,
    G: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SUMS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
    INT64: tl.constexpr,
):
    # Grid (row chunks, channel tiles); a program walks its chunk of row tiles so
    # that the partial sums it writes are few (one [2, BLOCK_C] per chunk).
    chunk = tl.program_id(0)
    c_tile = tl.program_id(1)
    c0 = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c0_mask = c0 < C
    if HAS_SCALE:
        sc = tl.load(scale + c0, mask=c0_mask, other=1.0).to(ACC)[:, None]
    if HAS_SHIFT:
        sh = tl.load(shift + c0, mask=c0_mask, other=0.0).to(ACC)[:, None]
    # Running per-thread sums; the reduction across threads happens once, at the end.
    acc_d = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    acc_dg = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    start = chunk * tiles_per_chunk
    end = tl.minimum(start + tiles_per_chunk, n_tiles)
    for tile in range(start, end):
        b, c, c_mask, r, mask = _tile_coords(tile, c_tile, n_rt, C, R, BLOCK_C, BLOCK_R, INT64)
        go = tl.load(grad_out + _offs(b, c, r, o_st[0], o_st[1], o_st[2]), mask=mask, other=0.0).to(ACC)
        for j in tl.static_range(G):
            f_offs = _offs(b, c, r, f_st[3 * j], f_st[3 * j + 1], f_st[3 * j + 2])
            g_offs = _offs(b, c, r, g_st[3 * j], g_st[3 * j + 1], g_st[3 * j + 2])
            f = tl.load(feats[j] + f_offs, mask=mask, other=0.0)
            gate = tl.load(gates[j] + g_offs, mask=mask, other=0.0).to(ACC)
            x = gate
            if HAS_SCALE:
                x = x * sc
            if HAS_SHIFT:
                x = x + sh
            s, ds = _sigmoid(x)
            d = go * f.to(ACC) * ds  # d out / d (affine gate); 0 on masked lanes
            gf_offs = _offs(b, c, r, gf_st[3 * j], gf_st[3 * j + 1], gf_st[3 * j + 2])
            tl.store(grad_feats[j] + gf_offs, (go * s).to(grad_feats[j].dtype.element_ty), mask=mask)
            gg = d
            if HAS_SCALE:
                gg = d * sc
            gg_offs = _offs(b, c, r, gg_st[3 * j], gg_st[3 * j + 1], gg_st[3 * j + 2])
            tl.store(grad_gates[j] + gg_offs, gg.to(grad_gates[j].dtype.element_ty), mask=mask)
            if SUMS:
                acc_d += d
                acc_dg += d * gate
    if SUMS:
        base = partial + chunk.to(tl.int64) * 2 * C + c0
        tl.store(base, tl.sum(acc_d, axis=1), mask=c0_mask)
        tl.store(base + C, tl.sum(acc_dg, axis=1), mask=c0_mask)


def _view(x: torch.Tensor) -> tuple[int, int, int]:
    """(sB, sC, sP) of x as a [B, C, P] tensor (its H and W merge: see readable()).

    Strides of size-1 axes are free: they are chosen so that B == 1 or P == 1
    never prevents merging the batch into the rows."""
    B, C, H, W = x.shape
    sb, sc, sh, sw = x.stride()
    P = H * W
    sp = sw if W > 1 else sh
    if P == 1:
        sp = sb if B > 1 else 1
    if B == 1:
        sb = P * sp
    return sb, sc, sp


class _Plan(NamedTuple):
    block_c: int
    block_r: int
    R: int  # rows of the [C, R] grid
    n_rt: int  # row tiles per image
    n_tiles: int  # row tiles in all
    merged: bool  # rows r = b*P + p (every sB == P*sP): the batch is one image


def _plan(shape, views: list[tuple[int, int, int]], dtype: torch.dtype) -> _Plan:
    """Tile shape for one launch touching tensors with these views.

    Memory-bound: each thread holds 8 elements of each tile (two 16-byte
    vectors of fp32, one of fp16/bf16; 4 fp64), enough bytes in flight per SM
    with 4 warps and a few programs resident; registers stay low since a pair's
    tiles die once added to the accumulator."""
    B, C, H, W = shape
    P = H * W
    e = 4 if dtype.itemsize >= 8 else 8
    n = 32 * _NUM_WARPS * e
    merged = all(sb == P * sp for sb, _, sp in views)
    R = B * P if merged else P
    images = 1 if merged else B
    c_contig = sum(1 for _, sc, sp in views if sc == 1 and sp != 1)
    p_contig = sum(1 for _, sc, sp in views if sp == 1 and sc != 1)
    if c_contig and p_contig:
        block_c = min(triton.next_power_of_2(C), _MIXED_BLOCK_C)
        block_r = min(triton.next_power_of_2(R), max(1, n // block_c))
    elif c_contig:
        block_c = min(triton.next_power_of_2(C), _CL_MAX_BLOCK_C, n)
        block_r = min(triton.next_power_of_2(R), max(1, n // block_c))
    else:
        block_r = min(triton.next_power_of_2(R), n)
        block_c = min(triton.next_power_of_2(C), max(1, n // block_r))
    n_rt = triton.cdiv(R, block_r)
    return _Plan(block_c, block_r, R, n_rt, images * n_rt, merged)


def _strides(views, plan: _Plan) -> tuple[int, ...]:
    """Flat (sB, sC, sR) per view for the kernels; sB is unused when the batch is merged."""
    return tuple(s for sb, sc, sp in views for s in ((0 if plan.merged else sb), sc, sp))


def _target_programs(device: torch.device) -> int:
    """How many backward programs to aim for when they reduce: a few per SM keeps
    every SM busy while the partial buffer stays small."""
    return 16 * _device.num_sms(device) if _device.on_gpu(device) else 4


def _groups(targets: list[int], num_outputs: int) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in range(num_outputs)]
    for i, t in enumerate(targets):
        groups[t].append(i)
    return groups


def _in_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


def _empty(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("mtl_kernels::gate_sum_triton", mutates_args=())
def gate_sum_triton(
    residuals: list[torch.Tensor],
    feats: list[torch.Tensor],
    gates: list[torch.Tensor],
    targets: list[int],
    num_outputs: int,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> list[torch.Tensor]:
    f0 = feats[0]
    fmt = dense_format(residuals[0] if residuals else f0)  # = mtl_kernels.ops.gate_sum.out_format
    outs = [_empty(f0, fmt) for _ in range(num_outputs)]
    if f0.numel() == 0:
        return outs
    residuals = [_in_format(r, fmt) for r in residuals]
    acc_tl, _ = _acc_dtype(f0.dtype)
    C = f0.shape[1]
    scale_c = scale.contiguous() if scale is not None else None
    shift_c = shift.contiguous() if shift is not None else None
    for t, group in enumerate(_groups(targets, num_outputs)):
        out = outs[t]
        if not group:
            if residuals:
                out.copy_(residuals[t])
            else:
                out.zero_()
            continue
        fs = tuple(feats[i] for i in group)
        gs = tuple(gates[i] for i in group)
        o_view, f_views, g_views = _view(out), [_view(f) for f in fs], [_view(g) for g in gs]
        pl = _plan(f0.shape, [o_view, *f_views, *g_views], f0.dtype)
        res = residuals[t] if residuals else out
        grid = (pl.n_tiles, triton.cdiv(C, pl.block_c))
        with _device.device_guard(f0.device):
            _gate_sum_fwd_kernel[grid](
                out, res, fs, gs, scale_c if scale_c is not None else out, shift_c if shift_c is not None else out,
                _strides([o_view], pl), _strides(f_views, pl), _strides(g_views, pl), C, pl.R, pl.n_rt,
                G=len(group), HAS_RES=bool(residuals), HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                BLOCK_C=pl.block_c, BLOCK_R=pl.block_r, ACC=acc_tl, INT64=_device.needs_int64(out, *fs, *gs),
                num_warps=_NUM_WARPS,
            )  # fmt: skip
    return outs


@torch.library.custom_op("mtl_kernels::gate_sum_backward_triton", mutates_args=())
def gate_sum_backward_triton(
    grad_outs: list[torch.Tensor],
    feats: list[torch.Tensor],
    gates: list[torch.Tensor],
    targets: list[int],
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    grad_feats = [_empty(f, dense_format(f)) for f in feats]
    grad_gates = [_empty(g, dense_format(g)) for g in gates]
    grad_scale, grad_shift = _backward_into(grad_outs, feats, gates, targets, scale, shift, grad_feats, grad_gates)
    return grad_feats, grad_gates, grad_scale, grad_shift


@torch.library.custom_op("mtl_kernels::gate_sum_backward_out_triton", mutates_args=("grad_feats", "grad_gates"))
def gate_sum_backward_out_triton(
    grad_outs: list[torch.Tensor],
    feats: list[torch.Tensor],
    gates: list[torch.Tensor],
    targets: list[int],
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    grad_feats: list[torch.Tensor],
    grad_gates: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_sum_backward_triton writing into grad_feats / grad_gates the caller allocated."""
    if len(grad_feats) != len(feats) or len(grad_gates) != len(feats):
        raise ValueError(
            f"gate_sum_backward_out: grad_feats and grad_gates must hold one tensor per pair ({len(feats)}), "
            f"got {len(grad_feats)} and {len(grad_gates)}"
        )
    for i, g in enumerate([*grad_feats, *grad_gates]):
        B, C, H, W = g.shape
        if g.shape != feats[0].shape or g.dtype != feats[0].dtype or g.device != feats[0].device:
            raise ValueError(f"gate_sum_backward_out: output {i} must match feats in shape, dtype and device")
        if not (H == 1 or W == 1 or g.stride(2) == W * g.stride(3)):
            raise ValueError(f"gate_sum_backward_out: output {i} must have H and W mergeable into one")
    return _backward_into(grad_outs, feats, gates, targets, scale, shift, grad_feats, grad_gates)


def _backward_into(grad_outs, feats, gates, targets, scale, shift, grad_feats, grad_gates):
    """Writes grad_feats / grad_gates and returns (grad_scale, grad_shift)."""
    f0 = feats[0]
    C = f0.shape[1]
    sums = scale is not None or shift is not None
    acc_tl, acc_torch = _acc_dtype(f0.dtype)

    def empty():  # a fresh one each time: the two returns may not alias
        return torch.empty(0, dtype=torch.float32, device=f0.device)

    def finish(total: torch.Tensor | None):  # total: [2, C] sums of d and d * gate, None without scale/shift
        grad_scale = total[1].to(scale.dtype, copy=True) if scale is not None else empty()
        grad_shift = total[0].to(shift.dtype, copy=True) if shift is not None else empty()
        return grad_scale, grad_shift

    if f0.numel() == 0:
        return finish(torch.zeros((2, C), dtype=acc_torch, device=f0.device) if sums else None)
    fmt = dense_format(f0)  # the features' layout: they and their gradients are 4 of the 5 streams
    grad_outs = [_in_format(g, fmt) for g in grad_outs]
    scale_c = scale.contiguous() if scale is not None else None
    shift_c = shift.contiguous() if shift is not None else None

    launches = []
    n_partial = 0
    for t, group in enumerate(_groups(targets, len(grad_outs))):
        if not group:
            continue
        go = grad_outs[t]
        fs, gs = tuple(feats[i] for i in group), tuple(gates[i] for i in group)
        gfs, ggs = tuple(grad_feats[i] for i in group), tuple(grad_gates[i] for i in group)
        views = [[_view(x) for x in xs] for xs in (fs, gs, gfs, ggs)]
        o_view = _view(go)
        pl = _plan(f0.shape, [o_view, *(v for vs in views for v in vs)], f0.dtype)
        n_ct = triton.cdiv(C, pl.block_c)
        if sums:
            # Split the row tiles into chunks: about _target_programs programs in
            # all, every chunk non-empty, so that every partial row gets written.
            n_chunks = max(1, min(pl.n_tiles, _target_programs(f0.device) // n_ct))
            tiles_per_chunk = triton.cdiv(pl.n_tiles, n_chunks)
            n_chunks = triton.cdiv(pl.n_tiles, tiles_per_chunk)
        else:
            n_chunks, tiles_per_chunk = pl.n_tiles, 1
        launches.append((go, fs, gs, gfs, ggs, o_view, views, pl, n_ct, n_chunks, tiles_per_chunk, n_partial))
        n_partial += n_chunks if sums else 0

    partial = torch.empty((n_partial, 2, C), dtype=acc_torch, device=f0.device) if sums else None
    for go, fs, gs, gfs, ggs, o_view, views, pl, n_ct, n_chunks, tiles_per_chunk, offset in launches:
        part = partial[offset:] if sums else go  # unused without sums
        with _device.device_guard(f0.device):
            _gate_sum_bwd_kernel[(n_chunks, n_ct)](
                go, fs, gs, gfs, ggs,
                scale_c if scale_c is not None else go, shift_c if shift_c is not None else go, part,
                _strides([o_view], pl), *(_strides(v, pl) for v in views),
                C, pl.R, pl.n_rt, pl.n_tiles, tiles_per_chunk,
                G=len(fs), HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SUMS=sums,
                BLOCK_C=pl.block_c, BLOCK_R=pl.block_r, ACC=acc_tl,
                INT64=_device.needs_int64(go, *fs, *gs, *gfs, *ggs),
                num_warps=_NUM_WARPS,
            )  # fmt: skip
    if not sums:
        return finish(None)
    # Fixed-order reduction over chunks (and groups): deterministic, no atomics.
    return finish(partial.sum(dim=0))
