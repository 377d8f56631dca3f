"""cross_stitch: the functional op. Argument checks, fake kernels, autograd
and the choice of backend; the kernels live in csrc/ and mtl_kernels/triton/.

Two op pairs share one autograd formula: mtl_kernels::cross_stitch (CPU and
CUDA kernels of the compiled extension) and mtl_kernels::cross_stitch_triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from .. import reference as _reference
from .._layout import dense_format, empty_like_all
from ._checks import check_task_tensors

# The CUDA kernels unroll over the tasks at compile time; "auto" takes Triton beyond.
MAX_TASKS = {"cuda": 8}


def cross_stitch(xs: Sequence[torch.Tensor], alpha: torch.Tensor, *, backend: str | None = None) -> list[torch.Tensor]:
    """ys[i] = sum_j alpha[i, j, c] * xs[j] for T task features xs[j] of shape [B, C, H, W].

    alpha: [T, T, C], in the features' dtype or float32. Returns T tensors in
    the features' dtype and memory format (NCHW or channels_last).
    backend: None (the one set by use_backend, else "auto"), "auto",
    "reference", "cpu", "cuda" or "triton".
    """
    xs = list(xs)
    check_args(xs, alpha)
    name = _backend.resolve(backend, xs[0].device, "cross_stitch", tasks=len(xs), max_tasks=MAX_TASKS)
    if name == "reference":
        return _reference.cross_stitch(xs, alpha)
    if name == "triton":
        return torch.ops.mtl_kernels.cross_stitch_triton(xs, alpha)
    return torch.ops.mtl_kernels.cross_stitch(xs, alpha)


def check_args(xs: list, alpha, name: str = "xs") -> None:
    x0 = check_task_tensors("cross_stitch", xs, name)
    if not isinstance(alpha, torch.Tensor):
        raise TypeError(f"cross_stitch: alpha must be a torch.Tensor, got {type(alpha).__name__}")
    expected = (len(xs), len(xs), x0.shape[1])
    if tuple(alpha.shape) != expected:
        raise ValueError(f"cross_stitch: alpha must have shape [T, T, C] = {list(expected)}, got {list(alpha.shape)}")
    if alpha.device != x0.device:
        raise ValueError(f"cross_stitch: alpha is on {alpha.device}, expected {x0.device} like {name}[0]")
    if alpha.dtype not in (x0.dtype, torch.float32):
        raise TypeError(f"cross_stitch: alpha must have the features' dtype ({x0.dtype}) or float32, got {alpha.dtype}")


def _fake_forward(xs, alpha):
    return empty_like_all(xs, dense_format(xs[0]))


def _fake_backward(grad_ys, xs, alpha):
    return empty_like_all(xs, dense_format(xs[0])), torch.empty_like(alpha, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    xs, alpha = inputs
    ctx.save_for_backward(*xs, alpha)


def _autograd_backward(backward_op):
    def backward(ctx, grad_ys):
        _backend.forbid_double_backward("cross_stitch")
        *xs, alpha = ctx.saved_tensors
        # Autograd passes None for outputs that took no part in the loss.
        grad_ys = [torch.zeros_like(x) if g is None else g for g, x in zip(grad_ys, xs)]
        grad_xs, grad_alpha = backward_op(grad_ys, xs, alpha)
        return list(grad_xs), grad_alpha

    return backward


def _register(forward: str, backward: str) -> None:
    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(_fake_backward)
    backward_op = getattr(torch.ops.mtl_kernels, backward.split("::")[1])
    torch.library.register_autograd(forward, _autograd_backward(backward_op), setup_context=_setup_context)


if _backend.compiled_error() is None:
    _register("mtl_kernels::cross_stitch", "mtl_kernels::cross_stitch_backward")
if "triton" in _backend.available_backends():
    from ..triton import cross_stitch as _triton_cross_stitch  # noqa: F401  (defines the triton ops)

    _register("mtl_kernels::cross_stitch_triton", "mtl_kernels::cross_stitch_triton_backward")
