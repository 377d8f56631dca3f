"""Gradient-level task balancing: what every such method shares (per-task gradients, Gram, combination).

A gradient-level method looks at the per-task gradients g_t of the shared part, through their Gram
matrix G[s, t] = g_s . g_t only, and writes one combination sum_t w_t g_t into the shared parameters'
.grad. GradientBalancer.backward does everything but the choice of w (`solve(G, losses)`):

1. one autograd pass per task, torch.autograd.grad(L_t, shared + task-specific leaves), through the
   shared part only as far as it has to (the shared parameters, or the shared representation z);
2. G = mtl_kernels.ops.gram(grads): the gradients are read in place, never flattened or copied;
3. w = self.solve(G, losses) on the device: a [T, T] problem, no host synchronisation;
4. mtl_kernels.ops.combine(w, grads, out=[p.grad ...], accumulate=True) (a fresh .grad where there
   is none), or, with a shared representation z, one backward of z with the combination.

Task-specific parameters (the heads) get the gradient of sum_t L_t, each exactly once: they are
found by walking the autograd graph from the losses (host-side Python over grad_fn nodes, no tensor
data, about a microsecond per node) and included as extra inputs of the per-task passes. A head
reached only by L_t gets its gradient from task t's pass, which computes it anyway on its way to the
shared part: no second pass over the heads, no second pass per task. The last task's pass frees the
graph (retain_graph=False); the saved tensors of the other heads are released with the graph when
the losses and outputs are dropped (`del out, losses` before the next forward keeps the peak at one
graph). A parameter outside shared_params that the losses reach (a trunk parameter left out) is
treated like a head: it gets the gradient of sum_t L_t.

Shared representation (MGDA-UB style, Sener and Koltun 2018): g_t = dL_t/dz, G and w from them, then
one torch.autograd.backward(z, sum_t w_t g_t): since dL_t/dtheta = (dz/dtheta)^T dL_t/dz for every
parameter theta before z, the shared parameters get exactly the gradient of sum_t w_t L_t. The heads
must consume the shared part through z only (a path around z is reported as an error).

Mixed precision: the [T, T] solve runs with autocast off, in float64. With a torch.amp.GradScaler
(constructor argument `scaler`, or backward(..., scaler=...) for one call), the losses are multiplied
by the scale S (a device tensor: scaler.scale(1.0), no sync) before autograd, and G is divided by S^2,
which is the Gram of the unscaled gradients without touching them: w does not depend on the scale.
The combination written into .grad is of the scaled gradients, so .grad stays scaled, as
GradScaler.unscale_/step expect; an inf or NaN in a gradient reaches .grad, so GradScaler.step skips
the step as usual.

Distributed data parallel (torch.distributed initialised, world size R > 1, default group): the
true gradient is the mean over ranks, so the balancer all-reduces each task's gradient tensors
(a SUM, asynchronous per tensor, then G / R^2 and weights / R, no extra pass over the tensors)
before the Gram; with a shared representation (whose gradients are per-sample, local) it all-reduces
G itself (the global Gram is sum_r G_r / R^2 for equal local batch sizes and mean losses) and then the
parameter gradients of the final backward. Losses that the method reads (MGDA's loss normalisation,
GradNorm) are averaged too, and the heads' gradients are all-reduced. The balancer does all the
communication, so the model must not be all-reduced again by DistributedDataParallel: use a plain
module (and broadcast the initial parameters), or run the forward and balancer.backward inside
`with ddp_model.no_sync():`. Every rank must build the same graph (same shared tensors and heads).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..ops.gram import flat_views
from .base import Balancer, check_losses


class GradientBalancer(Balancer):
    """Base class of gradient-level balancing: backward(losses, shared_params | shared_repr) -> weights.

    Subclasses implement solve(G, losses) -> w: G is the [T, T] float64 Gram matrix of the true
    per-task gradients (unscaled, averaged over ranks), losses the [T] float64 loss values (detached,
    averaged over ranks when the class sets needs_losses), w the [T] weights of the combination
    sum_t w_t g_t. The weights backward returns are these w: the effective coefficient of each task's
    gradient in the update of the shared part.

    scaler: an optional torch.amp.GradScaler, used by every backward call (see the module docstring).
    """

    needs_losses = False  # whether solve reads the loss values (they are then all-reduced under DDP)
    accepts_repr = True  # whether the method has a shared-representation variant

    def __init__(self, tasks: Sequence[str], scaler: torch.amp.GradScaler | None = None):
        super().__init__(tasks)
        self.scaler = check_scaler(scaler, type(self).__name__)

    def forward(self, losses: dict[str, Tensor]):
        raise RuntimeError(
            f"{type(self).__name__} balances gradients, not losses: call "
            "balancer.backward(losses, shared_params=...) (or shared_repr=...) instead of balancer(losses)"
        )

    def solve(self, G: Tensor, losses: Tensor) -> Tensor:
        """The [T] weights for the Gram matrix G ([T, T] float64) and the loss values ([T] float64)."""
        raise NotImplementedError

    def backward(
        self,
        losses: dict[str, Tensor],
        shared_params: Iterable[Tensor] | None = None,
        shared_repr: Tensor | Sequence[Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> dict[str, Tensor]:
        """Writes the balanced gradient into .grad and returns {task: weight} (detached 0-dim tensors).

        Exactly one of shared_params (the shared parameters, leaf tensors, e.g. model.backbone.parameters()) or
        shared_repr (the tensor, or list of tensors, the task heads consume) must be given.
        """
        who = type(self).__name__
        check_losses(losses, self.tasks, who)
        mode, shared = check_shared(who, shared_params, shared_repr, self.accepts_repr)
        scaler = self.scaler if scaler is None else check_scaler(scaler, who)
        loss_list = [losses[t] for t in self.tasks]
        device = loss_list[0].device
        with no_autocast(device):
            ctx = _Context(loss_list, scaler, self.needs_losses)
            if mode == "params":
                w = self._backward_params(ctx, shared)
            else:
                w = self._backward_repr(ctx, shared)
        return dict(zip(self.tasks, w.detach().unbind(0)))

    def _weights(self, ctx: _Context, G: Tensor) -> Tensor:
        w = self.solve(G.to(torch.float64), ctx.raw.to(torch.float64))
        return w.to(G.dtype)

    def _backward_params(self, ctx: _Context, shared: list[Tensor]) -> Tensor:
        others = graph_leaves(ctx.seeds, skip={id(p) for p in shared})
        grads, extra = per_task_grads(ctx.seeds, shared, others)
        grads, G = ctx.gram(grads)
        w = self._weights(ctx, G)
        write_grads(shared, w / ctx.world if ctx.world > 1 else w, grads)
        accumulate_grads(others, extra, ctx.world)
        return w

    def _backward_repr(self, ctx: _Context, reprs: list[Tensor]) -> Tensor:
        stops = {z.grad_fn for z in reprs if z.grad_fn is not None}
        ids = {id(z) for z in reprs}
        check_not_nested(type(self).__name__, reprs, stops)
        heads = graph_leaves(ctx.seeds, stop=stops, skip=ids)
        trunk = graph_leaves(reprs)
        overlap = {id(p) for p in heads} & {id(p) for p in trunk}
        if overlap:
            raise ValueError(
                f"{type(self).__name__}.backward: {len(overlap)} parameter(s) reach the losses both through "
                "shared_repr and around it; shared_repr must be everything the task heads take from the "
                "shared part (or pass shared_params instead)"
            )
        grads, extra = per_task_grads(ctx.seeds, reprs, heads)
        G = ops.gram(grads)
        if ctx.world > 1:
            all_reduce_sum([G])
            G = G / ctx.world**2
        G = ctx.unscale(G)
        w = self._weights(ctx, G)
        combined = ops.combine(w, grads)
        if ctx.world > 1:
            # Local gradient of sum_t w_t L_t^r; the mean over ranks is the global one.
            out = torch.autograd.grad(reprs, trunk, combined, allow_unused=True) if trunk else ()
            accumulate_grads(trunk, list(out), ctx.world)
        else:
            torch.autograd.backward(reprs, combined)
        accumulate_grads(heads, extra, ctx.world)
        return w


class _Context:
    """What one backward call shares: scaled losses (seeds), loss values, scale, world size."""

    def __init__(self, losses: list[Tensor], scaler, needs_losses: bool):
        device = losses[0].device
        self.world = world_size()
        self.scale = scale_tensor(scaler, device)
        self.seeds = [loss if self.scale is None else loss * self.scale for loss in losses]
        dtype = functools.reduce(torch.promote_types, [loss.dtype for loss in losses], torch.float32)
        raw = torch.stack([loss.detach().to(dtype) for loss in losses])  # a fresh tensor
        if needs_losses and self.world > 1:
            all_reduce_sum([raw])
            raw = raw / self.world
        self.raw = raw

    def gram(self, grads: list[list[Tensor]]) -> tuple[list[list[Tensor]], Tensor]:
        """(grads summed over ranks, in place where they are owned; the Gram of the unscaled gradients
        averaged over ranks). One process: grads unchanged."""
        if self.world > 1:
            grads = [[_owned(g) for g in task] for task in grads]
            all_reduce_sum([g for task in grads for g in task])
        G = self.unscale(ops.gram(grads))
        return grads, (G / self.world**2 if self.world > 1 else G)

    def unscale(self, G: Tensor) -> Tensor:
        return G if self.scale is None else G / (self.scale * self.scale).to(G.dtype)


# ----------------------------------------------------------------------------- argument checks


def check_scaler(scaler, who: str):
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"{who}: scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    return scaler


def check_shared(who: str, shared_params, shared_repr, accepts_repr: bool = True) -> tuple[str, list[Tensor]]:
    """("params" | "repr", the shared tensors as a list) after checking exactly one kind was given."""
    if (shared_params is None) == (shared_repr is None):
        got = "both" if shared_params is not None else "neither"
        raise ValueError(
            f"{who}.backward: pass exactly one of shared_params (the shared parameters, e.g. "
            f"model.backbone.parameters()) or shared_repr (the shared representation the task heads "
            f"consume); got {got}"
        )
    if shared_repr is not None and not accepts_repr:
        raise ValueError(f"{who}.backward: this method needs shared_params, it has no shared_repr variant")
    name = "shared_params" if shared_params is not None else "shared_repr"
    value = shared_params if shared_params is not None else shared_repr
    items = [value] if isinstance(value, Tensor) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(
            f"{who}.backward: {name} must be a tensor or an iterable of tensors, got {type(value).__name__}"
        )
    items = list(items)
    if not items:
        raise ValueError(f"{who}.backward: {name} is empty")
    seen = set()
    for k, x in enumerate(items):
        if not isinstance(x, Tensor):
            raise TypeError(f"{who}.backward: {name}[{k}] must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{who}.backward: {name}[{k}] must be a floating tensor, got {x.dtype}")
        if not x.requires_grad:
            hint = (
                "pass only trainable parameters, e.g. [p for p in backbone.parameters() if p.requires_grad]"
                if name == "shared_params"
                else "pass the representation as computed by the model, with autograd on and not detached"
            )
            raise ValueError(f"{who}.backward: {name}[{k}] does not require grad; {hint}")
        if name == "shared_params" and not x.is_leaf:
            # The balanced combination would go into this tensor's .grad, which no optimiser reads, and
            # the parameters it is computed from would get the plain sum of the losses' gradients.
            raise ValueError(
                f"{who}.backward: shared_params[{k}] is not a leaf tensor (it is computed by "
                f"{type(x.grad_fn).__name__}); shared_params expects the shared parameters themselves "
                "(leaf tensors, e.g. model.backbone.parameters()); to balance the gradients of an "
                "activation the task heads consume, pass it as shared_repr"
            )
        if id(x) in seen:
            raise ValueError(f"{who}.backward: {name}[{k}] appears twice")
        seen.add(id(x))
    return ("params" if name == "shared_params" else "repr"), items


# ----------------------------------------------------------------------------- helpers


def no_autocast(device: torch.device):
    """Autocast off for the block (the [T, T] solves must not run in bf16), a no-op where it is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def scale_tensor(scaler, device: torch.device) -> Tensor | None:
    """The GradScaler's current scale as a 0-dim float32 tensor on `device` (no sync), None without one."""
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler.scale(torch.ones((), dtype=torch.float32, device=device))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """In-place SUM over ranks of each tensor (contiguous, owned), all launched before any is waited on."""
    works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in tensors]
    for work in works:
        work.wait()


