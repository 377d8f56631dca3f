"""Edge metric benchmark: the boundary matching of mk.metrics.EdgeMeter, compiled (cpu) against
scipy's Hopcroft-Karp (reference), on line-shaped boundaries.

    python benchmarks/edge_metric.py [--quick] [--thin]

The case: a 480 x 640 boundary map of horizontal and vertical lines (every 40 and 50 pixels,
the layered graphs on which scipy's matching can take exponential time, scipy issue 26147)
and a prediction of those lines blurred over 7 x 7 plus uniform noise of amplitude 0.05 and
0.5 (an untrained network's edge map is mostly noise), 99 thresholds, maxDist 0.0075. Prints
seconds per image for each backend and checks that both give the same counts. With --thin, the
thinned (BSDS-style) evaluation too. Not in run_all: a timing of a metric, not of a kernel;
rows are printed, not saved.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_kernels import available_backends
from mtl_kernels.metrics import edge_counts


def case(noise: float, H: int = 480, W: int = 640) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    gt = torch.zeros(H, W)
    gt[::40, :] = 1
    gt[:, ::50] = 1
    blurred = torch.nn.functional.avg_pool2d(gt[None, None], 7, 1, 3)[0, 0] * 3
    return (blurred + noise * torch.rand(H, W, generator=gen)).clamp(0, 1), gt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="noise 0.5 only")
    p.add_argument("--thin", action="store_true", help="also thin=True")
    args = p.parse_args(argv)
    backends = [b for b in ("cpu", "reference") if b in available_backends()]
    print(f"edge metric: 480 x 640 line boundaries, 99 thresholds; backends {backends}")
    print(f"{'noise':>6} {'thin':>5} " + " ".join(f"{b + ' s':>12}" for b in backends) + f" {'x reference':>12}")
    for noise in (0.5,) if args.quick else (0.05, 0.5):
        pred, gt = case(noise)
        for thin in (False, True) if args.thin else (False,):
            secs, counts = {}, {}
            for b in backends:
                t = time.perf_counter()
                counts[b] = edge_counts(pred, gt, 99, thin_pred=thin, backend=b)
                secs[b] = time.perf_counter() - t
            if len(backends) == 2 and not np.array_equal(counts["cpu"], counts["reference"]):
                raise SystemExit("edge metric: the backends' counts differ")
            ratio = secs["reference"] / secs["cpu"] if len(backends) == 2 else float("nan")
            print(f"{noise:>6} {thin!s:>5} " + " ".join(f"{secs[b]:>12.2f}" for b in backends) + f" {ratio:>12.1f}")


if __name__ == "__main__":
    main()
