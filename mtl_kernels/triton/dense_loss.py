"""Triton kernels of dense_loss, as the opaque op mtl_kernels::dense_loss_triton
(the op's contract is in csrc/ops.cpp, the definition in
mtl_kernels/reference/dense_loss.py; fake kernel and autograd are registered
in mtl_kernels/ops/dense_loss.py).

Each program writes its partial (sum, count, malformed) to a row of its own
and the rows are added by torch afterwards, so results are deterministic.
- cross-entropy: a program takes BLOCK_P pixels of one image and walks the
  channels in BLOCK_C slices twice: an online max / sum of exp (also picking
  the target's logit), then the gradient softmax - onehot.
- normals: a program takes BLOCK pixels, their 3 channels as 3 vectors.
- L1 and balanced BCE: pred, target and gradient share one dense layout, so a
  program takes BLOCK consecutive elements of memory.
Pixel (b, p) of channel c is at b*sB + c*sC + p*sP (sP == 1 for NCHW, which
Triton specialises and vectorises).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _device
from .cross_stitch import _acc_dtype

_IGNORE = tl.constexpr(
    255
)  # kernels may read module globals only as constexprs (compiled; the interpreter lets any through)


@triton.jit
def _store_partial(part_ptr, pid, total, count, bad):
    tl.store(part_ptr + pid * 3 + 0, total.to(tl.float64))
    tl.store(part_ptr + pid * 3 + 1, count.to(tl.float64))
    tl.store(part_ptr + pid * 3 + 2, bad.to(tl.float64))


@triton.jit
def _ce_online(m, s, xt, x, c, label):
    """One channel slice x [BLOCK_C, BLOCK_P] into the running max m, sum of exp s and target logit xt."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
    xt += tl.sum(tl.where(c[:, None] == label[None, :], x, 0.0), axis=0)
    return m_new, s, xt


@triton.jit
def _ce_grad(x, c, label, ok, m, inv):
    """softmax - onehot of a channel slice; inv = 1 / sum of exp, 0 on ignored pixels."""
    onehot = (c[:, None] == label[None, :]) & ok[None, :]
    return tl.exp(x - m[None, :]) * inv[None, :] - onehot.to(x.dtype)


