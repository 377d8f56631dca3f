"""Task-balancing benchmark: one whole training step (forward, balanced backward, optimiser) of a
shared-encoder multi-task network, per method, against equal weighting and a peer-style MGDA.

    python benchmarks/balancing.py [--quick] [--no-save] [--device cpu|cuda]

The network: a shared convolutional encoder and T one-layer heads with L2 losses. GPU: an encoder
of about ResNet-50's size (27.5M parameters), B=8 at 128 x 128; CPU: a 1.7M-parameter encoder
(1,699,648), B=4 at 64 x 64 (a 2-core machine). Each row times forward + balancer step + SGD step
("forward" mode: the harness does no autograd of its own).
impls
  ew       mk.balancing.EW: total.backward()
  mgda, pcgrad, cagrad, imtlg, nash, aligned, upgrad
           mk.balancing.<Method>.backward(losses, shared_params=encoder parameters): T autograd
           passes, gram, a [T, T] solve on the device, combine into .grad
  mgda_ub, pcgrad_ub, cagrad_ub
           the same methods with shared_repr=the encoder's output (MGDA-UB style): T autograd passes
           through the heads only, gram of the representation's gradients, one backward through the encoder
  peer     MGDA as peer libraries implement it: per-task gradients flattened into copies
           (torch.cat), their dot products read back to the host, Frank-Wolfe in numpy, the
           combination built from the flat copies and copied back into .grad
T in {2, 3, 5}; fp32. --quick: T=3 only.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mtl_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch import nn

import mtl_kernels as mk
from benchmarks import harness

OP = "balancing_step"
METHODS = {
    "mgda": "MGDA",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "imtlg": "IMTLG",
    "nash": "NashMTL",
    "aligned": "AlignedMTL",
    "upgrad": "UPGrad",
}


class Net(nn.Module):
    def __init__(self, T: int, widths: tuple[int, ...]):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1) for _ in range(T))

    def forward(self, x):
        z = self.encoder(x)
        return z, [h(z) for h in self.heads]


def peer_mgda_step(losses, shared, heads):
    """Per-task gradients flattened into copies, their dot products read back to the host one by one,
    Frank-Wolfe min-norm in numpy, the combination built from the flat copies and copied back."""
    per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    grads = [torch.cat([g.reshape(-1) for g in task]) for task in per_task]
    G = np.array([[float(a @ b) for b in grads] for a in grads])
    T = len(grads)
    w = np.full(T, 1.0 / T)
    for _ in range(50):
        t = int(np.argmin(G @ w))
        v1, v2 = w @ G @ w, G[t, t]
        v12 = w @ G[:, t]
        gamma = 1.0 if v12 >= v1 else (0.0 if v12 >= v2 else (v2 - v12) / (v1 + v2 - 2 * v12))
        w = (1 - gamma) * w
        w[t] += gamma
    flat = sum(float(w[t]) * grads[t] for t in range(T))
    offset = 0
    for p in shared:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    for p, g in zip(heads, torch.autograd.grad(sum(losses), heads)):  # the heads' own gradients
        p.grad = g


def make_cases(T, device, impls, big):
    torch.manual_seed(0)
    widths = (64, 128, 256, 512, 512, 1024, 1024, 1024) if big else (64, 128, 128, 256, 256, 256)
    B, H = (8, 128) if big else (4, 64)
    net = Net(T, widths).to(device)
    x = torch.randn(B, 3, H, H, device=device)
    ys = [torch.randn(B, 1, H, H, device=device) for _ in range(T)]
    shared = list(net.encoder.parameters())
    tasks = [f"task{t}" for t in range(T)]
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    params = {"T": T, "B": B, "H": H, "W": H, "params": sum(p.numel() for p in shared)}
    # leaves: the parameters, so that their last .grad is cleared before the peak memory's baseline
    leaves = list(net.parameters())
    common = dict(op=OP, params=params, dtype=torch.float32, device=device, leaves=leaves, bytes_moved={"forward": 0})

    def losses_now():
        z, preds = net(x)
        return z, [((p - y) ** 2).mean() for p, y in zip(preds, ys)]

    for impl in impls:
        if impl == "peer":

            def step():
                opt.zero_grad(set_to_none=True)
                peer_mgda_step(losses_now()[1], shared, list(net.heads.parameters()))
                opt.step()
                return []

        else:
            method = impl.removesuffix("_ub")
            balancer = mk.balancing.EW(tasks) if impl == "ew" else getattr(mk.balancing, METHODS[method])(tasks)

            def step(balancer=balancer, impl=impl):
                opt.zero_grad(set_to_none=True)
                z, losses = losses_now()
                losses = dict(zip(tasks, losses))
                if impl == "ew":
                    balancer.backward(losses)
                elif impl.endswith("_ub"):
                    balancer.backward(losses, shared_repr=z)
                else:
                    balancer.backward(losses, shared_params=shared)
                opt.step()
                return []

        yield harness.Case(impl=impl, forward=step, **common)


def run(device: torch.device, quick: bool = False, impls: list[str] | None = None) -> list[dict]:
    all_impls = ["ew", *METHODS, "mgda_ub", "pcgrad_ub", "cagrad_ub", "peer"]
    impls = [i for i in all_impls if impls is None or i in impls]
    Ts = (3,) if quick else (2, 3, 5)
    settings = harness.Settings.default(device, quick)
    print(f"{OP}: impls {impls}, device {harness.device_name(device)}", flush=True)
    rows = []
    for T in Ts:
        cases = list(make_cases(T, device, impls, big=device.type == "cuda"))
        print(f"  {','.join(c.impl for c in cases)} T={T}", flush=True)
        rows += harness.run_cases(cases, settings, modes=("forward",))
        del cases
        harness.release(device)
    return rows


def main(argv=None) -> list[dict]:
    return harness.main(argv, __doc__, OP, run, quick_help="T=3 only")


if __name__ == "__main__":
    main()