def graph_leaves(roots: Sequence[Tensor], stop: set | frozenset = frozenset(), skip: set | frozenset = frozenset()):
    """The leaf tensors that require grad and that the roots' autograd graph reaches, in a fixed order.

    Walks grad_fn nodes (host-side, no tensor data); does not go past the nodes in `stop`; leaves whose
    id() is in `skip` are left out. A root that is itself a leaf counts unless skipped.
    """
    leaves, found, seen = [], set(), set()
    stack = []
    for r in reversed(list(roots)):
        if r.grad_fn is not None:
            stack.append(r.grad_fn)
        elif r.requires_grad and id(r) not in skip and id(r) not in found:
            leaves.append(r)
            found.add(id(r))
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad: the leaf it writes
        if var is not None:
            if id(var) not in skip and id(var) not in found:
                leaves.append(var)
                found.add(id(var))
            continue
        for nxt, _ in reversed(node.next_functions):
            if nxt is not None:
                stack.append(nxt)
    return leaves


def check_not_nested(who: str, reprs: list[Tensor], stops: set) -> None:
    """Raises where one shared_repr tensor is computed from another: the gradient with respect to the
    inner one would then include the path through the outer one, and the final backward would count it
    twice. Walks the grad_fn nodes below each representation (host-side, no tensor data)."""
    for k, z in enumerate(reprs):
        if z.grad_fn is None:
            continue
        stack, seen = [nxt for nxt, _ in z.grad_fn.next_functions if nxt is not None], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            if node in stops:
                j = next(i for i, r in enumerate(reprs) if r.grad_fn is node)
                raise ValueError(
                    f"{who}.backward: shared_repr[{k}] is computed from shared_repr[{j}]; the tensors of "
                    "shared_repr must not depend on one another (pass the outermost ones, or shared_params)"
                )
            seen.add(node)
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