@triton.jit
def _ce_tile(
    x_ptr, t_ptr, g_ptr, b, tile, C, P, sB, sC, sP,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Cross-entropy of BLOCK_P pixels of image b: (loss sum, count, malformed); gradient stored.
    The pixel and channel indices take b's integer type: with int64 b (large tensors) every
    offset, c * sC and p * sP included, is computed in 64 bits."""
    p = (tile * BLOCK_P + tl.arange(0, BLOCK_P)).to(b.dtype)
    p_mask = p < P
    label = tl.load(t_ptr + b * P + p, mask=p_mask, other=_IGNORE)
    in_range = (label >= 0) & (label < C)
    ok = p_mask & (label != _IGNORE) & in_range
    bad = tl.sum((p_mask & (label != _IGNORE) & ~in_range).to(tl.int32))
    base = b * sB + p[None, :] * sP
    # Pass 1: online max and sum of exp over channel slices; m starts finite so
    # masked lanes (all -inf) give exp(-inf) = 0, never inf - inf.
    m = tl.full((BLOCK_P,), -1e30, ACC)
    s = tl.zeros((BLOCK_P,), ACC)
    xt = tl.zeros((BLOCK_P,), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(b.dtype)
        mask = (c < C)[:, None] & p_mask[None, :]
        x = tl.load(x_ptr + base + c[:, None] * sC, mask=mask, other=float("-inf")).to(ACC)
        m, s, xt = _ce_online(m, s, xt, x, c, label)
    total = tl.sum(tl.where(ok, m + tl.log(s) - xt, 0.0))
    inv = tl.where(ok, 1.0 / s, 0.0)  # ignored pixels: gradient exactly 0
    # Pass 2: the gradient of the sum, softmax - onehot.
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(b.dtype)
        mask = (c < C)[:, None] & p_mask[None, :]
        x = tl.load(x_ptr + base + c[:, None] * sC, mask=mask, other=0.0).to(ACC)
        g = _ce_grad(x, c, label, ok, m, inv)
        tl.store(g_ptr + base + c[:, None] * sC, g.to(g_ptr.dtype.element_ty), mask=mask)
    return total, tl.sum(ok.to(tl.int32)), bad


@triton.jit
def _ce_kernel(
    x_ptr, t_ptr, g_ptr, part_ptr, C, P, sB, sC, sP,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    tile, b = tl.program_id(0), tl.program_id(1)
    if INT64:
        b = b.to(tl.int64)
    total, count, bad = _ce_tile(x_ptr, t_ptr, g_ptr, b, tile, C, P, sB, sC, sP, BLOCK_P, BLOCK_C, ACC)
    _store_partial(part_ptr, b * tl.num_programs(0) + tile, total, count, bad)


@triton.jit
def _normals_tile(x_ptr, t_ptr, g_ptr, b, tile, P, sB, sC, sP, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Normals L1 of BLOCK pixels of image b: (loss sum, count, malformed); gradient stored."""
    p = tile * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    off = b * sB + p * sP
    x0 = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    x1 = tl.load(x_ptr + off + sC, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(x_ptr + off + 2 * sC, mask=mask, other=0.0).to(ACC)
    t_ptrs = t_ptr + off
    d0, d1, d2, total, count, bad = _normals_pixel(x0, x1, x2, t_ptrs, t_ptrs + sC, t_ptrs + 2 * sC, mask, BLOCK, ACC)
    ty = g_ptr.dtype.element_ty
    tl.store(g_ptr + off, d0.to(ty), mask=mask)
    tl.store(g_ptr + off + sC, d1.to(ty), mask=mask)
    tl.store(g_ptr + off + 2 * sC, d2.to(ty), mask=mask)
    return total, count, bad


@triton.jit
def _normals_kernel(
    x_ptr, t_ptr, g_ptr, part_ptr, P, sB, sC, sP,
    BLOCK: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    tile, b = tl.program_id(0), tl.program_id(1)
    if INT64:
        b = b.to(tl.int64)
    total, count, bad = _normals_tile(x_ptr, t_ptr, g_ptr, b, tile, P, sB, sC, sP, BLOCK, ACC)
    _store_partial(part_ptr, b * tl.num_programs(0) + tile, total, count, bad)


@triton.jit
def _normals_pixel(x0, x1, x2, t0_ptrs, t1_ptrs, t2_ptrs, mask, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Loss sum, count and malformed count of BLOCK pixels, and the gradient of each channel."""
    norm = tl.sqrt(x0 * x0 + x1 * x1 + x2 * x2)
    n = norm + 1e-12  # the survey's normalisation
    total = tl.zeros((BLOCK,), ACC)
    count = tl.zeros((BLOCK,), tl.int32)
    bad = tl.zeros((BLOCK,), tl.int32)
    dot = tl.zeros((BLOCK,), ACC)
    # g_k = sign(q_k - t_k) on valid entries; dL/dp_j = g_j / n - p_j (g . p) / (|p| n^2)
    g0, total, count, bad, dot = _normals_entry(x0, n, t0_ptrs, mask, total, count, bad, dot)
    g1, total, count, bad, dot = _normals_entry(x1, n, t1_ptrs, mask, total, count, bad, dot)
    g2, total, count, bad, dot = _normals_entry(x2, n, t2_ptrs, mask, total, count, bad, dot)
    c = tl.where(norm > 0, dot / norm / (n * n), 0.0)  # dot / norm first: norm * n * n underflows
    return g0 / n - x0 * c, g1 / n - x1 * c, g2 / n - x2 * c, tl.sum(total), tl.sum(count), tl.sum(bad)


@triton.jit
def _normals_entry(x, n, t_ptrs, mask, total, count, bad, dot):
    t = tl.load(t_ptrs, mask=mask, other=_IGNORE)
    valid = mask & (t != _IGNORE) & (t == t)
    d = x / n - t
    g = tl.where(valid, tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)), 0.0)
    total += tl.where(valid, tl.abs(d), 0.0)
    count += valid.to(tl.int32)
    bad += (mask & (t != t)).to(tl.int32)
    return g, total, count, bad, dot + g * x


@triton.jit
def _flat_terms(x, t, w_ptr, mask, KIND: tl.constexpr, INVALID: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """L1 (KIND 1) or balanced BCE terms of BLOCK elements: (loss, gradient, count, malformed)."""
    if KIND == 1:  # L1; holes are 255 (INVALID 0) or anything not > 0 (INVALID 1)
        if INVALID == 1:
            valid = mask & (t > 0)
            bad = tl.zeros((BLOCK,), tl.int32)
        else:
            valid = mask & (t != _IGNORE) & (t == t)
            bad = (mask & (t != t)).to(tl.int32)
        d = x - t
        loss = tl.where(valid, tl.abs(d), 0.0)
        g = tl.where(valid, tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)), 0.0)
        count = valid.to(tl.int32)
    else:  # balanced BCE with logits, weight w on positives and 1 - w on negatives
        w = tl.load(w_ptr).to(ACC)
        pos = t >= 0.5
        y = pos.to(ACC)
        wt = tl.where(pos, w, 1.0 - w)
        z = tl.exp(-tl.abs(x))
        u = 1.0 + z
        log1p = tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))  # log1p(z), accurate for small z
        sigmoid = tl.where(x >= 0, 1.0 / u, z / u)
        loss = tl.where(mask, wt * (tl.maximum(x, 0.0) - x * y + log1p), 0.0)
        g = wt * (sigmoid - y)
        count = mask.to(tl.int32)
        bad = (mask & (t != t)).to(tl.int32)
    return loss, g, count, bad


@triton.jit
def _flat_tile(
    x_ptr, t_ptr, g_ptr, w_ptr, start, N,
    KIND: tl.constexpr, INVALID: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """L1 or balanced BCE of BLOCK elements from start: (loss sum, count, malformed); gradient stored."""
    i = start + tl.arange(0, BLOCK)
    mask = i < N
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + i, mask=mask, other=0.0)
    loss, g, count, bad = _flat_terms(x, t, w_ptr, mask, KIND, INVALID, BLOCK, ACC)
    tl.store(g_ptr + i, g.to(g_ptr.dtype.element_ty), mask=mask)
    return tl.sum(loss), tl.sum(count), tl.sum(bad)


@triton.jit
def _flat_kernel(
    x_ptr, t_ptr, g_ptr, part_ptr, w_ptr, N,
    KIND: tl.constexpr, INVALID: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK if INT64 else pid * BLOCK
    total, count, bad = _flat_tile(x_ptr, t_ptr, g_ptr, w_ptr, start, N, KIND, INVALID, BLOCK, ACC)
    _store_partial(part_ptr, pid, total, count, bad)


@torch.library.custom_op("mtl_kernels::dense_loss_triton", mutates_args=())
def dense_loss_triton(
    pred: torch.Tensor, target: torch.Tensor, kind: int, pos_weight: torch.Tensor, invalid: int, inplace_backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    grad = torch.empty_like(pred)
    B, C, H, W = pred.shape
    P = H * W
    sB, sC = pred.stride(0), pred.stride(1)
    sP = pred.stride(3) if W > 1 else pred.stride(2)
    acc, _ = _acc_dtype(pred.dtype)
    int64 = _device.needs_int64(pred)
    with _device.device_guard(pred.device):
        if kind in (1, 3):  # flat
            block = 1024
            n = triton.cdiv(pred.numel(), block)
            part = torch.empty((n, 3), dtype=torch.float64, device=pred.device)
            w = pos_weight.reshape(1).to(pred.device)
            _flat_kernel[(n,)](
                pred, target, grad, part, w, pred.numel(),
                KIND=kind, INVALID=invalid, BLOCK=block, ACC=acc, INT64=int64,
            )  # fmt: skip
        elif kind == 0:
            block_p = 64
            block_c = min(triton.next_power_of_2(C), 32)
            grid = (triton.cdiv(P, block_p), B)
            part = torch.empty((grid[0] * B, 3), dtype=torch.float64, device=pred.device)
            _ce_kernel[grid](
                pred, target, grad, part, C, P, sB, sC, sP,
                BLOCK_P=block_p, BLOCK_C=block_c, ACC=acc, INT64=int64,
            )  # fmt: skip
        else:
            block = 256
            grid = (triton.cdiv(P, block), B)
            part = torch.empty((grid[0] * B, 3), dtype=torch.float64, device=pred.device)
            _normals_kernel[grid](pred, target, grad, part, P, sB, sC, sP, BLOCK=block, ACC=acc, INT64=int64)
    return part.sum(0), grad


# Backward: grad_pred = grad * grad_sum, the product taken in float (double for double grad),
# with grad_sum read on the device: torch.mul would first round a CUDA 0-dim tensor to grad's
# dtype, and 1/count is below half precision's normal range for any count over 16384.
@triton.jit
def _scale_tile(g_ptr, o_ptr, s_ptr, start, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    i = start + tl.arange(0, BLOCK)
    mask = i < N
    s = tl.load(s_ptr).to(ACC)
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(ACC)
    tl.store(o_ptr + i, (g * s).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(g_ptr, o_ptr, s_ptr, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    _scale_tile(g_ptr, o_ptr, s_ptr, tl.program_id(0).to(tl.int64) * BLOCK, N, BLOCK, ACC)


def _scale(grad: torch.Tensor, grad_sum: torch.Tensor, out: torch.Tensor) -> None:
    # Elementwise over memory: grad is dense and out is grad itself or empty_like(grad).
    n = grad.numel()
    if n == 0:
        return
    block = 1024
    s = grad_sum.reshape(1).to(grad.device, torch.float64)
    with _device.device_guard(grad.device):
        _scale_kernel[(triton.cdiv(n, block),)](grad, out, s, n, BLOCK=block, ACC=_acc_dtype(grad.dtype)[0])


@torch.library.custom_op("mtl_kernels::dense_loss_backward_triton", mutates_args=())
def dense_loss_backward_triton(grad: torch.Tensor, grad_sum: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(grad)
    _scale(grad, grad_sum, out)
    return out


@dense_loss_backward_triton.register_fake
def _(grad, grad_sum):
    return torch.empty_like(grad)


@torch.library.custom_op("mtl_kernels::dense_loss_backward_triton_", mutates_args=("grad",))
def dense_loss_backward_triton_(grad: torch.Tensor, grad_sum: torch.Tensor) -> None:
    _scale(grad, grad_sum, grad)
