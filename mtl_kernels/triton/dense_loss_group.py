"""Triton kernels of dense_loss_group, as the opaque op mtl_kernels::dense_loss_group_triton (the
contract is dense_loss_group's in csrc/ops.cpp; fake kernel and autograd are registered in
mtl_kernels/ops/dense_loss.py): every task's dense loss in one launch, and the backward in one.

The tasks travel as one int64 table on the device (addresses, kind, sizes, strides, range of
programs), uploaded without a host wait, as the grouped GEMM of Triton's tutorials and our gram
kernel do. Each task owns a contiguous range of programs; a program finds its task by a scan of
the table and runs that kind's tile (the same _ce_tile, _normals_tile and _flat_tile as the
one-task kernels of triton/dense_loss.py), writing its partial (sum, count, malformed) to a row
of its own. A second kernel adds each task's rows, one program per task, in a fixed order:
deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import _device
from .cross_stitch import _acc_dtype
from .dense_loss import _ce_tile, _flat_tile, _normals_tile, _scale_tile, _store_partial
from .gram import _TL_DTYPE

# Columns of the task table.
_X, _TARGET, _GRAD, _KIND, _C, _P, _SB, _SC, _SP, _N, _FIRST, _END, _STATS = range(13)
_FIELDS = tl.constexpr(13)

_BLOCK_P = 64  # cross-entropy pixels per program (as dense_loss_triton)
_BLOCK_N = 256  # normals pixels per program
_BLOCK_F = 1024  # L1 / BCE elements per program


@triton.jit
def _task_of(table_ptr, pid, T):
    """The task whose range of programs holds pid (the ranges are in order)."""
    t = pid * 0  # an int32 tensor, as the loop carries it
    for j in range(1, T):
        t = tl.where(pid >= tl.load(table_ptr + j * _FIELDS + 10), j, t)
    return t


@triton.jit
def _group_loss_kernel(
    table_ptr, w_ptr, part_ptr, T,
    X_TYPE: tl.constexpr, ACC: tl.constexpr, INVALID: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    task = _task_of(table_ptr, pid, T)
    row = table_ptr + task * _FIELDS
    x_ptr = tl.load(row + 0).to(tl.pointer_type(X_TYPE))
    g_ptr = tl.load(row + 2).to(tl.pointer_type(X_TYPE))
    kind = tl.load(row + 3)
    P, sB, sC, sP = tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8)
    local = pid - tl.load(row + 10)  # the program's place in its task (int64)
    if kind == 0:  # cross-entropy, images of cdiv(P, BLOCK_P) programs
        labels = tl.load(row + 1).to(tl.pointer_type(tl.int64))  # (each branch names its own: types differ)
        tiles = tl.cdiv(P, BLOCK_P)
        total, count, bad = _ce_tile(
            x_ptr, labels, g_ptr, local // tiles, local % tiles, tl.load(row + 4), P, sB, sC, sP, BLOCK_P, BLOCK_C, ACC
        )
        _store_partial(part_ptr, pid, total, count, bad)
    elif kind == 2:  # normals
        t_ptr = tl.load(row + 1).to(tl.pointer_type(ACC))
        tiles = tl.cdiv(P, BLOCK_N)
        total, count, bad = _normals_tile(
            x_ptr, t_ptr, g_ptr, local // tiles, local % tiles, P, sB, sC, sP, BLOCK_N, ACC
        )
        _store_partial(part_ptr, pid, total, count, bad)
    elif kind == 1:  # L1
        t_ptr = tl.load(row + 1).to(tl.pointer_type(ACC))
        total, count, bad = _flat_tile(
            x_ptr, t_ptr, g_ptr, w_ptr + task, local * BLOCK_F, tl.load(row + 9), 1, INVALID, BLOCK_F, ACC
        )
        _store_partial(part_ptr, pid, total, count, bad)
    else:  # balanced BCE
        t_ptr = tl.load(row + 1).to(tl.pointer_type(ACC))
        total, count, bad = _flat_tile(
            x_ptr, t_ptr, g_ptr, w_ptr + task, local * BLOCK_F, tl.load(row + 9), 3, INVALID, BLOCK_F, ACC
        )
        _store_partial(part_ptr, pid, total, count, bad)


@triton.jit
def _task_sums_kernel(table_ptr, part_ptr, BLOCK: tl.constexpr):
    """Program t adds task t's partial rows, in BLOCK-wide strides then a tree: the same order every
    run, into task t's own [3] stats tensor."""
    task = tl.program_id(0)
    stats_ptr = tl.load(table_ptr + task * _FIELDS + 12).to(tl.pointer_type(tl.float64))
    first, end = tl.load(table_ptr + task * _FIELDS + 10), tl.load(table_ptr + task * _FIELDS + 11)
    s = tl.zeros((BLOCK,), tl.float64)
    n = tl.zeros((BLOCK,), tl.float64)
    b = tl.zeros((BLOCK,), tl.float64)
    for start in range(first, end, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < end
        s += tl.load(part_ptr + i * 3 + 0, mask=mask, other=0.0)
        n += tl.load(part_ptr + i * 3 + 1, mask=mask, other=0.0)
        b += tl.load(part_ptr + i * 3 + 2, mask=mask, other=0.0)
    _store_partial(stats_ptr, 0, tl.sum(s), tl.sum(n), tl.sum(b))


def _programs(pred: torch.Tensor, kind: int) -> int:
    B, _, H, W = pred.shape
    if kind == 0:
        return B * triton.cdiv(H * W, _BLOCK_P)
    if kind == 2:
        return B * triton.cdiv(H * W, _BLOCK_N)
    return triton.cdiv(pred.numel(), _BLOCK_F)


@torch.library.custom_op("mtl_kernels::dense_loss_group_triton", mutates_args=())
def dense_loss_group_triton(
    preds: list[torch.Tensor],
    targets: list[torch.Tensor],
    kinds: list[int],
    pos_weights: torch.Tensor,
    invalid: int,
    inplace_backward: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    _check(preds, targets, kinds, pos_weights)
    device = preds[0].device
    grads = [torch.empty_like(p) for p in preds]
    stats = [torch.empty(3, dtype=torch.float64, device=device) for _ in preds]
    table = np.zeros((len(preds), 13), dtype=np.int64)
    first = 0
    for row, pred, target, grad, kind, st in zip(table, preds, targets, grads, kinds, stats):
        B, C, H, W = pred.shape
        sP = pred.stride(3) if W > 1 else pred.stride(2)
        n = _programs(pred, kind)
        row[:] = (pred.data_ptr(), target.data_ptr(), grad.data_ptr(), kind, C, H * W,
                  pred.stride(0), pred.stride(1), sP, pred.numel(), first, first + n, st.data_ptr())  # fmt: skip
        first += n
    (table_d,) = _device.upload([torch.from_numpy(table)], device)
    part = torch.empty((first, 3), dtype=torch.float64, device=device)
    if first == 0:  # empty predictions: no 0-program launch
        return [st.zero_() for st in stats], grads
    acc, _ = _acc_dtype(preds[0].dtype)
    C_max = max((p.shape[1] for p, k in zip(preds, kinds) if k == 0), default=1)
    with _device.device_guard(device):
        _group_loss_kernel[(first,)](
            table_d, pos_weights.contiguous(), part, len(preds),
            X_TYPE=_TL_DTYPE[preds[0].dtype], ACC=acc, INVALID=invalid,
            BLOCK_P=_BLOCK_P, BLOCK_C=min(triton.next_power_of_2(C_max), 32), BLOCK_N=_BLOCK_N, BLOCK_F=_BLOCK_F,
        )  # fmt: skip
        _task_sums_kernel[(len(preds),)](table_d, part, BLOCK=256)
    return stats, grads


def _check(preds, targets, kinds, pos_weights) -> None:
    # The checks of csrc/common/dense_loss_args.h, for direct calls of the op.
    T = len(preds)
    if T == 0:
        raise RuntimeError("dense_loss_group: needs at least one task")
    if len(targets) != T or len(kinds) != T:
        raise RuntimeError(
            f"dense_loss_group: preds, targets and kinds must have one entry per task, got {T}, {len(targets)} "
            f"and {len(kinds)}"
        )
    if pos_weights.shape != (T,) or pos_weights.dtype != torch.float64 or pos_weights.device != preds[0].device:
        raise RuntimeError(f"dense_loss_group: pos_weights must be float64 [{T}] on the predictions' device")
    for pred, target, kind in zip(preds, targets, kinds):
        if pred.dtype != preds[0].dtype or pred.device != preds[0].device:
            raise RuntimeError("dense_loss_group: every prediction must share the first's dtype and device")
        if kind not in (0, 1, 2, 3):
            raise RuntimeError(f"dense_loss_group: unknown kind {kind}")
        if not (pred.dim() == 4 and (pred.is_contiguous() or pred.is_contiguous(memory_format=torch.channels_last))):
            raise RuntimeError("dense_loss_group: pred must be 4-D, NCHW or channels_last")
        B, C, H, W = pred.shape
        if kind == 0:
            if not (target.dtype == torch.int64 and target.is_contiguous() and target.shape == (B, H, W)):
                raise RuntimeError("dense_loss_group: cross-entropy target must be contiguous int64 [B, H, W]")
        elif (
            target.shape != pred.shape or target.stride() != pred.stride() or target.dtype != _acc_dtype(pred.dtype)[1]
        ):
            raise RuntimeError("dense_loss_group: target must have pred's shape and strides, in its accumulation type")
        if kind == 2 and C != 3:
            raise RuntimeError("dense_loss_group: normals need 3 channels")


@dense_loss_group_triton.register_fake
def _(preds, targets, kinds, pos_weights, invalid, inplace_backward):
    return [p.new_empty(3, dtype=torch.float64) for p in preds], [torch.empty_like(p) for p in preds]


# Backward: out[t] = grads[t] * grad_sums[t] in float, every task in one launch (see _scale_kernel).
@triton.jit
def _group_scale_kernel(table_ptr, s_ptr, s_stride, T, X_TYPE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    task = _task_of(table_ptr, pid, T)
    row = table_ptr + task * _FIELDS
    g_ptr = tl.load(row + 0).to(tl.pointer_type(X_TYPE))
    o_ptr = tl.load(row + 2).to(tl.pointer_type(X_TYPE))
    start = (pid - tl.load(row + 10)) * BLOCK
    _scale_tile(g_ptr, o_ptr, s_ptr + task * s_stride, start, tl.load(row + 9), BLOCK, ACC)


def _group_scale(grads: list[torch.Tensor], grad_sums: torch.Tensor, out: list[torch.Tensor]) -> None:
    if grad_sums.shape != (len(grads),):
        raise RuntimeError(f"dense_loss_group_backward: grad_sums must be [{len(grads)}], got {list(grad_sums.shape)}")
    if not grads:
        return
    block = 1024
    table = np.zeros((len(grads), 13), dtype=np.int64)
    first = 0
    for row, g, o in zip(table, grads, out):
        dense = g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last)
        if not dense or g.dtype != grads[0].dtype:
            raise RuntimeError("dense_loss_group_backward: grads must be dense (NCHW or channels_last), of one dtype")
        n = max(triton.cdiv(g.numel(), block), 1)
        row[[_X, _GRAD, _N, _FIRST, _END]] = (g.data_ptr(), o.data_ptr(), g.numel(), first, first + n)
        first += n
    device = grads[0].device
    (table_d,) = _device.upload([torch.from_numpy(table)], device)
    s = grad_sums.to(torch.float64)
    with _device.device_guard(device):
        _group_scale_kernel[(first,)](
            table_d, s, s.stride(0), len(grads),
            X_TYPE=_TL_DTYPE[grads[0].dtype], BLOCK=block, ACC=_acc_dtype(grads[0].dtype)[0],
        )  # fmt: skip


@torch.library.custom_op("mtl_kernels::dense_loss_group_backward_triton", mutates_args=())
def dense_loss_group_backward_triton(grads: list[torch.Tensor], grad_sums: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(g) for g in grads]
    _group_scale(grads, grad_sums, out)
    return out


@dense_loss_group_backward_triton.register_fake
def _(grads, grad_sums):
    return [torch.empty_like(g) for g in grads]


@torch.library.custom_op("mtl_kernels::dense_loss_group_backward_triton_", mutates_args=("grads",))
def dense_loss_group_backward_triton_(grads: list[torch.Tensor], grad_sums: torch.Tensor) -> None:
    _group_scale(grads, grad_sums, grads)
