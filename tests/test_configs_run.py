"""Every shipped config runs: its model, built as the trainer builds it, takes a batch of 2 at the config's
own data size forward and backward. The Scenes configs take one real training step on the CPU (the
engine's: rendered images, forward, fused losses with deep supervision, backward, optimiser step); the
NYUD and PASCAL ones (no dataset here, and full-size images far too slow for the CPU) run forward and
backward on the meta device at full width, which checks every shape at the config's size and computes
nothing. test_train.py only parses the configs."""

import pytest
import torch

from mtl_kernels import data, models
from mtl_kernels.models import DEEP_SUPERVISION
from mtl_kernels.train import Trainer, load_config
from mtl_kernels.train.config import packaged_configs

SCENES = [n for n in packaged_configs() if n.startswith("scenes/")]
FULL_SIZE = [n for n in packaged_configs() if not n.startswith("scenes/")]
DATASETS = {"nyud": data.NYUD, "pascal": data.PASCALContext}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: small tensors on a loaded 2-core machine (see test_models.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("scenes")  # one Scenes cache for all the configs


def test_every_shipped_config_is_covered():
    assert len(SCENES) == len(FULL_SIZE) // 2 == len(models.MODELS)


@pytest.mark.parametrize("name", SCENES)
def test_scenes_config_takes_a_training_step(name, tmp_path, cache):
    overrides = [
        "data.batch_size=2",
        "data.train_length=2",
        "data.val_length=2",
        "device=cpu",
        f"output_root={tmp_path}",
        f"data.root={cache}",
    ]
    cfg = load_config(name, overrides)
    trainer = Trainer(cfg, progress=False)
    trainer.model.train()
    batch = next(iter(trainer.loader(trainer.train_set, train=True)))
    assert tuple(batch["image"].shape) == (2, 3, *cfg["data"]["size"])
    logs = trainer.train_step(batch)
    assert all(torch.isfinite(v) for v in logs.values()), logs
    assert set(cfg["data"]["tasks"]) <= set(logs)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_config_runs_on_the_meta_device(name):
    cfg = load_config(name)
    m, d = cfg["model"], cfg["data"]
    with torch.device("meta"):
        model = models.build(
            m["name"],
            d["tasks"],
            m["backbone"],
            num_classes=DATASETS[d["dataset"]].num_classes,
            auxiliary_tasks=m["auxiliary_tasks"],
            backend=m["backend"],
            memory_format=m["memory_format"],
            **(m["kwargs"] or {}),
        )
        x = torch.randn(2, 3, *d["size"]).contiguous(memory_format=models.MEMORY_FORMATS[m["memory_format"]])
    out = model(x)
    finals = {t: y for t, y in out.items() if t != DEEP_SUPERVISION}
    assert list(finals) == d["tasks"]
    assert all(tuple(y.shape[-2:]) == tuple(d["size"]) for y in finals.values())
    deep = [y for preds in out.get(DEEP_SUPERVISION, {}).values() for y in preds.values()]
    sum(y.mean() for y in [*finals.values(), *deep]).backward()
    assert all(p.grad is not None for p in model.parameters())
