"""mtl_kernels.train: configs, a short training run on Scenes that lowers the loss, exact resume, DDP, errors."""

import glob
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mtl_kernels.train import ConfigError, Trainer, build_config, load_config
from mtl_kernels.train.__main__ import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "mtl_kernels", "configs", "*", "*.yaml")))


def tiny(tmp_path, **over):
    """A config small enough for a few seconds of training on 2 cores."""
    raw = {
        "name": "tiny",
        "output_root": str(tmp_path / "runs"),
        "model": {"name": "multi_task", "backbone": "resnet18"},
        "data": {
            "dataset": "scenes",
            "root": str(tmp_path / "cache"),
            "tasks": ["semseg", "depth", "normals", "edge"],
            "size": [64, 80],
            "train_length": 8,
            "val_length": 4,
            "batch_size": 4,
        },
        "optimizer": {"lr": 1e-3},
        "epochs": 2,
        "num_images": 2,
    }
    for key, value in over.items():
        node, *path = key.split("__")
        target = raw
        for k in [node, *path][:-1]:
            target = target.setdefault(k, {})
        target[[node, *path][-1]] = value
    return build_config(raw)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg["model"]["name"] and cfg["data"]["tasks"]


def test_configs_cover_every_model_and_dataset():
    from mtl_kernels.models import MODELS

    names = {os.path.relpath(p, os.path.join(ROOT, "mtl_kernels", "configs")) for p in CONFIGS}
    for dataset in ("scenes", "nyud", "pascal"):
        for model in MODELS:
            assert f"{dataset}/{model}.yaml" in names


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"name": "x", "model": {"name": "multi_task"}, "data": {"tasks": ["semseg"]}, "epochs": 0}, "epochs"),
        ({"name": "x", "model": {"name": "multi_task"}, "data": {"tasks": ["semseg"]}, "optimzer": {}}, "optimzer"),
        ({"name": "x", "model": {"name": "multi_task"}, "data": {"tasks": "semseg"}}, "data.tasks"),
        ({"name": "x", "model": {"name": "multi_task"}}, "data"),
        ({"name": "x", "model": {"name": "multi_task"}, "data": {"tasks": ["depth"], "dataset": "nyud"}}, "data.root"),
        ({"name": "x", "model": {"name": "multi_task"}, "data": {"tasks": ["depth"]}, "amp": "fp8"}, "amp"),
        ({"name": "x", "model": {"name": "multi_task"}, "data": {"tasks": ["depth"], "size": [64]}}, "data.size"),
        (
            {"name": "x", "model": {"name": "multi_task", "memory_format": "nhwc"}, "data": {"tasks": ["depth"]}},
            "model.memory_format",
        ),
        # a batch of one: the ASPP pooling branch's BatchNorm sees one value per channel
        (
            {"name": "x", "model": {"name": "multi_task"}, "data": {"tasks": ["depth"], "batch_size": 1}},
            r"data.batch_size must be >= 2 for training.*image-pooling.*survey's code has the same limit",
        ),
        (
            {
                "name": "x",
                "model": {"name": "jtrl"},
                "data": {"tasks": ["semseg", "depth"], "dataset": "pascal", "root": "/d"},
            },
            r"tasks of the pascal dataset \['semseg', 'human_parts', 'normals', 'sal', 'edge'\]; it has no \['depth'\]",
        ),
        (
            {
                "name": "x",
                "model": {"name": "pad_net", "auxiliary_tasks": ["sal"]},
                "data": {"tasks": ["depth"], "dataset": "nyud", "root": "/d"},
            },
            r"it has no \['sal'\]",
        ),
        (
            {"name": "x", "model": {"name": "pad_net", "auxiliary_tasks": "edge"}, "data": {"tasks": ["depth"]}},
            "model.auxiliary_tasks must be a list",
        ),
    ],
)
def test_a_broken_config_names_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        build_config(raw)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert cli_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(ConfigError, match="shipped configs: .*nyud/mti_net"):
        load_config("nyud/no_such_model")


@pytest.mark.parametrize("name", ["nyud/mti_net", "nyud/mti_net.yaml", "configs/nyud/mti_net.yaml"])
def test_shipped_configs_by_name(name):
    """The configs ship inside the package (a wheel install has them too) and load by name, or by
    the path they had in a clone; a file of that name in the working directory comes first."""
    from mtl_kernels.train.config import CONFIG_DIR, packaged_configs, resolve_config

    assert resolve_config(name) == os.path.join(CONFIG_DIR, "nyud", "mti_net.yaml")
    assert load_config(name)["model"]["name"] == "mti_net"
    assert len(packaged_configs()) == len(CONFIGS)


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nyud").mkdir()
    (tmp_path / "nyud" / "mti_net.yaml").write_text(open(CONFIGS[0]).read())
    from mtl_kernels.train.config import resolve_config

    assert resolve_config("nyud/mti_net.yaml") == "nyud/mti_net.yaml"


