"""Dense multi-task loss benchmark: forward+backward of the total loss of a batch.

    python benchmarks/dense_loss.py [--quick] [--no-save] [--device cpu|cuda]

impls
  eager    the survey code's losses (mtl_kernels.reference.dense_loss.survey_loss: log_softmax
           + NLLLoss, masked_select L1, normalise + masked_select L1, its balanced BCE), weighted
  compile  torch.compile of DenseMultiTaskLoss(backend="reference") (static shapes, no
           masked_select; check_targets=False, whose read-back would break the graph)
  cpu/cuda/triton  DenseMultiTaskLoss(backend=...), targets unchecked as in compile (the check
           reads a count back to the host, a synchronisation a like-for-like row leaves out)
  <backend>+inplace  the same with inplace_backward=True (one prediction-sized tensor less)
  <backend>+grouped / <backend>+per-task  group_tasks=True / False, the one that is not the
           default on that device (the default groups the full-size tasks into one launch of
           dense_loss_group on a GPU, and runs one launch per task on the CPU)

Task sets, with the survey's weights:
  nyud    semseg (40 classes) 1, depth 1, normals 10, edge 50 at 480 x 640 targets; predictions
          at full resolution, and at quarter resolution (120 x 160, upsampled bilinearly first)
  pascal  semseg (21) 1, human_parts (7) 2, sal 5, normals 10, edge 50 at 512 x 512
B = 8 on GPU; B = 2 on CPU (this 2-core machine takes seconds per eager step at B = 8).
fp32 and bf16 predictions (targets fp32, labels int64). --quick: nyud full resolution, fp32.

Bytes moved (the loss kernels' minimum at target resolution, N prediction elements of size s,
targets counted once): forward reads N*s and the targets and writes the kept gradient N*s;
backward reads and writes it, 2*N*s; both the sum.
"""

from __future__ import annotations

import gc
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mtl_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from benchmarks import harness
from mtl_kernels import available_backends
from mtl_kernels.nn import DenseMultiTaskLoss
from mtl_kernels.nn.loss import TASK_KINDS
from mtl_kernels.reference.dense_loss import survey_loss

OP = "dense_loss"
TASK_SETS = {
    "nyud": ({"semseg": 40, "depth": 1, "normals": 3, "edge": 1}, (480, 640)),
    "pascal": ({"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}, (512, 512)),
}
WEIGHTS = {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0, "human_parts": 2.0, "sal": 5.0}


def fused_backends(device: torch.device, available: list[str]) -> list[str]:
    wanted = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    return [b for b in wanted if b in available]


def make_batch(tasks: dict, B: int, size, pred_size, dtype, device, gen):
    """Predictions (leaves) and targets like the survey's data: 255 holes, unit normals, sparse edges."""
    H, W = size
    preds, targets = {}, {}
    for task, C in tasks.items():
        preds[task] = (torch.randn(B, C, *pred_size, generator=gen) * 2).to(device, dtype).requires_grad_()
        hole = torch.rand(B, 1, H, W, generator=gen) < 0.1
        if task in ("semseg", "human_parts"):
            t = torch.randint(0, C, (B, 1, H, W), generator=gen).float().masked_fill(hole, 255)
        elif task == "depth":
            t = (torch.rand(B, 1, H, W, generator=gen) * 10).masked_fill(hole, 255)
        elif task == "normals":
            t = F.normalize(torch.randn(B, 3, H, W, generator=gen), dim=1).masked_fill(hole, 255)
        else:  # edge, sal
            t = (torch.rand(B, 1, H, W, generator=gen) < (0.05 if task == "edge" else 0.3)).float()
        targets[task] = t.to(device)
    return preds, targets


def bytes_moved(tasks: dict, B: int, size, dtype) -> dict[str, int]:
    H, W = size
    s = torch.empty((), dtype=dtype).element_size()
    n = B * H * W * sum(tasks.values()) * s
    labels = B * H * W * sum(8 if TASK_KINDS[t][0] == "cross_entropy" else 4 * C for t, C in tasks.items())
    return {"forward": 2 * n + labels, "backward": 2 * n, "both": 4 * n + labels}


def make_cases(name, res, B, dtype, device, impls):
    tasks, size = TASK_SETS[name]
    pred_size = size if res == "full" else (size[0] // 4, size[1] // 4)
    gen = torch.Generator().manual_seed(0)
    preds, targets = make_batch(tasks, B, size, pred_size, dtype, device, gen)
    weights = {t: WEIGHTS[t] for t in tasks}
    params = {"tasks": name, "B": B, "H": size[0], "W": size[1], "pred": res}
    common = dict(op=OP, params=params, dtype=dtype, device=device, bytes_moved=bytes_moved(tasks, B, size, dtype))
    leaves = list(preds.values())

    def survey_total():
        total = 0
        for t, p in preds.items():
            if p.shape[-2:] != targets[t].shape[-2:]:
                p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
            kind, pos_weight = TASK_KINDS[t]
            total = total + weights[t] * survey_loss(p, targets[t], kind, pos_weight)
        return [total]

    def module_total(module):
        def forward():
            return [module(preds, targets)[0]]

        return forward

    for impl in impls:
        if impl == "eager":
            yield harness.Case(impl=impl, forward=survey_total, leaves=leaves, **common)
        elif impl == "compile":
            ref = DenseMultiTaskLoss(list(tasks), weights, upsample=True, check_targets=False, backend="reference")
            compiled = harness.compile_reference(ref)
            yield harness.Case(impl=impl, forward=module_total(compiled), leaves=leaves, compiled=True, **common)
        else:
            backend, _, variant = impl.partition("+")
            # Targets unchecked, as in the compile case: the check reads a count back to the host.
            fused = DenseMultiTaskLoss(
                list(tasks),
                weights,
                upsample=True,
                check_targets=False,
                inplace_backward=variant == "inplace",
                group_tasks={"grouped": True, "per-task": False}.get(variant),
                backend=backend,
            )
            yield harness.Case(impl=impl, forward=module_total(fused), leaves=leaves, **common)
        gc.collect()


def run(device: torch.device, quick: bool = False, impls: list[str] | None = None) -> list[dict]:
    available = available_backends()
    fused = fused_backends(device, available)
    other = "grouped" if device.type == "cpu" else "per-task"  # the non-default grouping
    all_impls = ["eager", "compile", *fused, *(f"{b}+inplace" for b in fused), *(f"{b}+{other}" for b in fused)]
    impls = [i for i in all_impls if impls is None or i in impls]
    B = 8 if device.type == "cuda" else 2
    configs = [("nyud", "full")] if quick else [("nyud", "full"), ("nyud", "quarter"), ("pascal", "full")]
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    settings = harness.Settings.default(device, quick)
    print(f"{OP}: impls {impls} (backends available: {available}), device {harness.device_name(device)}", flush=True)
    rows = []
    for dtype in dtypes:
        for name, res in configs:
            cases = list(make_cases(name, res, B, dtype, device, impls))
            print(
                f"  {','.join(c.impl for c in cases)} {name} {res} B={B} {str(dtype).removeprefix('torch.')}",
                flush=True,
            )
            rows += harness.run_cases(cases, settings)
            del cases
            harness.release(device)
    return rows


def main(argv=None) -> list[dict]:
    return harness.main(argv, __doc__, OP, run, quick_help="nyud at full resolution, fp32 only")


if __name__ == "__main__":
    main()
