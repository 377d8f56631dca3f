"""dense_loss: the survey's dense losses as one functional op. Argument checks,
target preparation, fake kernels, autograd and the choice of backend; the
kernels live in csrc/ and mtl_kernels/triton/, the definition in
mtl_kernels/reference/dense_loss.py.

The fused kernels compute the loss sum and its gradient in one pass over the
predictions and keep the gradient (as fused cross-entropy kernels do): no
log_softmax, mask or normalised copy is materialised, and backward only
scales the kept gradient by d loss / d sum. With inplace_backward=True it
scales it in place, one prediction-sized tensor less at the peak, but then the
graph through the loss can be backpropagated only once (a second backward, as
with retain_graph=True, raises autograd's in-place error; it never gives a
wrong gradient).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .. import _backend
from .. import reference as _reference
from .._layout import dense_format
from ..reference.dense_loss import INVALID, KINDS, acc_dtype
from ._checks import FLOAT_DTYPES

IMPLEMENTED = ("reference", "cpu", "cuda", "triton")
_KIND_CODE = {kind: i for i, kind in enumerate(KINDS)}
_INVALID_CODE = {name: i for i, name in enumerate(INVALID)}


def dense_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    *,
    pos_weight: float | None = None,
    invalid: str = "255",
    check_targets: bool = True,
    inplace_backward: bool = False,
    upsample: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """The mean loss of `kind` over its counted terms, a 0-dim float32 tensor (float64 for float64 pred).

    pred: [B, C, H, W] (any float dtype, NCHW or channels_last; other layouts are copied once).
    target: cross_entropy: class indices [B, H, W] or [B, 1, H, W] (integer or integral float),
    255 ignored; otherwise pred's shape ([B, H, W] also accepted when C == 1).
    kind: "cross_entropy" (semseg, human_parts), "l1" (depth), "normals_l1" (normals, C == 3),
    "balanced_bce" (edge with pos_weight=0.95; sal with pos_weight=None: the batch's share of negatives).
    invalid: which L1 targets are holes, "255" or "nonpositive" (0, negative or NaN).
    check_targets: raise on class indices out of range that are not 255, or NaN targets where
    NaN is not a hole (on a GPU this reads one number back, a host synchronisation).
    inplace_backward: see the module docstring (fused backends only).
    upsample: a prediction whose H x W differs from the target's is first resized to it
    bilinearly (align_corners=False, as F.interpolate and the survey's models); without it a
    size mismatch is an error. The fused backends resize inside the loss pass: the full-size
    prediction and its gradient never exist. On a GPU the gradient is gathered back by atomic
    adds, so, as with F.interpolate's backward there, torch.use_deterministic_algorithms(True)
    makes it an error (a warning with warn_only=True).
    A batch whose every pixel is ignored gives 0 with a zero gradient.
    """
    pred, target = check_args(pred, target, kind, pos_weight, invalid, upsample)
    name = _backend.resolve(backend, pred.device, "dense_loss", IMPLEMENTED)
    total, count, bad = dense_loss_sums(pred, target, kind, pos_weight, invalid, name, inplace_backward)
    if check_targets:
        raise_if_malformed(bad, kind, pred.shape[1])
    return (total / count.clamp(min=1)).to(acc_dtype(pred.dtype))


def dense_loss_sums(pred, target, kind, pos_weight, invalid, backend, inplace_backward=False):
    """(sum of terms, count, malformed targets) of checked, prepared arguments on a resolved backend."""
    if backend == "reference":
        return _reference_sums(pred, target, kind, pos_weight, invalid)
    stats = dense_loss_stats(pred, target, kind, pos_weight, invalid, backend, inplace_backward)
    # The counts take no gradient: detached, autograd does no work for them in backward
    # (the division's gradient with respect to its denominator, the clamp's).
    counts = stats.detach()
    return stats[0], counts[1], counts[2]


def dense_loss_stats(pred, target, kind, pos_weight, invalid, backend, inplace_backward=False) -> torch.Tensor:
    """[3] float64 (sum of terms, count, malformed targets), differentiable in the sum: one tensor
    per task, so that DenseMultiTaskLoss finishes every task's loss in a few ops on one stack."""
    if backend == "reference":
        return torch.stack([x.to(torch.float64) for x in _reference_sums(pred, target, kind, pos_weight, invalid)])
    resize = pred.shape[-2:] != target.shape[-2:]
    if resize and backend == "triton" and pred.is_cuda:  # the CUDA op alerts by itself
        _alert_not_deterministic("dense_loss_upsampled_triton")
    if pos_weight is None and kind == "balanced_bce":  # sal
        pos_weight = _share_of_negatives(target)
    else:
        # torch.full fills on the device (the value a kernel argument); torch.tensor would copy
        # from the host, and that copy waits for the GPU: a synchronisation per loss.
        pos_weight = torch.full((), 0.0 if pos_weight is None else pos_weight, dtype=torch.float64, device=pred.device)
    ops = torch.ops.mtl_kernels
    if backend == "triton":
        op = ops.dense_loss_upsampled_triton if resize else ops.dense_loss_triton
    else:
        op = ops.dense_loss_upsampled if resize else ops.dense_loss
    stats, _ = op(pred, target, _KIND_CODE[kind], pos_weight, _INVALID_CODE[invalid], inplace_backward)
    return stats


def dense_loss_group_stats(preds, targets, kinds, pos_weights, invalid, backend, inplace_backward=False):
    """dense_loss_stats of T tasks (checked, prepared, full-size predictions of one dtype on one
    device; kinds and pos_weights as dense_loss_stats takes them), a list of [3] tensors, in one
    launch of dense_loss_group (cpu, cuda) or dense_loss_group_triton, and the backward in one more
    (for the tasks a gradient reaches: each task's stats are an output of their own)."""
    if backend not in ("cpu", "cuda", "triton"):
        raise ValueError(f"dense_loss_group_stats: backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")
    device = preds[0].device
    # sal's weights (the batch's share of negatives) come from the device; the fixed ones from a
    # cached vector, or filled on the device beside sal's.
    weights = [
        _share_of_negatives(t) if w is None and k == "balanced_bce" else 0.0 if w is None else float(w)
        for t, k, w in zip(targets, kinds, pos_weights)
    ]
    if all(isinstance(w, float) for w in weights):
        weights = fixed_vector(tuple(weights), device)
    else:
        fill = lambda w: torch.full((), w, dtype=torch.float64, device=device)  # noqa: E731
        weights = torch.stack([w if isinstance(w, torch.Tensor) else fill(w) for w in weights])
    codes = [_KIND_CODE[kind] for kind in kinds]
    ops = torch.ops.mtl_kernels
    op = ops.dense_loss_group_triton if backend == "triton" else ops.dense_loss_group
    stats, _ = op(list(preds), list(targets), codes, weights, _INVALID_CODE[invalid], inplace_backward)
    return stats


def _share_of_negatives(target: torch.Tensor) -> torch.Tensor:
    """sal's balanced-BCE weight, a 0-dim float64 computed on the device (no host read-back)."""
    return 1.0 - (target >= 0.5).sum(dtype=torch.float64) / target.numel()


_fixed_vectors: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_FIXED_VECTORS_KEPT = 64  # the most recently used; weights changed every step must not pile up


def fixed_vector(values: tuple[float, ...], device: torch.device, dtype=torch.float64) -> torch.Tensor:
    """values as a tensor on device, made once per values, device and dtype (a copy from the host at
    every call would wait for the GPU)."""
    key = (values, device, dtype)
    if key in _fixed_vectors:
        _fixed_vectors.move_to_end(key)
    else:
        _fixed_vectors[key] = torch.tensor(values, dtype=dtype, device=device)
        if len(_fixed_vectors) > _FIXED_VECTORS_KEPT:
            _fixed_vectors.popitem(last=False)
    return _fixed_vectors[key]


def _reference_sums(pred, target, kind, pos_weight, invalid):
    if pred.shape[-2:] != target.shape[-2:]:  # F.interpolate, then the loss at the target's size
        # Both NCHW (F.interpolate keeps a channels_last pred so; cross-entropy targets are 3-D).
        pred = F.interpolate(pred, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
        pred, target = pred.contiguous(), target.contiguous()
    total, count, bad = _reference.dense_loss(pred, target, kind, pos_weight, invalid)
    return total, count.to(total.dtype), bad


def _alert_not_deterministic(what: str) -> None:
    # As ATen's alertNotDeterministic: atomic adds order the gradient's rounding differently per run.
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{what} does not have a deterministic implementation (it gathers the gradient by atomic "
        "adds), but you set torch.use_deterministic_algorithms(True). Upsample with F.interpolate "
        "before the loss, or pass warn_only=True to use_deterministic_algorithms."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=4)
    else:
        raise RuntimeError(message)


def raise_if_malformed(bad: torch.Tensor, kind: str, classes: int) -> None:
    n = int(bad)
    if n == 0:
        return
    if kind == "cross_entropy":
        raise ValueError(
            f"dense_loss: target has {n} class indices that are neither integers in [0, {classes}) nor the "
            "ignore index 255"
        )
    hint = "; for depth, invalid='nonpositive' treats NaN as a hole" if kind == "l1" else ""
    raise ValueError(f"dense_loss ({kind}): target has {n} NaN entries{hint}")


def check_args(pred, target, kind, pos_weight, invalid, upsample=False) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked arguments, with pred dense and target in the form the kernels read (see prepare_target)."""
    if kind not in KINDS:
        raise ValueError(f"dense_loss: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if invalid not in INVALID:
        raise ValueError(f"dense_loss: invalid must be one of {', '.join(INVALID)}, got {invalid!r}")
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"dense_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
    if pred.dim() != 4:
        raise ValueError(f"dense_loss: pred must be 4-D [B, C, H, W], got shape {tuple(pred.shape)}")
    if pred.dtype not in FLOAT_DTYPES:
        raise TypeError(f"dense_loss: pred must be float16, bfloat16, float32 or float64, got {pred.dtype}")
    if target.device != pred.device:
        raise ValueError(f"dense_loss: target is on {target.device}, expected {pred.device} like pred")
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"dense_loss: target must be an integer or floating tensor, got {target.dtype}")
    if kind == "normals_l1" and pred.shape[1] != 3:
        raise ValueError(f"dense_loss: normals_l1 needs pred with 3 channels, got shape {tuple(pred.shape)}")
    if pos_weight is not None and not (isinstance(pos_weight, float | int) and 0.0 <= pos_weight <= 1.0):
        raise ValueError(f"dense_loss: pos_weight must be a number in [0, 1] or None, got {pos_weight!r}")
    if pred.numel() == 0:
        raise ValueError(f"dense_loss: pred is empty, shape {tuple(pred.shape)}")
    pred = pred.contiguous(memory_format=dense_format(pred))
    size = tuple(target.shape[-2:]) if target.dim() >= 2 else None
    if size is not None and size != tuple(pred.shape[-2:]):
        if not upsample:
            raise ValueError(
                f"dense_loss: prediction is {tuple(pred.shape[-2:])} but the target is {size}; "
                "pass upsample=True to resize predictions bilinearly"
            )
        return pred, prepare_target(pred, target, kind, size)
    return pred, prepare_target(pred, target, kind)


def prepare_target(pred: torch.Tensor, target: torch.Tensor, kind: str, size=None) -> torch.Tensor:
    """Cross-entropy: contiguous int64 [B, H, W]. Otherwise: pred's shape and strides in float32
    (float64 for float64 pred), so the kernels walk pred, target and gradient with one index.
    With size (the prediction is resized to the target's H x W = size): targets contiguous."""
    B, C, H, W = pred.shape
    if size is not None:
        H, W = size
    if kind == "cross_entropy":
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]  # the survey's [B, 1, H, W] labels
        if tuple(target.shape) != (B, H, W):
            raise ValueError(
                f"dense_loss: cross_entropy target must be [B, H, W] = {[B, H, W]} (or [B, 1, H, W]), "
                f"got {list(target.shape)}"
            )
        if target.is_floating_point():
            # Labels that are not integers (2.5, NaN) become -1, which the kernels count as
            # malformed: .to(int64) alone would truncate them into some class, silently.
            target = torch.where(target == target.trunc(), target, -1.0)
        return target.to(torch.int64).contiguous()
    if target.dim() == 3 and C == 1:
        target = target.unsqueeze(1)
    if tuple(target.shape) != (B, C, H, W):
        raise ValueError(f"dense_loss: {kind} target must have pred's shape {[B, C, H, W]}, got {list(target.shape)}")
    acc = acc_dtype(pred.dtype)
    if size is not None:
        return target.to(acc).contiguous()
    if target.dtype == acc and target.stride() == pred.stride():
        return target
    return torch.empty_strided(pred.shape, pred.stride(), dtype=acc, device=pred.device).copy_(target)


def _fake(pred, target, kind, pos_weight, invalid, inplace_backward):
    return pred.new_empty(3, dtype=torch.float64), torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    ctx.inplace = inputs[5]
    ctx.save_for_backward(output[1])
    # The kept gradient is an output only to be saved: no gradient flows into it, and autograd
    # must not materialise a zero-filled pred-sized one for it in backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward_with(scale, scale_):
    def backward(ctx, grad_stats, _grad_grad):
        _backend.forbid_double_backward("dense_loss")
        (grad,) = ctx.saved_tensors
        if grad_stats is None:  # the loss took no part in what is differentiated
            return None, None, None, None, None, None
        # d loss / d pred = (d loss / d sum) * (d sum / d pred), in float: not torch.mul, which
        # on a GPU rounds the 0-dim factor to a half-precision grad's dtype first.
        if ctx.inplace:
            scale_(grad, grad_stats[0])
            # A compiled op's mutation does not bump the version counter: bump it, so that a second
            # backward through the overwritten gradient is autograd's error, not a wrong answer.
            torch.autograd.graph.increment_version(grad)
            return grad, None, None, None, None, None
        return scale(grad, grad_stats[0]), None, None, None, None, None

    return backward


def _register(name: str, scale, scale_) -> None:
    # The upsampled ops' kept gradient is pred-sized too, so one fake kernel serves all four.
    torch.library.register_fake(f"mtl_kernels::{name}")(_fake)
    torch.library.register_autograd(f"mtl_kernels::{name}", _backward_with(scale, scale_), setup_context=_setup_context)


def _group_fake(preds, targets, kinds, pos_weights, invalid, inplace_backward):
    return [p.new_empty(3, dtype=torch.float64) for p in preds], [torch.empty_like(p) for p in preds]


def _group_setup_context(ctx, inputs, output):
    ctx.inplace = inputs[5]
    ctx.save_for_backward(*output[1])
    ctx.mark_non_differentiable(*output[1])  # as _setup_context: kept only to be saved
    ctx.set_materialize_grads(False)


def _group_backward_with(scale, scale_):
    def backward(ctx, grad_stats, _grad_grads):
        _backend.forbid_double_backward("dense_loss_group")
        kept = list(ctx.saved_tensors)
        out = [None] * len(kept)  # None for the targets' too (a list input takes a list)
        # Only the tasks whose stats a gradient reached: a loss of one task leaves the others (and
        # so their heads, upstream) without a gradient, not with a zero one to push through.
        live = [t for t, g in enumerate(grad_stats or ()) if g is not None]
        if not live:
            return out, [None] * len(kept), None, None, None, None
        grads = [kept[t] for t in live]
        sums = torch.stack([grad_stats[t] for t in live])[:, 0]
        if ctx.inplace:
            scale_(grads, sums)
            for g in grads:
                torch.autograd.graph.increment_version(g)  # see _backward_with
        else:
            grads = scale(grads, sums)
        for t, g in zip(live, grads):
            out[t] = g
        return out, [None] * len(kept), None, None, None, None

    return backward


if _backend.compiled_error() is None:
    torch.library.register_fake("mtl_kernels::dense_loss_group")(_group_fake)
    torch.library.register_fake("mtl_kernels::dense_loss_group_backward")(
        lambda grads, grad_sums: [torch.empty_like(g) for g in grads]
    )
    torch.library.register_fake("mtl_kernels::dense_loss_group_backward_")(lambda grads, grad_sums: None)
    torch.library.register_autograd(
        "mtl_kernels::dense_loss_group",
        _group_backward_with(
            torch.ops.mtl_kernels.dense_loss_group_backward, torch.ops.mtl_kernels.dense_loss_group_backward_
        ),
        setup_context=_group_setup_context,
    )
    torch.library.register_fake("mtl_kernels::dense_loss_backward")(lambda grad, grad_sum: torch.empty_like(grad))
    torch.library.register_fake("mtl_kernels::dense_loss_backward_")(lambda grad, grad_sum: None)
    for _name in ("dense_loss", "dense_loss_upsampled"):
        _register(_name, torch.ops.mtl_kernels.dense_loss_backward, torch.ops.mtl_kernels.dense_loss_backward_)
if "triton" in _backend.available_backends():
    # The triton ops (importing them defines them), their backward scaling included.
    from ..triton import dense_loss as _triton_dense_loss  # noqa: F401
    from ..triton import dense_loss_group as _triton_dense_loss_group  # noqa: F401
    from ..triton import dense_loss_upsampled as _triton_dense_loss_upsampled  # noqa: F401

    torch.library.register_autograd(
        "mtl_kernels::dense_loss_group_triton",
        _group_backward_with(
            torch.ops.mtl_kernels.dense_loss_group_backward_triton,
            torch.ops.mtl_kernels.dense_loss_group_backward_triton_,
        ),
        setup_context=_group_setup_context,
    )

    for _name in ("dense_loss_triton", "dense_loss_upsampled_triton"):
        _register(
            _name, torch.ops.mtl_kernels.dense_loss_backward_triton, torch.ops.mtl_kernels.dense_loss_backward_triton_
        )