def per_task_grads(seeds: list[Tensor], shared: list[Tensor], others: list[Tensor], keep_graph: bool = False):
    """(grads, extra): grads[t][k] = dL_t/dshared[k] (zeros where unreached), extra[j] = d(sum_t L_t)/dothers[j]
    or None where no loss reaches it. One autograd pass per task; the last one frees the graph unless keep_graph."""
    live = [t for t, s in enumerate(seeds) if s.requires_grad]
    last = -1 if keep_graph or not live else live[-1]
    inputs = [*shared, *others]
    K = len(shared)
    grads: list[list[Tensor]] = []
    extra: list[Tensor | None] = [None] * len(others)
    for t, seed in enumerate(seeds):
        if not seed.requires_grad:  # a constant loss (e.g. a task without labels in this batch)
            grads.append([torch.zeros_like(x) for x in shared])  # x's layout, as autograd's gradients
            continue
        out = torch.autograd.grad(seed, inputs, retain_graph=t != last, allow_unused=True)
        grads.append([torch.zeros_like(x) if g is None else g for g, x in zip(out[:K], shared)])
        for j, g in enumerate(out[K:]):
            if g is not None:
                extra[j] = g if extra[j] is None else extra[j] + g
    return grads, extra


def _owned(g: Tensor) -> Tensor:
    """g itself when it is a plain contiguous tensor, else a contiguous copy: autograd may return an
    expanded view (e.g. of a sum's seed) that in-place reduction or accumulation must not write."""
    if g.is_contiguous() and g._base is None:
        return g
    return g.clone(memory_format=torch.contiguous_format)


