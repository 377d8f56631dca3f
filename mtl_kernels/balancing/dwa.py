"""Dynamic weight average (Liu, Johns and Davison, CVPR 2019: MTAN)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Balancer


class DWA(Balancer):
    """Dynamic weight average: w_t = T softmax_t(r / temperature), r_t = Lbar_t(e-1) / Lbar_t(e-2).

    Lbar_t(e) is task t's loss averaged over the steps of epoch e. A task whose
    loss fell less over the last epoch (larger r_t) learns slower and gets a
    larger weight; the weights sum to T. They are all 1 until two epochs are
    finished. total = sum_t w_t L_t.

    forward adds the (detached) losses to the epoch's running sum while the
    balancer is in training mode, so call balancer.eval() for validation (or
    register it as a submodule of the model); epoch_end() closes the epoch and
    computes the weights used for the whole next epoch.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ValueError(f"DWA: temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        T = len(self.tasks)
        # Running statistics live on the losses' device, so no step has to wait for the host.
        self.register_buffer("loss_sum", torch.zeros(T))
        self.register_buffer("history", torch.zeros(2, T))  # mean losses of epochs e-2 and e-1
        self.register_buffer("weight", torch.ones(T))
        # Counters are host-side ints, known without a sync; saved through get_extra_state.
        self.steps = 0  # forward calls in training mode this epoch
        self.epochs = 0  # epochs finished

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        L = self.stack_losses(losses)
        self._follow(L.device)
        if self.training:
            self.loss_sum += L.detach().to(self.loss_sum.dtype)
            self.steps += 1
        w = self.weight.to(torch.promote_types(L.dtype, self.weight.dtype))
        return (w * L).sum(), dict(zip(self.tasks, w.unbind(0)))

    def epoch_end(self) -> None:
        if self.steps == 0:
            raise RuntimeError(
                "DWA.epoch_end: no training step since the last epoch_end; "
                "call the balancer on every training step's losses (in training mode) before epoch_end"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Under DDP each rank saw its own shard: the weights come from the mean over all ranks.
            dist.all_reduce(self.loss_sum)
            self.loss_sum.div_(dist.get_world_size())
        mean = self.loss_sum / self.steps
        self.history.copy_(torch.stack([self.history[1], mean]))
        self.epochs += 1
        if self.epochs >= 2:
            # Clamp the denominator: a loss that reached exactly 0 would give inf / NaN weights.
            r = self.history[1] / self.history[0].clamp_min(torch.finfo(self.history.dtype).tiny)
            self.weight.copy_(len(self.tasks) * torch.softmax(r / self.temperature, dim=0))
        self.loss_sum.zero_()
        self.steps = 0

    def get_extra_state(self) -> Any:
        return {"steps": self.steps, "epochs": self.epochs}

    def set_extra_state(self, state: Any) -> None:
        self.steps = int(state["steps"])
        self.epochs = int(state["epochs"])

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, temperature={self.temperature:g}"
