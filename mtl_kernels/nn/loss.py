"""DenseMultiTaskLoss: the survey's per-task losses, fused, and their weighting."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..ops.dense_loss import (
    IMPLEMENTED,
    check_args,
    dense_loss_group_stats,
    dense_loss_stats,
    fixed_vector,
    raise_if_malformed,
)
from ..reference.dense_loss import INVALID, acc_dtype

# The survey's task kinds: which loss each one uses, and its balanced-BCE positive weight
# (edge: 0.95; sal: None, the batch's share of negatives).
TASK_KINDS = {
    "semseg": ("cross_entropy", None),
    "human_parts": ("cross_entropy", None),
    "depth": ("l1", None),
    "normals": ("normals_l1", None),
    "edge": ("balanced_bce", 0.95),
    "sal": ("balanced_bce", None),
}


class _TaskMeans(torch.autograd.Function):
    """Every task's mean loss, sum / max(count, 1), from the tasks' [3] stats in a few ops for all
    of them. Returns (means [T], malformed [T], mean_0, ..., mean_{T-1}): the vector for the
    weighted total, the scalars as the per-task losses. Each scalar's gradient reaches its own
    task's stats only: a gradient-level balancer differentiates one task's loss at a time, and a
    plain stack would pass the other tasks zero gradients, which autograd pushes through their
    loss kernels and heads all the same."""

    @staticmethod
    def forward(ctx, dtype, *stats):
        S = torch.stack(stats)
        counts = S[:, 1].clamp(min=1)
        ctx.save_for_backward(counts)
        ctx.set_materialize_grads(False)
        means = (S[:, 0] / counts).to(dtype)
        bad = S[:, 2]
        ctx.mark_non_differentiable(bad)
        return (means, bad, *means.clone().unbind(0))

    @staticmethod
    def backward(ctx, grad_means, _grad_bad, *grad_each):
        (counts,) = ctx.saved_tensors
        T = len(grad_each)
        if grad_means is not None:  # the total: every task
            live = list(range(T))
            G = grad_means.to(torch.float64)
            if any(g is not None for g in grad_each):
                G = G + torch.stack([g if g is not None else torch.zeros_like(grad_means[0]) for g in grad_each])
        else:
            live = [t for t, g in enumerate(grad_each) if g is not None]
            if not live:
                return (None,) * (T + 1)
            G = torch.stack([grad_each[t] for t in live]).to(torch.float64)
        # (not counts[live]: a list index is copied from the host, which waits for the GPU)
        c = counts if len(live) == T else torch.stack([counts[t] for t in live])
        rows = F.pad((G / c)[:, None], (0, 2))  # d mean / d (sum, count, malformed) = (1 / count, 0, 0)
        out = [None] * T
        for t, row in zip(live, rows.unbind(0)):
            out[t] = row
        return (None, *out)


class DenseMultiTaskLoss(nn.Module):
    """Total and per-task losses of a multi-task dense prediction model, each task's loss fused.

    task_kinds: {task: kind}, kind one of semseg, human_parts (cross-entropy, ignore 255), depth
        (L1 over valid pixels), normals (L1 of the L2-normalised prediction), edge (balanced BCE,
        positive weight edge_pos_weight), sal (balanced BCE weighted by the batch's share of
        negatives); a list of task names means each task is its own kind.
    weights: {task: float}; or a loss-level balancer of mtl_kernels.balancing (Fixed, EW,
        Uncertainty, DWA, ...), called as balancer(losses) -> (total, weights); None: all 1.
    upsample: predictions smaller than their targets are resized to the target size with
        bilinear interpolation (align_corners=False, as the survey's models); on the fused backends
        inside the loss pass (no full-size prediction or gradient is made), on the reference by
        F.interpolate first. False makes a size mismatch an error.
    depth_invalid: which depth targets are holes, "255" (the survey) or "nonpositive" (0, < 0, NaN).
    check_targets: raise on class indices out of range (not 255) or NaN targets; all tasks are
        checked together, one host synchronisation per call on a GPU.
    inplace_backward: backward scales each task's kept gradient in place (one prediction-sized
        tensor less at the peak); the graph through the loss can then be backpropagated only once.
    group_tasks: True: on the fused backends, the tasks whose predictions are full size and share
        a dtype run as one launch of dense_loss_group, and their backward as one more. False: one
        launch per task (the same results). None (default): grouped on a GPU, where launches
        cost; per task on the CPU, where one launch gains no time and, without
        inplace_backward, the grouped backward keeps every task's gradient alive until all are
        made (per task, each is freed after its own).

    forward(preds, targets) -> (total, {task: loss}); preds[t] [B, C, H, W]; targets[t] as in
    mtl_kernels.ops.dense_loss (semseg / human_parts: [B, H, W] or [B, 1, H, W] class indices).
    Extra keys in targets (images, metadata) are ignored; every task needs a prediction and a target.
    """

    def __init__(
        self,
        task_kinds: Mapping[str, str] | Sequence[str],
        weights: Mapping[str, float] | nn.Module | None = None,
        *,
        upsample: bool = False,
        depth_invalid: str = "255",
        edge_pos_weight: float = 0.95,
        check_targets: bool = True,
        inplace_backward: bool = False,
        group_tasks: bool | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if isinstance(task_kinds, str):
            raise TypeError(
                f"DenseMultiTaskLoss: task_kinds must be a dict {{task: kind}} or a list, got {task_kinds!r}"
            )
        if not isinstance(task_kinds, Mapping):
            task_kinds = {t: t for t in task_kinds}
        if not task_kinds:
            raise ValueError("DenseMultiTaskLoss: task_kinds must name at least one task")
        for task, kind in task_kinds.items():
            if kind not in TASK_KINDS:
                raise ValueError(
                    f"DenseMultiTaskLoss: task {task!r} has unknown kind {kind!r}; kinds are {', '.join(TASK_KINDS)}"
                )
        if depth_invalid not in INVALID:
            raise ValueError(f"DenseMultiTaskLoss: depth_invalid must be one of {INVALID}, got {depth_invalid!r}")
        if isinstance(edge_pos_weight, bool) or not isinstance(edge_pos_weight, numbers.Real):
            raise TypeError(f"DenseMultiTaskLoss: edge_pos_weight must be a number, got {edge_pos_weight!r}")
        if not 0.0 <= edge_pos_weight <= 1.0:
            raise ValueError(f"DenseMultiTaskLoss: edge_pos_weight must be in [0, 1], got {edge_pos_weight}")
        for name, flag in (
            ("upsample", upsample),
            ("check_targets", check_targets),
            ("inplace_backward", inplace_backward),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"DenseMultiTaskLoss: {name} must be True or False, got {flag!r}")
        if group_tasks is not None and not isinstance(group_tasks, bool):
            raise TypeError(f"DenseMultiTaskLoss: group_tasks must be True, False or None, got {group_tasks!r}")
        self.task_kinds = dict(task_kinds)
        self.tasks = list(task_kinds)
        self.upsample, self.depth_invalid, self.edge_pos_weight = upsample, depth_invalid, edge_pos_weight
        self.check_targets, self.inplace_backward = check_targets, inplace_backward
        self.backend = _backend.check_backend_arg(backend)
        self.group_tasks = group_tasks
        if isinstance(weights, nn.Module):
            self.balancer, self.weights = weights, None
            tasks = getattr(weights, "tasks", None)
            if tasks is not None and sorted(tasks) != sorted(self.tasks):
                raise ValueError(f"DenseMultiTaskLoss: the balancer's tasks {list(tasks)} differ from {self.tasks}")
        else:
            self.balancer = None
            self.weights = self._check_weights(weights)

    def _check_weights(self, weights) -> dict[str, float]:
        if weights is None:
            return dict.fromkeys(self.tasks, 1.0)
        if not isinstance(weights, Mapping):
            raise TypeError(
                f"DenseMultiTaskLoss: weights must be a dict {{task: float}}, a balancer or None, got "
                f"{type(weights).__name__}"
            )
        missing, unknown = [t for t in self.tasks if t not in weights], [t for t in weights if t not in self.tasks]
        if missing or unknown:
            raise ValueError(
                f"DenseMultiTaskLoss: weights must give every task exactly: missing {missing}, unknown {unknown}; "
                f"tasks are {self.tasks}"
            )
        for t in self.tasks:
            w = weights[t]
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"DenseMultiTaskLoss: the weight of task {t!r} must be a finite number >= 0, got {w!r}"
                )
        return {t: float(weights[t]) for t in self.tasks}

    def forward(
        self, preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for name, d in (("preds", preds), ("targets", targets)):
            if not isinstance(d, Mapping):
                raise TypeError(f"DenseMultiTaskLoss: {name} must be a dict {{task: tensor}}, got {type(d).__name__}")
            missing = [t for t in self.tasks if t not in d]
            if missing:
                raise KeyError(f"DenseMultiTaskLoss: {name} lack tasks {missing}; tasks are {self.tasks}")
        unknown = [t for t in preds if t not in self.tasks]
        if unknown:
            raise KeyError(f"DenseMultiTaskLoss: predictions for unknown tasks {unknown}; tasks are {self.tasks}")
        infos, args = [], []
        for task in self.tasks:
            kind, pos_weight = TASK_KINDS[self.task_kinds[task]]
            if self.task_kinds[task] == "edge":
                pos_weight = self.edge_pos_weight
            try:
                pred, target = check_args(
                    preds[task], targets[task], kind, pos_weight, self.depth_invalid, self.upsample
                )
            except (TypeError, ValueError) as e:
                raise type(e)(f"DenseMultiTaskLoss, task {task!r}: {e}") from None
            backend = _backend.resolve(self.backend, pred.device, "dense_loss", IMPLEMENTED)
            args.append((pred, target, kind, pos_weight, backend))
            infos.append((task, kind, pred.shape[1], acc_dtype(pred.dtype)))
        stats = self._task_stats(args)
        # Every task's loss from its (sum, count, malformed) stats: with one accumulation type and
        # device, in a few ops for all the tasks (on a GPU each op is a launch), each task's
        # gradient still its own (_TaskMeans). Otherwise task by task. The counts take no gradient.
        dtypes = {dtype for *_, dtype in infos}
        if len(dtypes) == 1 and len({s.device for s in stats}) == 1:
            means, bad, *each = _TaskMeans.apply(dtypes.pop(), *stats)
            losses = dict(zip(self.tasks, each))
        else:
            means = None
            losses = {t: (s[0] / s[1].detach().clamp(min=1)).to(d) for (t, *_, d), s in zip(infos, stats)}
            bad = torch.stack([s[2].detach().cpu() for s in stats])
        if self.check_targets:
            self._raise_if_malformed(infos, bad)
        if self.balancer is not None:
            total, _ = self.balancer(losses)
        elif means is not None:
            total = (self._weight_vector(means) * means).sum()
        else:
            total = sum(self.weights[t] * losses[t] for t in self.tasks)
        return total, losses

    def _task_stats(self, args) -> list[torch.Tensor]:
        """Each task's [3] stats (dense_loss_stats).

        On the fused backends, the tasks whose predictions are full size and share a dtype and a
        device go through dense_loss_group: one launch for all of them (and one for their backward)
        where each task alone takes one of each."""
        groups: dict[tuple, list[int]] = {}
        for i, (pred, target, _, _, backend) in enumerate(args):
            group = pred.is_cuda if self.group_tasks is None else self.group_tasks
            if group and backend != "reference" and pred.shape[-2:] == target.shape[-2:]:
                groups.setdefault((backend, pred.device, pred.dtype), []).append(i)
        stats: list = [None] * len(args)
        for (backend, *_), members in groups.items():
            if len(members) < 2:
                continue
            pred, target, kind, pos_weight, _ = zip(*(args[i] for i in members))
            group = dense_loss_group_stats(
                pred, target, kind, pos_weight, self.depth_invalid, backend, self.inplace_backward
            )
            for i, st in zip(members, group):
                stats[i] = st
        for i, (pred, target, kind, pos_weight, backend) in enumerate(args):
            if stats[i] is None:
                stats[i] = dense_loss_stats(
                    pred, target, kind, pos_weight, self.depth_invalid, backend, self.inplace_backward
                )
        return stats

    def _weight_vector(self, like: torch.Tensor) -> torch.Tensor:
        """The fixed weights as a [T] tensor on like's device and dtype, cached (see fixed_vector):
        a changed `self.weights` makes a new one."""
        return fixed_vector(tuple(self.weights[t] for t in self.tasks), like.device, like.dtype)

    @staticmethod
    def _raise_if_malformed(infos, bad: torch.Tensor) -> None:
        # One read-back for all tasks; then name the first task at fault.
        if int(bad.sum()) == 0:
            return
        for (task, kind, classes, _), b in zip(infos, bad):
            try:
                raise_if_malformed(b, kind, classes)
            except ValueError as e:
                raise ValueError(f"DenseMultiTaskLoss, task {task!r}: {e}") from None

    def extra_repr(self) -> str:
        weights = type(self.balancer).__name__ if self.balancer is not None else self.weights
        return f"task_kinds={self.task_kinds}, weights={weights}, upsample={self.upsample}"
