"""gate_sum: the sigmoid-gated sum shared by PAD-Net/MTI-Net distillation and
MTAN attention, as a functional op. Argument checks, fake kernels, autograd and
the choice of backend; the kernels live in csrc/ and mtl_kernels/triton/.

    outs[t] = residuals[t] + sum over pairs i with targets[i] == t of
              feats[i] * sigmoid(gates[i] * scale + shift)

feats[i] and gates[i] are read in place, channel slices of wider tensors
included (the stacked convolution outputs of PAD-Net), as long as each one's H
and W merge into one pixel axis and either pixels or channels are contiguous;
any other layout is copied once.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .. import _backend
from .. import reference as _reference
from .._layout import dense_format
from ._checks import FLOAT_DTYPES, check_like

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")


def gate_sum(
    residuals: Sequence[torch.Tensor] | None,
    feats: Sequence[torch.Tensor],
    gates: Sequence[torch.Tensor],
    targets: Sequence[int],
    num_outputs: int | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """outs[t] = residuals[t] + sum_{i: targets[i] == t} feats[i] * sigmoid(gates[i] * scale + shift).

    residuals: num_outputs tensors [B, C, H, W], or None/[] for none;
    feats, gates: N tensors [B, C, H, W] each; targets: N output indices;
    num_outputs: defaults to len(residuals); scale, shift: [C] or None.
    """
    residuals = list(residuals or [])
    feats, gates, targets = list(feats), list(gates), list(targets)
    for i, t in enumerate(targets):  # int(0.5) would silently pick output 0
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"gate_sum: targets[{i}] must be an int (an output index), got {t!r}")
    targets = [int(t) for t in targets]
    if num_outputs is None:
        if not residuals:
            raise ValueError("gate_sum: num_outputs is required when there are no residuals")
        num_outputs = len(residuals)
    check_args(residuals, feats, gates, targets, num_outputs, scale, shift)
    name = _backend.resolve(backend, feats[0].device, "gate_sum", IMPLEMENTED)
    if name == "reference":
        return _reference.gate_sum(residuals, feats, gates, targets, num_outputs, scale, shift)
    feats = [readable(f) for f in feats]
    gates = [readable(g) for g in gates]
    op = torch.ops.mtl_kernels.gate_sum_triton if name == "triton" else torch.ops.mtl_kernels.gate_sum
    return list(op(residuals, feats, gates, targets, num_outputs, scale, shift))


def fused_ops(backend: str):
    """(forward, backward, backward_out) ops of a fused backend, for callers that
    manage autograd themselves; backward_out writes the feature and gate
    gradients into tensors the caller passes (slices of one stacked gradient)."""
    ops = torch.ops.mtl_kernels
    if backend == "triton":
        return ops.gate_sum_triton, ops.gate_sum_backward_triton, ops.gate_sum_backward_out_triton
    return ops.gate_sum, ops.gate_sum_backward, ops.gate_sum_backward_out


def readable(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels can read it in place (see the module docstring), else a copy."""
    B, C, H, W = x.shape
    sb, sc, sh, sw = x.stride()
    merges = H == 1 or W == 1 or sh == W * sw
    sp = sw if W > 1 else sh
    if merges and (sp == 1 or H * W == 1 or sc == 1 or C == 1):
        return x
    return x.contiguous()


