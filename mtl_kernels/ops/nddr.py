"""nddr: the NDDR fusion layer as a functional op. Argument checks, fake
kernels, autograd, the running-statistics update and the choice of backend;
the kernels live in csrc/ (common/nddr.h, cpu/nddr.cpp, cuda/nddr.cu).

Training mode runs mtl_kernels::nddr_train (one GEMM pass over the T inputs for
all T tasks, batch statistics, a fused BN + ReLU epilogue); eval mode folds BN
into the weights with differentiable torch ops and runs mtl_kernels::nddr_eval.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from .. import reference as _reference
from .._layout import dense_format, empty_like_all
from ._checks import check_task_tensors

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")
# The CUDA kernels take the task pointers in their arguments; "auto" takes Triton beyond.
MAX_TASKS = {"cuda": 16}


def nddr(
    xs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float = 0.05,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """ys[t] = ReLU(BN_t(weight[t] * concat_j xs[j])) for T task features xs[j] [B, C, H, W].

    weight: [T, C, T*C], the T bias-free 1x1 convolutions, their input
    channels in the order of xs; bn_weight, bn_bias, running_mean,
    running_var: [T, C]. training=True normalises with the batch statistics
    and updates running_mean / running_var in place as nn.BatchNorm2d does
    (momentum, unbiased variance); False uses the running statistics.
    """
    xs = list(xs)
    check_args(xs, weight, bn_weight, bn_bias, running_mean, running_var, training)
    name = _backend.resolve(backend, xs[0].device, "nddr", IMPLEMENTED, tasks=len(xs), max_tasks=MAX_TASKS)
    if name == "reference":
        return _reference.nddr(xs, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    train_op, eval_op = _OPS[name]
    T, C = weight.shape[0], weight.shape[1]
    w = weight.reshape(T * C, T * C)
    if training:
        ys, _, mean, var = train_op(xs, w, bn_weight.reshape(-1), bn_bias.reshape(-1), eps)
        n = xs[0].numel() // C
        with torch.no_grad():
            running_mean.lerp_(mean.view(T, C).to(running_mean.dtype), momentum)
            running_var.lerp_((var * (n / (n - 1))).view(T, C).to(running_var.dtype), momentum)
        return list(ys)
    scale = bn_weight * torch.rsqrt(running_var + eps)  # [T, C]
    folded_w = w * scale.reshape(-1, 1)
    folded_b = (bn_bias - running_mean * scale).reshape(-1)
    return list(eval_op(xs, folded_w, folded_b))


def check_args(xs, weight, bn_weight, bn_bias, running_mean, running_var, training) -> None:
    x0 = check_task_tensors("nddr", xs)
    T, C = len(xs), x0.shape[1]
    params = {
        "weight": (weight, (T, C, T * C)),
        "bn_weight": (bn_weight, (T, C)),
        "bn_bias": (bn_bias, (T, C)),
        "running_mean": (running_mean, (T, C)),
        "running_var": (running_var, (T, C)),
    }
    for pname, (p, shape) in params.items():
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"nddr: {pname} must be a torch.Tensor, got {type(p).__name__}")
        if tuple(p.shape) != shape:
            raise ValueError(
                f"nddr: {pname} must have shape [T, ...] = {list(shape)} for T={T}, C={C}, got {list(p.shape)}"
            )
        if p.device != x0.device:
            raise ValueError(f"nddr: {pname} is on {p.device}, expected {x0.device} like xs[0]")
        if p.dtype not in (x0.dtype, torch.float32):
            raise TypeError(f"nddr: {pname} must have the features' dtype ({x0.dtype}) or float32, got {p.dtype}")
    if training and x0.numel() // max(C, 1) <= 1:
        raise ValueError(f"nddr: expected more than 1 value per channel when training, got input size {list(x0.shape)}")


# ------------------------------------------------------------ fake kernels


def _z_like(xs):
    x0 = xs[0]
    shape = (x0.shape[0], len(xs) * x0.shape[1], x0.shape[2], x0.shape[3])
    return torch.empty(shape, dtype=x0.dtype, device=x0.device, memory_format=dense_format(x0))


def _stats_like(xs, weight):
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    return torch.empty(weight.shape[0], dtype=acc, device=xs[0].device)


def _fake_train(xs, weight, bn_weight, bn_bias, eps):
    return empty_like_all(xs, dense_format(xs[0])), _z_like(xs), _stats_like(xs, weight), _stats_like(xs, weight)


def _fake_train_backward(grad_ys, xs, z, weight, bn_weight, bn_bias, mean, var, eps):
    return (
        empty_like_all(xs, dense_format(xs[0])),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(bn_weight, memory_format=torch.contiguous_format),
        torch.empty_like(bn_bias, memory_format=torch.contiguous_format),
    )


def _fake_eval(xs, weight, bias):
    return empty_like_all(xs, dense_format(xs[0]))


def _fake_eval_backward(grad_ys, xs, ys, weight):
    return (
        empty_like_all(xs, dense_format(xs[0])),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device),
    )


# ---------------------------------------------------------------- autograd


def _zeros_for_none(grads, like):
    # Autograd passes None for outputs that took no part in the loss.
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def _setup_train(ctx, inputs, output):
    xs, weight, bn_weight, bn_bias, eps = inputs
    _, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)
    ctx.eps = eps
    ctx.save_for_backward(z, weight, bn_weight, bn_bias, mean, var, *xs)


def _backward_train_with(backward_op):
    def backward(ctx, grad_ys, grad_z, grad_mean, grad_var):
        _backend.forbid_double_backward("nddr")
        z, weight, bn_weight, bn_bias, mean, var, *xs = ctx.saved_tensors
        grad_ys = _zeros_for_none(grad_ys, xs)
        grad_xs, grad_w, grad_g, grad_b = backward_op(grad_ys, xs, z, weight, bn_weight, bn_bias, mean, var, ctx.eps)
        return list(grad_xs), grad_w, grad_g, grad_b, None

    return backward


def _setup_eval(ctx, inputs, output):
    xs, weight, bias = inputs
    ctx.num_tasks = len(xs)
    ctx.save_for_backward(weight, *xs, *output)


def _backward_eval_with(backward_op):
    def backward(ctx, grad_ys):
        _backend.forbid_double_backward("nddr")
        weight, *rest = ctx.saved_tensors
        xs, ys = rest[: ctx.num_tasks], rest[ctx.num_tasks :]
        grad_xs, grad_w, grad_b = backward_op(_zeros_for_none(grad_ys, xs), xs, ys, weight)
        return list(grad_xs), grad_w, grad_b

    return backward


def _register(suffix: str):
    """Fakes and autograd of one backend's four ops (suffix "" for the compiled ones, "_triton")."""
    ops = torch.ops.mtl_kernels
    names = ("nddr_train", "nddr_train_backward", "nddr_eval", "nddr_eval_backward")
    train, train_bwd, ev, ev_bwd = (getattr(ops, n + suffix) for n in names)
    fakes = (_fake_train, _fake_train_backward, _fake_eval, _fake_eval_backward)
    for n, fake in zip(names, fakes):
        torch.library.register_fake(f"mtl_kernels::{n}{suffix}")(fake)
    torch.library.register_autograd(
        f"mtl_kernels::nddr_train{suffix}", _backward_train_with(train_bwd), setup_context=_setup_train
    )
    torch.library.register_autograd(
        f"mtl_kernels::nddr_eval{suffix}", _backward_eval_with(ev_bwd), setup_context=_setup_eval
    )
    return train, ev


# backend -> (training-mode op, eval-mode op)
_OPS = {}
if _backend.compiled_error() is None:
    _OPS["cpu"] = _OPS["cuda"] = _register("")
if "triton" in _backend.available_backends():
    from ..triton import nddr as _triton_nddr  # noqa: F401  (defines the triton ops)

    _OPS["triton"] = _register("_triton")
