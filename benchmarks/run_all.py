"""Runs every benchmark and prints its table.

    python benchmarks/run_all.py [--quick] [--no-save] [--device cpu|cuda]
    python -m benchmarks [...]                       (the same)

Each module in BENCHMARKS has main(argv) taking these options.
"""

from __future__ import annotations

import importlib
import os
import sys

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BENCHMARKS = ["cross_stitch", "nddr", "distillation", "dense_loss", "gram", "balancing", "models"]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    for name in BENCHMARKS:
        importlib.import_module(f"benchmarks.{name}").main(argv)


if __name__ == "__main__":
    main()