def check_args(residuals, feats, gates, targets, num_outputs, scale, shift) -> None:
    if len(feats) == 0:
        raise ValueError("gate_sum: feats must hold at least one tensor")
    if len(gates) != len(feats) or len(targets) != len(feats):
        raise ValueError(
            f"gate_sum: feats, gates and targets must have the same length, got {len(feats)}, {len(gates)}, "
            f"{len(targets)}"
        )
    if residuals and len(residuals) != num_outputs:
        raise ValueError(f"gate_sum: residuals must hold num_outputs={num_outputs} tensors, got {len(residuals)}")
    f0 = feats[0]
    if not isinstance(f0, torch.Tensor) or f0.dim() != 4:
        raise ValueError("gate_sum: feats[0] must be a 4-D tensor [B, C, H, W]")
    if f0.dtype not in FLOAT_DTYPES:
        raise TypeError(f"gate_sum: feats[0] must be float16, bfloat16, float32 or float64, got {f0.dtype}")
    for name, ts in (("residuals", residuals), ("feats", feats), ("gates", gates)):
        check_like("gate_sum", name, ts, f0, "feats[0]")
    if num_outputs < 1:
        raise ValueError(f"gate_sum: num_outputs must be at least 1, got {num_outputs}")
    for i, t in enumerate(targets):
        if not 0 <= t < num_outputs:
            raise ValueError(f"gate_sum: targets[{i}] = {t} is not an output index in [0, {num_outputs})")
    for name, v in (("scale", scale), ("shift", shift)):
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (f0.shape[1],):
            raise ValueError(f"gate_sum: {name} must be a tensor of shape [C] = [{f0.shape[1]}]")
        if v.device != f0.device:
            raise ValueError(f"gate_sum: {name} is on {v.device}, expected {f0.device}")
        if v.dtype not in (f0.dtype, torch.float32):
            raise TypeError(f"gate_sum: {name} must have the features' dtype ({f0.dtype}) or float32, got {v.dtype}")


def out_format(residuals, feats) -> torch.memory_format:
    """The outputs' layout: the residuals' (or the first feature's) dense format."""
    return dense_format(residuals[0] if residuals else feats[0])


def _fake(residuals, feats, gates, targets, num_outputs, scale, shift):
    fmt, f0 = out_format(residuals, feats), feats[0]
    return [torch.empty(f0.shape, dtype=f0.dtype, device=f0.device, memory_format=fmt) for _ in range(num_outputs)]


def _fake_backward(grad_outs, feats, gates, targets, scale, shift):
    def like(x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))

    def vec(v):
        return torch.empty(
            0 if v is None else v.shape[0], dtype=torch.float32 if v is None else v.dtype, device=feats[0].device
        )

    return [like(f) for f in feats], [like(g) for g in gates], vec(scale), vec(shift)


def _fake_backward_out(grad_outs, feats, gates, targets, scale, shift, grad_feats, grad_gates):
    _, _, grad_scale, grad_shift = _fake_backward(grad_outs, feats, gates, targets, scale, shift)
    return grad_scale, grad_shift


def _setup_context(ctx, inputs, output):
    residuals, feats, gates, targets, num_outputs, scale, shift = inputs
    ctx.targets, ctx.num_feats, ctx.has_residuals = targets, len(feats), len(residuals) > 0
    ctx.has_scale, ctx.has_shift = scale is not None, shift is not None
    ctx.save_for_backward(*feats, *gates, scale, shift)


def _backward_with(backward_op):
    def backward(ctx, grad_outs):
        _backend.forbid_double_backward("gate_sum")
        saved = ctx.saved_tensors
        n = ctx.num_feats
        feats, gates, scale, shift = saved[:n], saved[n : 2 * n], saved[2 * n], saved[2 * n + 1]
        # An output that took no part in the loss gets a zero gradient.
        grad_outs = [torch.zeros_like(feats[0]) if g is None else g for g in grad_outs]
        grad_feats, grad_gates, grad_scale, grad_shift = backward_op(
            grad_outs, list(feats), list(gates), ctx.targets, scale, shift
        )
        grad_res = list(grad_outs) if ctx.has_residuals else []
        return (
            grad_res,
            list(grad_feats),
            list(grad_gates),
            None,
            None,
            grad_scale if ctx.has_scale else None,
            grad_shift if ctx.has_shift else None,
        )

    return backward


def _register(suffix: str) -> None:
    fwd, bwd = f"mtl_kernels::gate_sum{suffix}", f"mtl_kernels::gate_sum_backward{suffix}"
    torch.library.register_fake(fwd)(_fake)
    torch.library.register_fake(bwd)(_fake_backward)
    torch.library.register_fake(f"mtl_kernels::gate_sum_backward_out{suffix}")(_fake_backward_out)
    backward_op = getattr(torch.ops.mtl_kernels, f"gate_sum_backward{suffix}")
    torch.library.register_autograd(fwd, _backward_with(backward_op), setup_context=_setup_context)


if _backend.compiled_error() is None:
    _register("")
if "triton" in _backend.available_backends():
    from ..triton import gate_sum as _triton_gate_sum  # noqa: F401  (defines the triton ops)

    _register("_triton")
