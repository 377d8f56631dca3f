"""Triton kernels of dense_loss_upsampled, as the opaque op
mtl_kernels::dense_loss_upsampled_triton (the op's contract is in csrc/ops.cpp,
the definition F.interpolate then mtl_kernels/reference/dense_loss.py; fake
kernel and autograd are registered in mtl_kernels/ops/dense_loss.py).

A prediction smaller (or larger) than its target is resized bilinearly
(align_corners=False, as F.interpolate) inside the loss pass: each target
pixel reads its four source pixels, and its gradient goes back to them by
atomic adds into a float32 (float64) gradient of the prediction's own size.
So the full-size prediction and its gradient never exist. The per-element
math is dense_loss's (mtl_kernels/triton/dense_loss.py); each program writes
its partial (sum, count, malformed) to a row of its own, so the loss is
deterministic. The gradient's rounding depends on the order of the atomic
adds on a GPU, as for F.interpolate's own CUDA backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _device
from .cross_stitch import _acc_dtype
from .dense_loss import _IGNORE, _ce_grad, _ce_online, _flat_terms, _normals_pixel, _store_partial


@triton.jit
def _axis(o, n_in, n_out, ACC: tl.constexpr):
    """Where output index o samples an axis of n_in (align_corners=False), as PyTorch computes it:
    between i0 and i1, with weight l on i1."""
    scale = n_in.to(ACC) / n_out.to(ACC)
    src = tl.maximum(scale * (o.to(ACC) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(o.dtype), n_in - 1)
    i1 = i0 + (i0 < n_in - 1).to(o.dtype)
    return i0, i1, src - i0.to(ACC)


@triton.jit
def _taps(p, Hi, Wi, Ho, Wo, sH, sW, ACC: tl.constexpr):
    """The four source offsets of target pixels p (row-major over Ho x Wo) and their weights."""
    y0, y1, ly = _axis(p // Wo, Hi, Ho, ACC)
    x0, x1, lx = _axis(p % Wo, Wi, Wo, ACC)
    hy, hx = 1.0 - ly, 1.0 - lx
    o00, o01 = y0 * sH + x0 * sW, y0 * sH + x1 * sW
    o10, o11 = y1 * sH + x0 * sW, y1 * sH + x1 * sW
    return o00, o01, o10, o11, hy, hx, ly, lx


@triton.jit
def _lerp(ptr, o00, o01, o10, o11, hy, hx, ly, lx, mask, ACC: tl.constexpr):
    """The bilinear value at each lane; ptr (with the channel's offset) broadcasts against the taps."""
    v00 = tl.load(ptr + o00, mask=mask, other=0.0).to(ACC)
    v01 = tl.load(ptr + o01, mask=mask, other=0.0).to(ACC)
    v10 = tl.load(ptr + o10, mask=mask, other=0.0).to(ACC)
    v11 = tl.load(ptr + o11, mask=mask, other=0.0).to(ACC)
    return hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)


@triton.jit
def _scatter(ptr, g, o00, o01, o10, o11, hy, hx, ly, lx, mask):
    """The transpose of _lerp: g spread back onto the four source pixels."""
    tl.atomic_add(ptr + o00, hy * hx * g, mask=mask, sem="relaxed")
    tl.atomic_add(ptr + o01, hy * lx * g, mask=mask, sem="relaxed")
    tl.atomic_add(ptr + o10, ly * hx * g, mask=mask, sem="relaxed")
    tl.atomic_add(ptr + o11, ly * lx * g, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["Hi", "Wi", "Ho", "Wo"])
