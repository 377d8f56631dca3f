"""The interface every task-balancing method implements, and the check of its input."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..nn.tasks import check_tasks


class Balancer(nn.Module):
    """Base class of task balancing: combines per-task losses into one total.

    forward(losses) -> (total, weights): losses is {task: 0-dim floating tensor}
    with exactly the tasks given to the constructor; total is the 0-dim tensor to
    back-propagate and weights is {task: detached 0-dim tensor}, the effective
    weight of each task (d total / d loss_t for loss-level methods), for logging.

    Everything stays on the losses' device: no .item() or other host
    synchronisation happens in forward, so a training step is never stalled by it.
    State held in buffers follows the losses' device on first use; learnable
    parameters (Uncertainty) do not: move the balancer with .to(device) before
    building the optimiser.

    Loss-level methods implement forward only. Gradient-level methods (GradNorm,
    MGDA, PCGrad) override backward, which may use the shared parameters or the
    shared representation to combine per-task gradients.
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.tasks: list[str] = check_tasks(tasks, type(self).__name__)

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(
        self,
        losses: dict[str, Tensor],
        shared_params: Sequence[Tensor] | None = None,
        shared_repr: Tensor | Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Back-propagates the balanced total and returns the weights.

        Loss-level default: total, w = self(losses); total.backward(). The extra
        arguments are for gradient-level methods and ignored here.
        """
        total, weights = self(losses)
        total.backward()
        return weights

    def epoch_end(self) -> None:
        """Called once at the end of every training epoch; a no-op unless the method keeps epoch statistics."""

    def stack_losses(self, losses: dict[str, Tensor]) -> Tensor:
        """The losses as one [T] tensor in the order of self.tasks, after check_losses."""
        check_losses(losses, self.tasks, type(self).__name__)
        # stack promotes mixed dtypes (e.g. an fp16 and an fp32 loss) to a common one.
        return torch.stack([losses[t] for t in self.tasks])

    def _follow(self, device: torch.device) -> None:
        # Buffers (running statistics) move to where the losses are, once; a no-op afterwards.
        for name, buf in list(self.named_buffers(recurse=False)):
            if buf.device != device:
                setattr(self, name, buf.to(device))

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


def check_losses(losses, tasks: Sequence[str], who: str = "Balancer") -> None:
    """Checks that losses is {task: 0-dim floating tensor} with exactly `tasks`, all on one device.

    Only metadata is read (keys, shapes, dtypes, devices): no host synchronisation.
    """
    if not isinstance(losses, dict):
        raise TypeError(f"{who}: losses must be a dict {{task: 0-dim loss tensor}}, got {type(losses).__name__}")
    missing = [t for t in tasks if t not in losses]
    unknown = [t for t in losses if t not in tasks]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing tasks {missing}")
        if unknown:
            parts.append(f"unknown tasks {unknown}")
        raise ValueError(f"{who}: losses has {' and '.join(parts)}; the valid tasks are {list(tasks)}")
    device = None
    for t in tasks:
        loss = losses[t]
        if not isinstance(loss, Tensor):
            raise TypeError(f"{who}: losses[{t!r}] must be a 0-dim floating tensor, got {type(loss).__name__}")
        if loss.dim() != 0 or not loss.is_floating_point():
            raise ValueError(
                f"{who}: losses[{t!r}] must be a 0-dim floating tensor, "
                f"got shape {tuple(loss.shape)} and dtype {loss.dtype} (reduce it to a scalar, e.g. .mean())"
            )
        if device is None:
            device = (t, loss.device)
        elif loss.device != device[1]:
            raise ValueError(
                f"{who}: all losses must be on one device: losses[{device[0]!r}] is on {device[1]}, "
                f"losses[{t!r}] on {loss.device}"
            )


def as_rank0_drew(t: Tensor) -> Tensor:
    """t, overwritten with rank 0's t under torch.distributed (default group, world size > 1).

    Random draws (RLW's weights, PCGrad's order) must agree across ranks, or the ranks would weight
    their shards differently and training would not equal one process on the union of the batches;
    users often seed each rank differently (seed + rank for augmentation), so each method draws
    and then takes rank 0's draw: one broadcast of T or T x T numbers per step.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)
    return t