def test_overrides(tmp_path):
    path = os.path.join(ROOT, "mtl_kernels", "configs", "scenes", "multi_task.yaml")
    cfg = load_config(path, ["optimizer.lr=0.01", "data.tasks=[depth]", "epochs=3"])
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["data"]["tasks"] == ["depth"] and cfg["epochs"] == 3
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["epochs"])


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="valid models"):
        Trainer(tiny(tmp_path, model__name="nope"), progress=False)
    with pytest.raises(ConfigError, match="balancing.method"):
        Trainer(tiny(tmp_path, balancing__method="Magic"), progress=False)
    with pytest.raises(ConfigError, match="shared backbone"):
        Trainer(tiny(tmp_path, model__name="cross_stitch", balancing__method="MGDA"), progress=False).fit()


def test_a_missing_dataset_directory_is_a_clear_error(tmp_path):
    cfg = tiny(tmp_path, data__dataset="nyud", data__root=str(tmp_path / "nowhere"))
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        Trainer(cfg, progress=False)


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path):
    cfg = tiny(tmp_path, epochs=4, data__train_length=16)
    results = Trainer(cfg, progress=False).fit()
    losses = [r["train_loss"]["total"] for r in results["history"]]
    assert losses[-1] < losses[0]
    run = tmp_path / "runs" / "tiny"
    for name in ("results.json", "last.pt", "best.pt", "loss_curves.png", "predictions.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "results.json").read_text())
    assert saved["best_metrics"]["semseg"]["mIoU"] >= 0
    assert set(saved["best_metrics"]) >= {"semseg", "depth", "normals", "edge"}


def test_best_checkpoint_is_a_second_name_that_keeps_its_epoch(tmp_path):
    from mtl_kernels.train.checkpoint import link_atomic, save_atomic

    last, best = str(tmp_path / "last.pt"), str(tmp_path / "best.pt")
    save_atomic({"epoch": 1}, last)
    link_atomic(last, best)
    assert os.stat(last).st_ino == os.stat(best).st_ino  # no second copy on disk
    save_atomic({"epoch": 2}, last)  # the next epoch replaces last.pt; best.pt keeps epoch 1
    assert torch.load(best)["epoch"] == 1 and torch.load(last)["epoch"] == 2
    link_atomic(last, best)  # a better epoch replaces best.pt in turn
    assert torch.load(best)["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temporary left behind


@pytest.mark.cuda
def test_rng_state_restores_from_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    # Trainer.load maps the checkpoint onto its device; the generators take CPU tensors only.
    from mtl_kernels.train.checkpoint import rng_state, save_atomic, set_rng_state

    state = rng_state()
    save_atomic(state, str(tmp_path / "rng.pt"))
    want = torch.rand(3, device="cuda")
    set_rng_state(torch.load(tmp_path / "rng.pt", map_location="cuda", weights_only=False))
    assert torch.equal(torch.rand(3, device="cuda"), want)


def test_resume_reaches_the_same_state(tmp_path):
    full = Trainer(tiny(tmp_path, name="full", epochs=3), progress=False)
    full.fit()
    part = Trainer(tiny(tmp_path, name="part", epochs=3), progress=False)
    part.fit(until=2)  # interrupted after epoch 2
    resumed = Trainer(tiny(tmp_path, name="part", epochs=3), resume=True, progress=False)
    assert resumed.epoch == 2
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert full.history[-1]["train_loss"] == resumed.history[-1]["train_loss"]


def test_dtp_gets_kpis_from_each_evaluation(tmp_path):
    trainer = Trainer(tiny(tmp_path, epochs=1, balancing__method="DTP"), progress=False)
    assert torch.isnan(trainer.balancer.kpi).all()  # weight 1 until a KPI arrives
    results = trainer.fit()
    val = results["history"][-1]["val"]
    kpi = dict(zip(trainer.balancer.tasks, trainer.balancer.kpi.tolist()))
    assert kpi["semseg"] == pytest.approx(val["semseg"]["mIoU"])
    assert kpi["depth"] == pytest.approx(math.exp(-val["depth"]["rmse"]))
    assert kpi["normals"] == pytest.approx(max(math.cos(math.radians(val["normals"]["mean"])), 0.0))
    assert kpi["edge"] == pytest.approx(val["edge"]["odsF"])
    _, weights = trainer.balancer({t: torch.tensor(1.0) for t in trainer.balancer.tasks})
    assert any(float(w) != 1.0 for w in weights.values())


@pytest.mark.parametrize("method", ["Uncertainty", "DWA", "MGDA", "PCGrad"])
def test_balancing_methods_train(tmp_path, method):
    results = Trainer(tiny(tmp_path, epochs=1, balancing__method=method), progress=False).fit()
    assert all(torch.isfinite(torch.tensor(v)) for v in results["history"][-1]["train_loss"].values())


@pytest.mark.parametrize("method", [None, "MGDA"])  # loss level; gradient level (unscales before the Gram)
def test_fp16_amp_with_grad_scaler(tmp_path, method):
    over = {"balancing__method": method} if method else {}
    # fp16 convolutions are slow on the CPU: the smallest run that steps the scaler
    cfg = tiny(tmp_path, epochs=1, amp="fp16", data__train_length=8, data__val_length=2, num_images=1, **over)
    trainer = Trainer(cfg, progress=False)
    assert trainer.scaler.is_enabled()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    results = trainer.fit()
    # 2 steps: the scaler may skip the first (an overflow at its initial 2^16), not all
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    losses = results["history"][-1]["train_loss"]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert 0 < trainer.scaler.get_scale() <= 2.0**16  # it scaled, and its state is live
    saved = torch.load(tmp_path / "runs" / "tiny" / "last.pt", weights_only=False)
    assert saved["scaler"]["scale"] == trainer.scaler.get_scale()


# loss level on NDDR-CNN; gradient level on MTAN (its backbone's NHWC .grad: combine's copy path)
@pytest.mark.parametrize("model, method", [("nddr_cnn", None), ("mtan", "MGDA")])
def test_channels_last_training(tmp_path, model, method):
    over = {"balancing__method": method} if method else {}
    cfg = tiny(tmp_path, epochs=1, model__memory_format="channels_last", model__name=model, **over)
    trainer = Trainer(cfg, progress=False)
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    results = trainer.fit()
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()) if a.dim() == 4)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # the optimiser kept NHWC
    losses = results["history"][-1]["train_loss"]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_deep_supervision_model_and_soft_sharing_learning_rate(tmp_path):
    cfg = tiny(
        tmp_path,
        epochs=1,
        model__name="pad_net",
        model__backbone="resnet18",
        data__tasks=["semseg", "depth"],
        model__auxiliary_tasks=["normals", "edge"],
    )
    results = Trainer(cfg, progress=False).fit()
    assert any("/" in k for k in results["history"][0]["train_loss"])  # the auxiliary tasks' intermediate losses
    cs = Trainer(tiny(tmp_path, model__name="cross_stitch", optimizer__name="sgd"), progress=False)
    lrs = sorted(g["lr"] for g in cs.optimizer.param_groups)
    assert lrs == [pytest.approx(1e-3), pytest.approx(0.1)]


