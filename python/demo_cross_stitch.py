"""A user's workflow: take a model written with the survey code's cross-stitch
units, swap in the fused modules with mtl_kernels.convert, check that it
computes the same thing, then time both on this machine.

    python python/demo_cross_stitch.py            # demonstration + quick benchmark
    python python/demo_cross_stitch.py --no-bench # demonstration only
"""

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

import mtl_kernels as mk
from mtl_kernels.reference import CrossStitchUnit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CrossStitchNet(nn.Module):
    """Survey-style soft sharing: one small conv stack per task, a cross-stitch unit after every stage."""

    def __init__(self, tasks, channels=(16, 32, 64)):
        super().__init__()
        self.tasks = tasks
        stages, stitches, c_in = [], [], 3
        for c in channels:
            stages.append(
                nn.ModuleDict(
                    {
                        t: nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU())
                        for t in tasks
                    }
                )
            )
            stitches.append(CrossStitchUnit(tasks, c, alpha=0.9, beta=0.1))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.cross_stitch = nn.ModuleList(stitches)

    def forward(self, image):
        feats = {t: image for t in self.tasks}
        for stage, stitch in zip(self.stages, self.cross_stitch):
            feats = stitch({t: stage[t](feats[t]) for t in self.tasks})
        return feats


def step_time(model, image, reps=5):
    def step():
        out = model(image)
        sum(o.float().mean() for o in out.values()).backward()

    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tasks = ["semseg", "depth", "normals"]
    survey = CrossStitchNet(tasks)
    fused = mk.convert(copy.deepcopy(survey))
    n_units = sum(isinstance(m, mk.nn.CrossStitch) for m in fused.modules())
    print(f"backends available here: {mk.available_backends()}")
    print(f"converted {n_units} CrossStitchUnit modules to mk.nn.CrossStitch")

    image = torch.randn(4, 3, 96, 128)
    out_survey, out_fused = survey(image), fused(image)
    worst = max((out_fused[t] - out_survey[t]).abs().max().item() for t in tasks)
    print(f"largest difference between fused and survey outputs: {worst:.2e}")
    if worst > 1e-4:
        sys.exit("fused and survey outputs differ")

    print(
        f"training step (fwd+bwd, B=4, 96x128): survey {step_time(survey, image):.1f} ms, "
        f"fused {step_time(fused, image):.1f} ms"
    )
    if not args.no_bench:
        sys.path.insert(0, ROOT)
        from benchmarks import cross_stitch as bench

        bench.main(["--quick", "--no-save"])


if __name__ == "__main__":
    main()
