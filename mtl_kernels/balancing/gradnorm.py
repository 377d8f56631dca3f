"""GradNorm: gradient normalisation for adaptive loss balancing (Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .base import check_losses
from .gradient import (
    GradientBalancer,
    _Context,
    accumulate_grads,
    check_scaler,
    check_shared,
    graph_leaves,
    no_autocast,
    per_task_grads,
)


class GradNorm(GradientBalancer):
    """GradNorm: learn loss weights w_t so that the tasks' gradient norms train at balanced rates.

    G_t = || d(w_t L_t)/dW || = w_t ||g_t|| with W the last shared layer's weights (backward takes
    shared_params=[W], or the few tensors of that layer), mean G its mean over tasks; the inverse training
    rate of a task is Ltilde_t = L_t / L_t(0) (L(0): the first step's losses, kept in the buffer
    `initial_losses`) and r_t = Ltilde_t / mean(Ltilde). The weights are pulled towards
        target_t = mean(G) * r_t^alpha     (a constant: no gradient flows through it)
    by the loss L_grad = sum_t |G_t - target_t|, whose gradient goes to the weights only; the model's
    gradients are those of sum_t w_t L_t (all parameters, one ordinary backward).

    Choices: the weights are w = T * softmax(s) with learnable logits s (parameter `logits`, initialised
    to 0, w = 1), which keeps them positive and summing to T (the paper renormalises w to sum T after
    each step instead). d L_grad / ds goes into logits.grad, accumulated like autograd: add
    balancer.parameters() to the optimiser (the paper's experiments used a separate learning rate for
    the weights, e.g. 0.025: torch.optim.Adam([{"params": model.parameters()}, {"params":
    balancer.parameters(), "lr": 0.025}])), and move the balancer with .to(device) first. Since
    G_t = w_t ||g_t||, ||g_t|| comes from the Gram diagonal of the per-task gradients of W and no
    second-order backward is needed. The weights returned (and used for this step's model gradients)
    are those before the optimiser's update. alpha = 1.5 is the paper's NYUv2 setting.
    """

    needs_losses = True
    accepts_repr = False

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, scaler: torch.amp.GradScaler | None = None):
        super().__init__(tasks, scaler)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"GradNorm: alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        T = len(self.tasks)
        self.logits = nn.Parameter(torch.zeros(T))
        # NaN: not set yet; the first backward stores its losses (on the device, no host flag to sync).
        self.register_buffer("initial_losses", torch.full((T,), math.nan))

    def task_weights(self) -> Tensor:
        """w = T softmax(logits), [T], differentiable in the logits."""
        return len(self.tasks) * torch.softmax(self.logits, dim=0)

    def backward(
        self,
        losses: dict[str, Tensor],
        shared_params: Iterable[Tensor] | None = None,
        shared_repr: Tensor | Sequence[Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> dict[str, Tensor]:
        """Model gradients of sum_t w_t L_t into .grad, d L_grad / d logits into logits.grad; returns w.

        shared_params: the last shared layer's weight(s) W, e.g. [model.backbone.layer4[-1].conv3.weight].
        """
        who = "GradNorm"
        check_losses(losses, self.tasks, who)
        _, shared = check_shared(who, shared_params, shared_repr, accepts_repr=False)
        scaler = self.scaler if scaler is None else check_scaler(scaler, who)
        loss_list = [losses[t] for t in self.tasks]
        device = loss_list[0].device
        if self.logits.device != device:
            raise ValueError(
                f"GradNorm: logits is on {self.logits.device} but the losses are on {device}; "
                "call balancer.to(device) before building the optimiser"
            )
        self._follow(device)
        with no_autocast(device):
            ctx = _Context(loss_list, scaler, needs_losses=True)
            # Per-task gradients of W only (short passes: heads and the last shared layer); the graph is
            # kept for the model's backward below.
            grads, _ = per_task_grads(ctx.seeds, shared, [], keep_graph=True)
            _, G = ctx.gram(grads)
            norms = G.diagonal().clamp_min(0).sqrt()  # ||g_t||: dL_t/dW, unscaled, mean over ranks
            L = ctx.raw.to(G.dtype)
            stored = self.initial_losses
            initial = torch.where(torch.isnan(stored), L.to(stored.dtype), stored)
            self.initial_losses.copy_(initial)
            rate = L / initial.to(G.dtype).clamp_min(torch.finfo(G.dtype).tiny)
            r = rate / rate.mean().clamp_min(torch.finfo(G.dtype).tiny)
            w = self.task_weights()
            gnorm = w.to(G.dtype) * norms
            target = (gnorm.mean() * r.pow(self.alpha)).detach()
            (d_logits,) = torch.autograd.grad((gnorm - target).abs().sum(), self.logits)
            if ctx.scale is not None:  # scaled as every .grad written here: scaler.step unscales them all
                d_logits = d_logits * ctx.scale.to(d_logits.dtype)
            if self.logits.grad is None:
                self.logits.grad = d_logits
            else:
                self.logits.grad.add_(d_logits)
            w = w.detach()
            live = [t for t, seed in enumerate(ctx.seeds) if seed.requires_grad]
            if live:
                total = sum(w[t].to(ctx.seeds[t].dtype) * ctx.seeds[t] for t in live)
                if ctx.world > 1:
                    leaves = graph_leaves([total])
                    out = torch.autograd.grad(total, leaves, allow_unused=True) if leaves else ()
                    accumulate_grads(leaves, list(out), ctx.world)
                else:
                    torch.autograd.backward(total)
        return dict(zip(self.tasks, w.unbind(0)))

    def solve(self, G: Tensor, losses: Tensor) -> Tensor:
        raise NotImplementedError("GradNorm learns its weights in backward; it has no closed-form solve")

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, alpha={self.alpha:g}"
