"""combine: out[k] (+)= sum_t weights[t] * grads[t][k] over a list of shared parameters, as a
functional op reading every tensor in place (never a flattened copy). Argument checks and the
choice of backend; the definition is mtl_kernels/reference/combine.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from .. import reference as _reference
from .gram import MAX_TASKS, check_grads, flat_views, task_major

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")


def combine(
    weights: torch.Tensor,
    grads: Sequence[Sequence[torch.Tensor]],
    out: Sequence[torch.Tensor] | None = None,
    *,
    accumulate: bool = False,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """out[k] = sum_t weights[t] * grads[t][k] (out[k] += ... with accumulate), summed in float32.

    weights: [T] tensor on the gradients' device (no host read-back); out: K tensors shaped like
    grads[0] (e.g. the shared parameters' .grad), written in place and returned; without out,
    fresh tensors in grads[0]'s dtypes and layouts. The fused backends read and write in place
    where out[k] and its gradients share one dense layout (channels_last ones included); otherwise
    out[k] must be contiguous and the gradients are copied contiguous.
    """
    grads = check_grads("combine", grads)
    T, device = len(grads), grads[0][0].device
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (T,):
        raise ValueError(f"combine: weights must be a tensor of shape [T] = [{T}], got {_describe(weights)}")
    if weights.device != device:
        raise ValueError(f"combine: weights are on {weights.device}, expected {device} like the gradients")
    if out is not None:
        out = list(out)
        if len(out) != len(grads[0]):
            raise ValueError(f"combine: out has {len(out)} tensors, expected {len(grads[0])} (one per gradient)")
        for k, o in enumerate(out):
            if (
                not isinstance(o, torch.Tensor)
                or o.shape != grads[0][k].shape
                or o.device != device
                or not o.is_floating_point()
            ):
                raise ValueError(
                    f"combine: out[{k}] must be a floating-point tensor of shape {tuple(grads[0][k].shape)} "
                    f"on {device}, got {_describe(o)}"
                )
    elif accumulate:
        raise ValueError("combine: accumulate=True needs out")
    name = _backend.resolve(backend, device, "combine", IMPLEMENTED, tasks=len(grads), max_tasks=MAX_TASKS)
    if name == "reference":
        return _reference.combine(weights, grads, out, accumulate)
    if out is None:  # in the gradients' layout where they share one, else contiguous
        out = [
            torch.empty_like(g)
            if flat_views([task[k] for task in grads])
            else torch.empty(g.shape, dtype=g.dtype, device=device)
            for k, g in enumerate(grads[0])
        ]
    flat, flat_out = task_major(grads, out)  # 1-D views: out is written in place
    op = torch.ops.mtl_kernels.combine_triton if name == "triton" else torch.ops.mtl_kernels.combine
    op(weights, flat, flat_out, accumulate)
    return out


def _describe(x) -> str:
    return f"shape {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
