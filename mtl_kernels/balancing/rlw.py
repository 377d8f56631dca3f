"""Random loss weighting (Lin, Ye, Xu, Shi and Zhang, TMLR 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Balancer, as_rank0_drew


class RLW(Balancer):
    """Random loss weighting: w = softmax(z), z ~ N(0, I_T) drawn anew at every forward; total = sum_t w_t L_t.

    Random weights act as a regulariser that, in expectation, treats the tasks
    equally while keeping the optimiser from settling on one task's trade-off.
    The weights sum to 1. generator: an optional torch.Generator for
    reproducible draws; one on the losses' device avoids a host-to-device copy
    each step (a CPU generator also works with CUDA losses). Under
    torch.distributed every rank uses rank 0's draw, whatever its own seed.
    """

    def __init__(self, tasks: Sequence[str], generator: torch.Generator | None = None):
        super().__init__(tasks)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"RLW: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        L = self.stack_losses(losses)
        dtype = torch.promote_types(L.dtype, torch.float32)
        T = len(self.tasks)
        g = self.generator
        if g is None or g.device == L.device:
            z = torch.randn(T, generator=g, device=L.device, dtype=dtype)
        else:
            z = torch.randn(T, generator=g, device=g.device, dtype=dtype).to(L.device)
        w = torch.softmax(as_rank0_drew(z), dim=0)
        return (w * L).sum(), dict(zip(self.tasks, w.unbind(0)))
