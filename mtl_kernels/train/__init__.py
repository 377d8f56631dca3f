"""Training and evaluation: mk.train.train(load_config(path)) or `python -m mtl_kernels.train --config ...`."""

from .config import DEFAULTS, ConfigError, build_config, load_config
from .engine import Trainer, train

__all__ = ["DEFAULTS", "ConfigError", "Trainer", "build_config", "load_config", "train"]
