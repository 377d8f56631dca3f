"""python -m mtl_kernels.train --config scenes/multi_task [--set key.path=value ...] [--resume]

Single process, or one per device under torchrun (torchrun --nproc_per_node=2 -m mtl_kernels.train ...).
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config
from .engine import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtl_kernels.train", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", required=True, help="a YAML file, or a shipped config by name: <dataset>/<model>, e.g. nyud/mti_net"
    )
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. epochs=2 optimizer.lr=1e-3"
    )
    p.add_argument("--resume", action="store_true", help="continue from <output_root>/<name>/last.pt if present")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        results = train(cfg, resume=args.resume, progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"best_epoch": results["best_epoch"], "best_metrics": results["best_metrics"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
