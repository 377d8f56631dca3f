"""MultiModalDistillation (PAD-Net, MTI-Net) and MTANAttention on the fused gate_sum op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..ops.gate_sum import IMPLEMENTED, fused_ops, gate_sum
from .tasks import check_task_features, check_tasks


class MultiModalDistillation(nn.Module):
    """PAD-Net's multi-modal distillation (Xu et al. 2018; MTI-Net applies it per scale).

    D_t = F_t + sum over auxiliary tasks a != t of conv_f[t,a](F_a) * sigmoid(conv_g[t,a](F_a)),
    conv_f, conv_g bias-free 3x3 convolutions C -> C. For each source a, all its
    convolutions (feature and gate, for every target t) run as ONE convolution
    with stacked weights; one gate_sum then reads those outputs in place, gates,
    sums over sources and adds the residual.

    forward takes {task: features} for the auxiliary tasks (a superset of
    `tasks`) and returns {task: distilled features} for `tasks`. With
    key_format="features_{}" it reads the survey code's input keys instead and
    ignores other entries (what convert() sets). Parameters: weight_<a> of
    shape [2 * K_a * C, C, 3, 3], per target slot k (the targets of a in the
    order of `tasks`) the feature conv then the gate conv. Also loads the
    survey's MultiTaskDistillationModule keys
    (self_attention.<t>.<a>.conv.weight and .attention.0.weight).
    """

    def __init__(self, tasks, auxiliary_tasks, channels: int, *, key_format: str = "{}", backend: str | None = None):
        super().__init__()
        self.tasks = check_tasks(tasks, "MultiModalDistillation")
        self.auxiliary_tasks = check_tasks(auxiliary_tasks, "MultiModalDistillation")
        missing = [t for t in self.tasks if t not in self.auxiliary_tasks]
        if missing:
            raise ValueError(
                f"MultiModalDistillation: tasks {missing} must also be auxiliary tasks (their features "
                f"are the residuals); auxiliary_tasks={self.auxiliary_tasks}"
            )
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"MultiModalDistillation: channels must be a positive int, got {channels!r}")
        self.channels, self.key_format = channels, key_format
        self.backend = _backend.check_backend_arg(backend)
        # source a -> the targets it feeds, in the order of `tasks`
        self.targets_of = {a: [t for t in self.tasks if t != a] for a in self.auxiliary_tasks}
        self.weights = nn.ParameterDict()
        for a, targets in self.targets_of.items():
            if targets:
                w = torch.empty(2 * len(targets) * channels, channels, 3, 3)
                for k in range(2 * len(targets)):  # each conv initialised as nn.Conv2d would be
                    nn.init.kaiming_uniform_(w[k * channels : (k + 1) * channels], a=5**0.5)
                self.weights[a] = nn.Parameter(w)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.key_format == "{}":
            xs = check_task_features(features, self.auxiliary_tasks, self.channels, "MultiModalDistillation")
        else:
            keys = {a: self.key_format.format(a) for a in self.auxiliary_tasks}
            absent = [k for k in keys.values() if k not in features]
            if absent:
                raise KeyError(f"MultiModalDistillation: features lack {absent}; expected keys {list(keys.values())}")
            picked = {a: features[k] for a, k in keys.items()}
            xs = check_task_features(picked, self.auxiliary_tasks, self.channels, "MultiModalDistillation")
        x_of = dict(zip(self.auxiliary_tasks, xs))
        residuals = [x_of[t] for t in self.tasks]
        if not self.weights:  # a single task with no other auxiliary: nothing to distil
            return dict(zip(self.tasks, residuals))
        stacked = [F.conv2d(x_of[a], w.to(x_of[a].dtype), padding=1) for a, w in self.weights.items()]
        # slot i of source s: (source, k, target)
        slots = tuple(
            (s, k, self.tasks.index(t)) for s, a in enumerate(self.weights) for k, t in enumerate(self.targets_of[a])
        )
        name = _backend.resolve(self.backend, xs[0].device, "gate_sum", IMPLEMENTED)
        if name == "reference":
            feats, gates, targets = _slices(stacked, slots, self.channels)
            outs = gate_sum(residuals, feats, gates, targets, len(self.tasks), backend=name)
        else:
            outs = _GatedSources.apply(name, slots, self.channels, len(residuals), *residuals, *stacked)
        return dict(zip(self.tasks, outs))

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, auxiliary_tasks={self.auxiliary_tasks}, channels={self.channels}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        survey = {
            (t, a, kind): f"{prefix}self_attention.{t}.{a}.{key}"
            for a, targets in self.targets_of.items()
            for t in targets
            for kind, key in (("feat", "conv.weight"), ("gate", "attention.0.weight"))
        }
        if (
            survey
            and not any(k.startswith(prefix + "weights.") for k in state_dict)
            and any(k in state_dict for k in survey.values())
        ):
            absent = [k for k in survey.values() if k not in state_dict]
            if absent:
                errors.append(f"MultiModalDistillation: the survey state_dict lacks {absent}")
                return
            for a, targets in self.targets_of.items():
                if targets:
                    blocks = [state_dict.pop(survey[t, a, kind]) for t in targets for kind in ("feat", "gate")]
                    state_dict[f"{prefix}weights.{a}"] = torch.cat(blocks)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


def _slices(stacked, slots, C):
    """The (feature, gate) channel slices of each slot, and its target."""
    feats = [stacked[s][:, 2 * k * C : (2 * k + 1) * C] for s, k, _ in slots]
    gates = [stacked[s][:, (2 * k + 1) * C : (2 * k + 2) * C] for s, k, _ in slots]
    return feats, gates, [t for _, _, t in slots]


class _GatedSources(torch.autograd.Function):
    """gate_sum over the stacked convolution outputs, whose backward returns one
    gradient per stacked tensor, the fused backward writing each slot's feature
    and gate gradients straight into their channel slices of it. Autograd
    through the channel-slice views would instead allocate a zeroed gradient of
    the whole stacked tensor for every slice and add them up."""

    @staticmethod
    def forward(ctx, backend, slots, C, num_res, *tensors):
        residuals, stacked = list(tensors[:num_res]), list(tensors[num_res:])
        feats, gates, targets = _slices(stacked, slots, C)
        forward_op, _, _ = fused_ops(backend)
        ctx.backend, ctx.slots, ctx.C = backend, slots, C
        ctx.save_for_backward(*stacked)
        return tuple(forward_op(residuals, feats, gates, targets, num_res, None, None))

    @staticmethod
    def backward(ctx, *grad_outs):
        _backend.forbid_double_backward("MultiModalDistillation")
        stacked = ctx.saved_tensors
        feats, gates, targets = _slices(stacked, ctx.slots, ctx.C)
        grad_outs = [torch.zeros_like(feats[0]) if g is None else g for g in grad_outs]
        _, _, backward_out = fused_ops(ctx.backend)
        grads = [torch.empty_like(x) for x in stacked]  # every channel is one slot's feature or gate
        grad_feats, grad_gates, _ = _slices(grads, ctx.slots, ctx.C)
        backward_out(grad_outs, feats, gates, targets, None, None, grad_feats, grad_gates)
        return (None, None, None, None, *grad_outs, *grads)


class MTANAttention(nn.Sequential):
    """MTAN's attention (Liu et al. 2019): mask = sigmoid(BN(conv1x1(ReLU(BN(conv1x1(x)))))).

    forward(x, features=None) returns mask * features, with the second BN, the
    sigmoid and the product fused in one gate_sum pass (and one for its
    backward); without features it returns the mask, so it drops in for the
    survey's AttentionLayer, whose state_dict keys it shares (an nn.Sequential:
    0 conv, 1 BN, 2 ReLU, 3 conv, 4 BN, 5 Sigmoid). In eval mode the first BN
    is folded into its convolution and the second into the gate's affine.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, *, backend: str | None = None):
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, 1, padding=0),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 1, padding=0),
            nn.BatchNorm2d(out_channels),
            nn.Sigmoid(),
        )
        self.backend = _backend.check_backend_arg(backend)

    def forward(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        conv1, bn1, _, conv2, bn2, _ = self
        # Each BN by its own mode, as in the survey's nn.Sequential: a BN frozen in a training
        # model (fine-tuning) keeps its running statistics.
        if _batch_statistics(bn1):
            z = conv2(F.relu(bn1(conv1(x))))
        else:
            w, b = _fold(conv1, bn1)
            z = conv2(F.relu(F.conv2d(x, w, b)))
        if features is None:
            return torch.sigmoid(bn2(z))
        if features.shape != z.shape:
            raise ValueError(
                f"MTANAttention: features have shape {tuple(features.shape)}, expected the mask's {tuple(z.shape)}"
            )
        if _batch_statistics(bn2):
            # Normalise with PyTorch's own batch norm, without its affine (its
            # statistics pass ran 3x faster than torch.var_mean over (0, 2, 3)
            # on the CPU, and it updates the running statistics exactly); the
            # affine, the sigmoid and the product are the fused pass.
            z = _normalise_like(bn2, z)
            scale, shift = bn2.weight, bn2.bias
        else:
            scale, shift = _eval_affine(bn2)
        return gate_sum(None, [features], [z.to(features.dtype)], [0], 1, scale, shift, backend=self.backend)[0]


def _batch_statistics(bn: nn.BatchNorm2d) -> bool:
    """Whether bn normalises with the batch's statistics (as nn.BatchNorm2d decides)."""
    return bn.training or bn.running_mean is None


def _normalise_like(bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """bn(z) without its affine, in batch-statistics mode, updating what bn would update."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)  # as nn.BatchNorm2d counts and averages
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    track = not bn.training or bn.track_running_stats
    mean, var = (bn.running_mean, bn.running_var) if track else (None, None)
    return F.batch_norm(z, mean, var, None, None, True, factor, bn.eps)


def _eval_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(z) = z * scale + shift per channel, from the running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """conv followed by an eval-mode BN, as one conv's weight and bias."""
    scale, shift = _eval_affine(bn)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale.view(-1, 1, 1, 1), bias * scale + shift