def test_delta_m_against_single_task_metrics(tmp_path):
    single = {"semseg": {"mIoU": 0.5}, "depth": {"rmse": 1.0}, "normals": {"mean": 30.0}, "edge": {"odsF": 0.5}}
    results = Trainer(tiny(tmp_path, epochs=1, single_task_metrics=single), progress=False).fit()
    assert isinstance(results["best_metrics"]["delta_m"], float)


# ----------------------------------------------------------------------------- distributed


def _ddp_worker(rank, port, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    if trainer.balancer is not None:
        torch.save(trainer.balancer.state_dict(), os.path.join(out, f"balancer{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("method, epochs", [(None, 1), ("MGDA", 1), ("Uncertainty", 1), ("DWA", 3), ("DTP", 1)])
def test_ddp_two_processes_on_gloo(tmp_path, method, epochs):
    cfg = tiny(tmp_path, epochs=epochs, data__batch_size=2, device="cpu", balancing__method=method)
    Trainer(cfg, progress=False)  # generates the Scenes cache once, before the processes race for it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, cfg, str(tmp_path)), nprocs=2, join=True)
    saved = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert saved["epochs"] == epochs and saved["best_metrics"] is not None
    if method is not None:  # the balancer's state (Uncertainty's log-variances, DWA's weights) is the ranks' own
        states = [torch.load(tmp_path / f"balancer{r}.pt") for r in range(2)]
        for k, v in states[0].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(states[1][k], v, rtol=0, atol=0, msg=k)
        if method == "DWA":
            assert not torch.equal(states[0]["weight"], torch.ones_like(states[0]["weight"]))


def test_preset_weights_reach_the_auxiliary_tasks(tmp_path):
    cfg = tiny(
        tmp_path,
        model__name="pad_net",
        model__backbone="resnet18",
        data__tasks=["semseg", "depth"],
        model__auxiliary_tasks=["normals", "edge"],
        loss__weights="nyud",
    )
    trainer = Trainer(cfg, progress=False)
    assert trainer.weights == {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}
    with pytest.raises(ConfigError, match="every task"):
        Trainer(tiny(tmp_path, loss__weights={"semseg": 1.0}), progress=False)
