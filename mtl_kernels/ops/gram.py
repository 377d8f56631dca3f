"""gram: the Gram matrix of T tasks' gradients over a list of shared parameters, as a functional
op reading every tensor in place (never a flattened copy). Argument checks and the choice of
backend; the definition is mtl_kernels/reference/gram.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from .. import reference as _reference
from ._checks import FLOAT_DTYPES

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")
# The CUDA kernels (gram and combine) unroll over the tasks at compile time; "auto" takes Triton beyond.
MAX_TASKS = {"cuda": 8}


def gram(grads: Sequence[Sequence[torch.Tensor]], *, backend: str | None = None) -> torch.Tensor:
    """G[s, t] = sum_k grads[s][k] . grads[t][k]: [T, T] in float32 (float64 if any gradient is float64).

    grads: T lists (one per task) of the same K tensors' gradients: tensor k has one shape, dtype
    and device across tasks (different tensors may differ in dtype: fp32 and bf16 parameters mix).
    Norms are the diagonal.
    """
    grads = check_grads("gram", grads)
    name = _backend.resolve(backend, grads[0][0].device, "gram", IMPLEMENTED, tasks=len(grads), max_tasks=MAX_TASKS)
    if name == "reference":
        return _reference.gram(grads)
    op = torch.ops.mtl_kernels.gram_triton if name == "triton" else torch.ops.mtl_kernels.gram
    return op(task_major(grads)[0], len(grads))


def task_major(
    grads: list[list[torch.Tensor]], out: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The fused kernels' arguments: (every gradient as a 1-D tensor, task by task; out's likewise, or None).

    Where all of tensor k's gradients (and out[k]) share one dense layout, NCHW, channels_last or any
    other, they are read in place through 1-D views: their elements pair up position by position in
    memory, which is all a dot product or a weighted sum needs. Otherwise the gradients are copied
    contiguous, and then out[k] must be contiguous itself.
    """
    K = len(grads[0])
    columns = []
    for k in range(K):
        column = [task[k] for task in grads] + ([out[k]] if out is not None else [])
        views = flat_views(column)
        if views is None:
            if out is not None and not out[k].is_contiguous():
                raise ValueError(
                    f"combine: out[{k}] must be contiguous, or share one dense layout with its gradients "
                    f"(strides {tuple(out[k].stride())} against {tuple(grads[0][k].stride())})"
                )
            views = [g.contiguous().view(-1) for g in column]
        columns.append(views)
    flat = [columns[k][t] for t in range(len(grads)) for k in range(K)]
    return flat, (None if out is None else [columns[k][-1] for k in range(K)])


def flat_views(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """1-D views of tensors that all have one set of strides covering their storage span densely
    (every element once, no gaps); None otherwise."""
    t0 = tensors[0]
    if any(t.stride() != t0.stride() for t in tensors) or not _dense(t0):
        return None
    return [t.as_strided((t.numel(),), (1,)) for t in tensors]


def _dense(t: torch.Tensor) -> bool:
    # Strides, smallest first, must be those of a contiguous tensor of the permuted shape.
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def check_grads(op: str, grads) -> list[list[torch.Tensor]]:
    """grads as a list of lists, after checking T >= 1 tasks of K >= 1 matching tensors."""
    if isinstance(grads, torch.Tensor) or not isinstance(grads, Sequence) or len(grads) == 0:
        raise TypeError(f"{op}: grads must be a non-empty list of T per-task lists of tensors")
    grads = [list(task) if isinstance(task, Sequence) else task for task in grads]
    for t, task in enumerate(grads):
        if not isinstance(task, list):
            raise TypeError(
                f"{op}: grads[{t}] must be a list of tensors (task {t}'s gradients), got {type(task).__name__}"
            )
        if len(task) != len(grads[0]):
            raise ValueError(f"{op}: grads[{t}] has {len(task)} tensors, expected {len(grads[0])} like grads[0]")
    if len(grads[0]) == 0:
        raise ValueError(f"{op}: grads[0] is empty: expected one gradient per shared parameter")
    device = None
    for t, task in enumerate(grads):
        for k, g in enumerate(task):
            if not isinstance(g, torch.Tensor):
                raise TypeError(
                    f"{op}: grads[{t}][{k}] must be a tensor, got {type(g).__name__} "
                    "(for a parameter a task does not reach, pass zeros: autograd.grad(..., materialize_grads=True))"
                )
            if g.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{op}: grads[{t}][{k}] must be a floating tensor, got {g.dtype}")
            if g.shape != grads[0][k].shape:
                raise ValueError(
                    f"{op}: grads[{t}][{k}] has shape {tuple(g.shape)}, "
                    f"expected {tuple(grads[0][k].shape)} like grads[0][{k}]"
                )
            if g.dtype != grads[0][k].dtype:
                raise TypeError(
                    f"{op}: grads[{t}][{k}] has dtype {g.dtype}, expected {grads[0][k].dtype} like grads[0][{k}] "
                    "(each tensor's gradients must share one dtype across tasks)"
                )
            device = device or g.device
            if g.device != device:
                raise ValueError(f"{op}: grads[{t}][{k}] is on {g.device}, expected {device} like grads[0][0]")
    return grads


if _backend.compiled_error() is None:

    @torch.library.register_fake("mtl_kernels::gram")
    def _fake_gram(grads, tasks):
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        return grads[0].new_empty((tasks, tasks), dtype=dtype)


if "triton" in _backend.available_backends():
    from ..triton import gram as _triton_gram  # noqa: F401  (defines the triton ops)