def _ce_kernel(
    x_ptr, t_ptr, g_ptr, part_ptr, C, Hi, Wi, Ho, Wo, sB, sC, sH, sW,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    tile, b = tl.program_id(0), tl.program_id(1)
    if INT64:
        b = b.to(tl.int64)
    P = Ho * Wo
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    if INT64:
        p = p.to(tl.int64)
    p_mask = p < P
    label = tl.load(t_ptr + b * P + p, mask=p_mask, other=_IGNORE)
    in_range = (label >= 0) & (label < C)
    ok = p_mask & (label != _IGNORE) & in_range
    bad = tl.sum((p_mask & (label != _IGNORE) & ~in_range).to(tl.int32))
    o00, o01, o10, o11, hy, hx, ly, lx = _taps(p, Hi, Wi, Ho, Wo, sH, sW, ACC)
    o00, o01, o10, o11 = o00[None, :], o01[None, :], o10[None, :], o11[None, :]
    hy, hx, ly, lx = hy[None, :], hx[None, :], ly[None, :], lx[None, :]
    # Pass 1 (as dense_loss): online max and sum of exp; masked lanes are -inf.
    m = tl.full((BLOCK_P,), -1e30, ACC)
    s = tl.zeros((BLOCK_P,), ACC)
    xt = tl.zeros((BLOCK_P,), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(b.dtype)  # int64 b: 64-bit c * sC
        mask = (c < C)[:, None] & p_mask[None, :]
        x = _lerp(x_ptr + b * sB + c[:, None] * sC, o00, o01, o10, o11, hy, hx, ly, lx, mask, ACC)
        m, s, xt = _ce_online(m, s, xt, tl.where(mask, x, float("-inf")), c, label)
    total = tl.sum(tl.where(ok, m + tl.log(s) - xt, 0.0))
    inv = tl.where(ok, 1.0 / s, 0.0)  # ignored pixels: gradient exactly 0
    # Pass 2: softmax - onehot, spread back onto the source pixels.
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(b.dtype)
        mask = (c < C)[:, None] & ok[None, :]
        x = _lerp(x_ptr + b * sB + c[:, None] * sC, o00, o01, o10, o11, hy, hx, ly, lx, mask, ACC)
        g = _ce_grad(x, c, label, ok, m, inv)
        _scatter(g_ptr + b * sB + c[:, None] * sC, g, o00, o01, o10, o11, hy, hx, ly, lx, mask)
    _store_partial(part_ptr, b * tl.num_programs(0) + tile, total, tl.sum(ok.to(tl.int32)), bad)


@triton.jit(do_not_specialize=["Hi", "Wi", "Ho", "Wo"])
def _normals_kernel(
    x_ptr, t_ptr, g_ptr, part_ptr, Hi, Wi, Ho, Wo, sB, sC, sH, sW,
    BLOCK: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    tile, b = tl.program_id(0), tl.program_id(1)
    if INT64:
        b = b.to(tl.int64)
    P = Ho * Wo
    p = tile * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        p = p.to(tl.int64)
    mask = p < P
    o00, o01, o10, o11, hy, hx, ly, lx = _taps(p, Hi, Wi, Ho, Wo, sH, sW, ACC)
    x = x_ptr + b * sB
    x0 = _lerp(x, o00, o01, o10, o11, hy, hx, ly, lx, mask, ACC)
    x1 = _lerp(x + sC, o00, o01, o10, o11, hy, hx, ly, lx, mask, ACC)
    x2 = _lerp(x + 2 * sC, o00, o01, o10, o11, hy, hx, ly, lx, mask, ACC)
    t = t_ptr + b * 3 * P + p  # contiguous [B, 3, Ho, Wo]
    d0, d1, d2, total, count, bad = _normals_pixel(x0, x1, x2, t, t + P, t + 2 * P, mask, BLOCK, ACC)
    g = g_ptr + b * sB
    _scatter(g, d0, o00, o01, o10, o11, hy, hx, ly, lx, mask)
    _scatter(g + sC, d1, o00, o01, o10, o11, hy, hx, ly, lx, mask)
    _scatter(g + 2 * sC, d2, o00, o01, o10, o11, hy, hx, ly, lx, mask)
    _store_partial(part_ptr, b * tl.num_programs(0) + tile, total, count, bad)


@triton.jit(do_not_specialize=["Hi", "Wi", "Ho", "Wo"])
def _flat_kernel(
    x_ptr, t_ptr, g_ptr, part_ptr, w_ptr, N, C, Hi, Wi, Ho, Wo, sB, sC, sH, sW,
    KIND: tl.constexpr, INVALID: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    # Element i of the contiguous [B, C, Ho, Wo] target is pixel p of plane bc = b * C + c.
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK if INT64 else pid * BLOCK
    i = start + tl.arange(0, BLOCK)
    mask = i < N
    P = Ho * Wo
    bc, p = i // P, i % P
    plane = (bc // C) * sB + (bc % C) * sC
    o00, o01, o10, o11, hy, hx, ly, lx = _taps(p, Hi, Wi, Ho, Wo, sH, sW, ACC)
    x = _lerp(x_ptr + plane, o00, o01, o10, o11, hy, hx, ly, lx, mask, ACC)
    t = tl.load(t_ptr + i, mask=mask, other=0.0)
    loss, g, count, bad = _flat_terms(x, t, w_ptr, mask, KIND, INVALID, BLOCK, ACC)
    _scatter(g_ptr + plane, g, o00, o01, o10, o11, hy, hx, ly, lx, mask & (g != 0))
    _store_partial(part_ptr, pid, tl.sum(loss), tl.sum(count), tl.sum(bad))


@torch.library.custom_op("mtl_kernels::dense_loss_upsampled_triton", mutates_args=())
def dense_loss_upsampled_triton(
    pred: torch.Tensor, target: torch.Tensor, kind: int, pos_weight: torch.Tensor, invalid: int, inplace_backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, Hi, Wi = pred.shape
    Ho, Wo = target.shape[-2:]
    P = Ho * Wo
    acc, acc_torch = _acc_dtype(pred.dtype)
    grad = torch.zeros_like(pred, dtype=acc_torch)  # pred's strides: the kernels index both alike
    args = (Hi, Wi, Ho, Wo, pred.stride(0), pred.stride(1), pred.stride(2), pred.stride(3))
    int64 = _device.needs_int64(pred, target)
    with _device.device_guard(pred.device):
        if kind in (1, 3):  # L1, balanced BCE: one lane per target element
            block = 1024
            n = triton.cdiv(target.numel(), block)
            part = torch.empty((n, 3), dtype=torch.float64, device=pred.device)
            w = pos_weight.reshape(1).to(pred.device)
            _flat_kernel[(n,)](
                pred, target, grad, part, w, target.numel(), C, *args,
                KIND=kind, INVALID=invalid, BLOCK=block, ACC=acc, INT64=int64,
            )  # fmt: skip
        elif kind == 0:
            block_p = 64
            grid = (triton.cdiv(P, block_p), B)
            part = torch.empty((grid[0] * B, 3), dtype=torch.float64, device=pred.device)
            # BLOCK_C 16, not 32: with four taps and weights per pixel, 64 x 32 tiles needed more
            # than 255 registers and spilled 1.1-2.9 KB per thread (ptxas -v, sm_90)
            _ce_kernel[grid](
                pred, target, grad, part, C, *args,
                BLOCK_P=block_p, BLOCK_C=min(triton.next_power_of_2(C), 16), ACC=acc, INT64=int64,
            )  # fmt: skip
        else:
            block = 256
            grid = (triton.cdiv(P, block), B)
            part = torch.empty((grid[0] * B, 3), dtype=torch.float64, device=pred.device)
            _normals_kernel[grid](pred, target, grad, part, *args, BLOCK=block, ACC=acc, INT64=int64)
    return part.sum(0), grad.to(pred.dtype)
