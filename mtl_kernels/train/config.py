"""Training configuration: a YAML file, or a shipped mtl_kernels/configs/<dataset>/<model>.yaml by name,
read into a checked, nested dict with defaults.

Every key a config may have is in DEFAULTS; an unknown key, a wrong type or a missing required value is a
ConfigError naming the key path (e.g. "optimizer.lr") and what was expected. Overrides from the command
line use the same paths: `--set optimizer.lr=1e-3 epochs=2`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import yaml

from ..data import NYUD_TASKS, PASCAL_TASKS, SCENES_TASKS


class ConfigError(ValueError):
    """A config file or override that cannot be used: the message names the key and what was expected."""


REQUIRED = object()  # marks a key without default

DEFAULTS: dict[str, Any] = {
    "name": REQUIRED,  # run name: the output directory is <output_root>/<name>
    "output_root": "runs",
    "seed": 0,
    "model": {
        "name": REQUIRED,  # a name of mtl_kernels.models.MODELS
        "backbone": None,  # None: the model's default
        "auxiliary_tasks": None,  # pad_net, mti_net: tasks predicted for deep supervision and distillation
        "backend": None,  # fused modules' backend (None: auto); "reference" runs plain PyTorch
        "pretrained": False,
        "memory_format": "contiguous",  # contiguous (NCHW) | channels_last (NHWC: ~10% faster steps on the CPU)
        "kwargs": {},  # the model's own options (alpha, beta, channels, backbone_kwargs, ...)
    },
    "data": {
        "dataset": "scenes",  # scenes | nyud | pascal
        "root": None,  # nyud, pascal: the dataset directory; scenes: the cache directory (None: default)
        "tasks": REQUIRED,  # the tasks trained and evaluated
        "size": [64, 80],  # H, W of the training crops (scenes: of the rendered images)
        "train_length": 256,  # scenes: images in the train split
        "val_length": 64,  # scenes: images in the val split
        "batch_size": 8,
        "num_workers": 0,
        "augment": True,  # the survey's flips, scales and rotations (real datasets)
    },
    "loss": {
        "weights": "ew",  # ew | nyud | pascal (the survey's presets) | {task: weight}
        "deep_supervision": True,  # PAD-Net / MTI-Net: the intermediate predictions' losses are added
        "backend": None,  # the fused loss's backend
    },
    # Task balancing: method is a class name of mtl_kernels.balancing (None: the fixed loss weights above);
    # loss-level methods (Uncertainty, DWA, ...) replace the weights, gradient-level ones (MGDA, PCGrad, ...)
    # balance the gradients of the model's shared backbone.
    "balancing": {"method": None, "kwargs": {}},
    "optimizer": {
        "name": "adam",  # adam | sgd
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "momentum": 0.9,  # sgd
        "nesterov": False,  # sgd
        "soft_sharing_lr_multiplier": 100.0,  # cross-stitch and NDDR parameters (the survey's 100x)
    },
    "scheduler": {"name": "poly", "power": 0.9},  # poly (per epoch, as the survey) | step | constant
    "epochs": 10,
    "eval_every": 1,  # epochs between evaluations (and the last epoch always)
    "amp": "none",  # none | bf16 | fp16 (fp16 with a GradScaler)
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "single_task_metrics": None,  # {task: {metric: value}} or a results.json path, for Delta_m
    "tensorboard": False,
    "max_steps_per_epoch": None,  # limit (for smoke runs)
    "num_images": 4,  # images in the prediction grid
}

# The targets each dataset has: a task outside them could never be trained or evaluated.
DATASET_TASKS = {"scenes": SCENES_TASKS, "nyud": NYUD_TASKS, "pascal": PASCAL_TASKS}

CHOICES = {
    ("data", "dataset"): ("scenes", "nyud", "pascal"),
    ("optimizer", "name"): ("adam", "sgd"),
    ("scheduler", "name"): ("poly", "step", "constant"),
    ("amp",): ("none", "bf16", "fp16"),
    ("model", "memory_format"): ("contiguous", "channels_last"),
}


def _merge(defaults: Mapping, given: Mapping, path: str) -> dict:
    if not isinstance(given, Mapping):
        raise ConfigError(f"config: {path or 'the top level'} must be a mapping, got {type(given).__name__}")
    out = {}
    for key in given:
        if key not in defaults:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"config: unknown key {where!r}; valid keys here are {sorted(defaults)}")
    for key, default in defaults.items():
        where = f"{path}.{key}" if path else key
        if key in given:
            value = given[key]
            if isinstance(default, dict) and default and key != "kwargs":
                value = _merge(default, value if value is not None else {}, where)
        elif default is REQUIRED:
            raise ConfigError(f"config: missing required key {where!r}")
        else:
            value = copy.deepcopy(default)
        out[key] = value
    return out


def _check(cfg: dict) -> dict:
    for path, choices in CHOICES.items():
        value = cfg
        for key in path:
            value = value[key]
        if value not in choices:
            raise ConfigError(f"config: {'.'.join(path)} must be one of {list(choices)}, got {value!r}")
    tasks = cfg["data"]["tasks"]
    if isinstance(tasks, str) or not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"config: data.tasks must be a non-empty list of task names, got {tasks!r}")
    size = cfg["data"]["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ConfigError(f"config: data.size must be [H, W] of positive ints, got {size!r}")
    for key in ("epochs", "eval_every"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"config: {key} must be an int >= 1, got {cfg[key]!r}")
    for key in ("batch_size", "train_length", "val_length"):
        if not isinstance(cfg["data"][key], int) or cfg["data"][key] < 1:
            raise ConfigError(f"config: data.{key} must be an int >= 1, got {cfg['data'][key]!r}")
    if cfg["data"]["batch_size"] < 2:
        raise ConfigError(
            "config: data.batch_size must be >= 2 for training, got 1: BatchNorm in training mode normalises "
            "each channel over the batch, and the DeepLab-v3 head's image-pooling branch (ASPP) has one value "
            "per channel and image, so a batch of one cannot be normalised (PyTorch's 'Expected more than 1 "
            "value per channel when training'); the survey's code has the same limit. Under torchrun it is "
            "the batch of each process."
        )
    auxiliary = cfg["model"]["auxiliary_tasks"]
    if auxiliary is not None and not isinstance(auxiliary, list):
        raise ConfigError(f"config: model.auxiliary_tasks must be a list of task names or null, got {auxiliary!r}")
    available = DATASET_TASKS[cfg["data"]["dataset"]]
    wanted = [*tasks, *(auxiliary or [])]
    missing = [t for t in wanted if t not in available]
    if missing:
        raise ConfigError(
            f"config: data.tasks and model.auxiliary_tasks must be tasks of the {cfg['data']['dataset']} "
            f"dataset {list(available)}; it has no {missing}"
        )
    lr = cfg["optimizer"]["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"config: optimizer.lr must be a positive number, got {lr!r}")
    if cfg["data"]["dataset"] != "scenes" and not cfg["data"]["root"]:
        raise ConfigError(f"config: data.root must give the {cfg['data']['dataset']} dataset's directory")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optimizer.lr=1e-3' -> (['optimizer', 'lr'], 0.001): the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def build_config(raw: Mapping, overrides: list[str] = ()) -> dict:
    """The checked config from a mapping (a parsed YAML file) and `key.path=value` overrides."""
    raw = copy.deepcopy(dict(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a mapping")
        node[path[-1]] = value
    return _check(_merge(DEFAULTS, raw, ""))


# The configs shipped with the package, for every model and dataset: <dataset>/<model>.yaml.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_configs() -> list[str]:
    """The names of the shipped configs, e.g. "nyud/mti_net"."""
    names = []
    for dataset in sorted(os.listdir(CONFIG_DIR)):
        folder = os.path.join(CONFIG_DIR, dataset)
        if os.path.isdir(folder):
            names += [f"{dataset}/{f.removesuffix('.yaml')}" for f in sorted(os.listdir(folder)) if f.endswith(".yaml")]
    return names


def resolve_config(path: str | os.PathLike) -> str:
    """A config file's path: `path` itself if it is a file, else the shipped config it names
    ("nyud/mti_net", "nyud/mti_net.yaml" or "configs/nyud/mti_net.yaml", as from a clone)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    name = path.replace(os.sep, "/").removeprefix("./").removeprefix("configs/").removesuffix(".yaml")
    shipped = os.path.join(CONFIG_DIR, *name.split("/")) + ".yaml"
    if name in packaged_configs() and os.path.isfile(shipped):
        return shipped
    names = ", ".join(packaged_configs())
    raise ConfigError(f"config file {path!r} does not exist, and it names none of the shipped configs: {names}")


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """Reads a YAML config file, or a shipped config by name (see resolve_config); a missing file
    or bad YAML is a ConfigError naming the file."""
    path = resolve_config(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    try:
        return build_config(raw if raw is not None else {}, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