def accumulate_grads(params: list[Tensor], grads: list[Tensor | None], world: int) -> None:
    """params[j].grad += grads[j] (created where missing), after the mean over ranks under DDP."""
    if world > 1:
        # Every rank reduces the same list: a parameter this rank did not reach contributes zeros.
        grads = [
            torch.zeros_like(p, memory_format=torch.contiguous_format) if g is None else _owned(g)
            for p, g in zip(params, grads)
        ]
        all_reduce_sum(grads)
        grads = [g.div_(world) for g in grads]
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = _owned(g)
            else:
                p.grad.add_(g)


def write_grads(params: list[Tensor], weights: Tensor, grads: list[list[Tensor]]) -> None:
    """p.grad (+)= sum_t weights[t] grads[t][k] for each shared parameter p = params[k], via ops.combine.

    Like autograd: accumulates into an existing .grad, creates one where there is none.
    """
    groups: dict[str, list[int]] = {"add": [], "new": [], "copy": []}
    for k, p in enumerate(params):
        if p.grad is None:
            groups["new"].append(k)
        elif p.grad.is_contiguous() or flat_views([p.grad, *(task[k] for task in grads)]) is not None:
            groups["add"].append(k)  # in place: contiguous, or one dense layout with its gradients
        else:  # a .grad whose layout its gradients do not share
            groups["copy"].append(k)
    with torch.no_grad():
        for kind, ks in groups.items():
            if not ks:
                continue
            sub = [[task[k] for k in ks] for task in grads]
            if kind == "add":
                ops.combine(weights, sub, out=[params[k].grad for k in ks], accumulate=True)
                continue
            fresh = ops.combine(weights, sub)
            for k, g in zip(ks, fresh):
                if kind == "new":
                    params[k].grad = g
                else:
                    params[k].grad.add_(g)
