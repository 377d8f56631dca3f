"""The training and evaluation engine: Trainer(config).fit() -> results.

One epoch: the training loader in a fixed order drawn from (seed, epoch), forward under the config's
autocast, the fused DenseMultiTaskLoss (plus the intermediate predictions' losses for PAD-Net and MTI-Net),
the loss weighting or the gradient balancing, the optimiser step; then, every eval_every epochs, the
metrics on the validation split and Delta_m against the single-task metrics when given, which selects the
best model. Checkpoints (last.pt, best.pt) are written atomically after every epoch and carry everything a
resume needs (model, optimiser, scheduler, balancer, GradScaler, random state, history): an interrupted run
resumed with resume=True ends in the same state as an uninterrupted one.

Distributed (torchrun sets WORLD_SIZE > 1): one process per device, a DistributedSampler per split, the
model in DistributedDataParallel; with a gradient-level balancer the model stays a plain module (the
balancer averages the per-task gradients across ranks itself) and its buffers are broadcast from rank 0
before evaluation. Rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from .. import balancing, data, metrics, models
from .. import nn as mknn
from ..models import DEEP_SUPERVISION
from .checkpoint import link_atomic, rng_state, save_atomic, seed_everything, set_rng_state
from .config import ConfigError

GRADIENT_METHODS = ("GradNorm", "MGDA", "PCGrad", "CAGrad", "IMTLG", "NashMTL", "AlignedMTL", "UPGrad")
LOSS_METHODS = ("EW", "Fixed", "Uncertainty", "DWA", "DTP", "GLS", "RLW")


# ----------------------------------------------------------------------------- building blocks


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config: device {name!r} asked for, but torch sees no CUDA device")
    return device


def make_datasets(cfg: dict):
    """(train, val) datasets of the config's kind, with every task the model's losses need."""
    d = cfg["data"]
    tasks = list(dict.fromkeys([*d["tasks"], *(cfg["model"]["auxiliary_tasks"] or [])]))
    if d["dataset"] == "scenes":
        kw = dict(size=tuple(d["size"]), tasks=tasks, root=d["root"], seed=cfg["seed"])
        return data.Scenes("train", length=d["train_length"], **kw), data.Scenes("val", length=d["val_length"], **kw)
    cls = data.NYUD if d["dataset"] == "nyud" else data.PASCALContext
    train_tf = data.train_transform(tuple(d["size"])) if d["augment"] else data.eval_transform(tuple(d["size"]))
    return (
        cls(d["root"], "train", tasks=tasks, transform=train_tf),
        cls(d["root"], "val", tasks=tasks, transform=data.eval_transform(tuple(d["size"]))),
    )


def loss_weights(cfg: dict, tasks: list[str], auxiliary: list[str] = ()):
    """The loss's fixed weights for the tasks and the auxiliary (deep-supervision only) tasks: None (all 1),
    a preset of the survey (its weight, or 1 for a task it does not list), or the config's dict (a weight for
    every task; auxiliary tasks it leaves out get 1)."""
    w = cfg["loss"]["weights"]
    everything = list(dict.fromkeys([*tasks, *auxiliary]))
    if w == "ew":
        return None
    if isinstance(w, str):
        if w not in balancing.PRESETS:
            raise ConfigError(f"config: loss.weights must be 'ew', one of {sorted(balancing.PRESETS)} or a dict")
        table = balancing.PRESETS[w]
        return {t: float(table.get(t, 1.0)) for t in everything}
    if not isinstance(w, dict) or set(w) - set(everything) or set(tasks) - set(w):
        raise ConfigError(
            f"config: loss.weights as a dict must give a weight for every task of {tasks} (and may for the "
            f"auxiliary tasks {[t for t in everything if t not in tasks]}), got {w}"
        )
    return {t: float(w.get(t, 1.0)) for t in everything}


def make_balancer(cfg: dict, tasks: list[str]):
    method = cfg["balancing"]["method"]
    if method is None:
        return None
    if method not in (*GRADIENT_METHODS, *LOSS_METHODS):
        raise ConfigError(
            f"config: balancing.method {method!r} is unknown; valid: {[*LOSS_METHODS, *GRADIENT_METHODS]} or null"
        )
    kwargs = dict(cfg["balancing"]["kwargs"] or {})
    if method == "Fixed":
        return balancing.Fixed(kwargs.get("weights") or loss_weights(cfg, tasks) or {t: 1.0 for t in tasks})
    return getattr(balancing, method)(tasks, **kwargs)


def shared_parameters(model: nn.Module, last_layer_only: bool = False) -> list[nn.Parameter]:
    """The parameters every task's loss reaches through: the model's shared backbone (gradient balancing)."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module) or isinstance(backbone, nn.ModuleDict):  # ModuleDict: one per task
        raise ConfigError(
            f"gradient-level balancing needs a model with one shared backbone; {type(model).__name__} has none "
            "(use a loss-level method, or the multi_task, mtan, pad_net or mti_net models)"
        )
    params = [p for p in backbone.parameters() if p.requires_grad]
    if last_layer_only:  # GradNorm: the last shared layer's weight
        weights = [m.weight for m in backbone.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]
        params = [w for w in weights if w.dim() >= 2][-1:]
    return params


def soft_sharing_parameters(model: nn.Module) -> set[int]:
    """ids of the cross-stitch and NDDR parameters (the survey trains them with a 100x learning rate)."""
    ids = set()
    for m in model.modules():
        if isinstance(m, (mknn.CrossStitch, mknn.NDDR)) or type(m).__name__ in ("CrossStitchUnit", "NDDRLayer"):
            ids.update(id(p) for p in m.parameters())
    return ids


def make_optimizer(cfg: dict, model: nn.Module, extra: list[nn.Parameter]):
    o = cfg["optimizer"]
    soft = soft_sharing_parameters(model)
    base = [p for p in model.parameters() if id(p) not in soft]
    groups = [{"params": base + extra}]
    if soft:
        groups.append(
            {
                "params": [p for p in model.parameters() if id(p) in soft],
                "lr": o["lr"] * o["soft_sharing_lr_multiplier"],
            }
        )
    if o["name"] == "adam":
        return torch.optim.Adam(groups, lr=o["lr"], weight_decay=o["weight_decay"])
    return torch.optim.SGD(
        groups, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"], nesterov=o["nesterov"]
    )


def make_scheduler(cfg: dict, optimizer):
    s, epochs = cfg["scheduler"], cfg["epochs"]
    if s["name"] == "poly":  # the survey's: lr * (1 - epoch / epochs) ^ 0.9, stepped once per epoch
        rule: Callable[[int], float] = lambda e: (1 - e / epochs) ** s.get("power", 0.9)  # noqa: E731
    elif s["name"] == "step":
        rule = lambda e: 0.1 ** (e // max(1, int(s.get("step_size", max(1, epochs // 3)))))  # noqa: E731
    else:
        rule = lambda e: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)


def split_outputs(out: dict, tasks: list[str]):
    """(final {task: pred}, {stage: {task: pred}} of the deep supervision, possibly empty)."""
    return {t: out[t] for t in tasks}, out.get(DEEP_SUPERVISION, {}) or {}


def dataset_classes(dataset) -> dict[str, int]:
    """{semseg: classes, human_parts: parts} as the dataset declares them."""
    out = {}
    if getattr(dataset, "num_classes", None) is not None:
        out["semseg"] = int(dataset.num_classes)
    if getattr(dataset, "num_parts", None) is not None:
        out["human_parts"] = int(dataset.num_parts)
    return out


def collate_targets(batch: dict, tasks: list[str], device) -> dict[str, torch.Tensor]:
    return {t: batch[t].to(device, non_blocking=True) for t in tasks if t in batch}


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds everything from a checked config (mtl_kernels.train.config) and trains: fit() -> results."""

    def __init__(self, cfg: dict, *, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and cfg["device"] != "cpu" else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        if self.world > 1 and torch.cuda.is_available() and cfg["device"] in ("auto", "cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = pick_device(cfg["device"])
        self.progress = progress and self.rank == 0
        self.out_dir = os.path.join(cfg["output_root"], cfg["name"])
        self.tasks = list(cfg["data"]["tasks"])
        seed_everything(cfg["seed"])

        self.train_set, self.val_set = make_datasets(cfg)
        m = cfg["model"]
        self.model = models.build(
            m["name"],
            self.tasks,
            m["backbone"],
            num_classes=dataset_classes(self.train_set),
            auxiliary_tasks=m["auxiliary_tasks"],
            backend=m["backend"],
            pretrained=m["pretrained"],
            memory_format=m["memory_format"],
            **(m["kwargs"] or {}),
        ).to(self.device)
        self.memory_format = models.MEMORY_FORMATS[m["memory_format"]]  # a checked config value
        self.balancer = make_balancer(cfg, self.tasks)
        if self.balancer is not None:
            self.balancer.to(self.device)
        self.gradient_level = isinstance(self.balancer, balancing.GradientBalancer)
        self.target_tasks = list(dict.fromkeys([*self.tasks, *(m["auxiliary_tasks"] or [])]))
        self.weights = loss_weights(cfg, self.tasks, self.target_tasks)
        if self.balancer is not None and not self.gradient_level:
            main_weights = self.balancer
        else:
            main_weights = None if self.weights is None else {t: self.weights[t] for t in self.tasks}
        self.loss = mknn.DenseMultiTaskLoss(self.tasks, main_weights, backend=cfg["loss"]["backend"]).to(self.device)
        self._deep_losses: dict[tuple[str, ...], nn.Module] = {}

        extra = [p for p in self.balancer.parameters()] if self.balancer is not None else []
        self.optimizer = make_optimizer(cfg, self.model, extra)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg["amp"] == "fp16")
        self.net = self.model
        if self.world > 1:
            self._broadcast_state()
            if not self.gradient_level:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.epoch = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.writer = self._tensorboard() if cfg["tensorboard"] and self.rank == 0 else None
        if resume and os.path.isfile(self.path("last.pt")):
            self.load(self.path("last.pt"))

    # ---------------------------------------------------------------- helpers

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "config: tensorboard: true needs the tensorboard package (pip install tensorboard)"
            ) from None
        return SummaryWriter(self.path("tensorboard"))

    def _broadcast_state(self) -> None:
        """Rank 0's parameters and buffers on every rank (the start, and buffers before evaluation)."""
        with torch.no_grad():
            for t in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(t, 0)

    def _average_balancer_grads(self) -> None:
        """A loss-level balancer's parameters (Uncertainty's log-variances) sit outside the DDP
        module: their gradients are averaged here, as DDP averages the model's, so every rank
        takes the same step."""
        for p in self.balancer.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def autocast(self):
        if self.cfg["amp"] == "none":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.cfg["amp"] == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def loader(self, dataset, train: bool) -> DataLoader:
        d = self.cfg["data"]
        if self.world > 1 and train:
            sampler = DistributedSampler(dataset, shuffle=True, seed=self.cfg["seed"], drop_last=True)
            sampler.set_epoch(self.epoch)
        elif train:  # a fixed order per (seed, epoch): the resume replays it
            gen = torch.Generator().manual_seed(self.cfg["seed"] * 100003 + self.epoch)
            sampler = RandomSampler(dataset, generator=gen)
        else:
            sampler = SequentialSampler(dataset)
        return DataLoader(
            dataset,
            batch_size=d["batch_size"],
            sampler=sampler,
            num_workers=d["num_workers"],
            drop_last=train,
            pin_memory=self.device.type == "cuda",
        )

    # ---------------------------------------------------------------- one step

    def deep_loss(self, tasks: tuple[str, ...]) -> nn.Module:
        """The loss of one stage of intermediate predictions (at the features' resolution: upsampled inside
        the fused loss), each task with its final prediction's weight (1 for auxiliary tasks)."""
        if tasks not in self._deep_losses:
            w = None if self.weights is None else {t: self.weights[t] for t in tasks}
            loss = mknn.DenseMultiTaskLoss(list(tasks), w, upsample=True, backend=self.cfg["loss"]["backend"])
            self._deep_losses[tasks] = loss.to(self.device)
        return self._deep_losses[tasks]

    def compute_losses(self, batch: dict):
        """(total, {task: loss}) of one batch: the final predictions' and the deep supervision's
        (keys "<stage>/<task>" for auxiliary tasks' intermediate predictions)."""
        image = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        targets = collate_targets(batch, self.target_tasks, self.device)
        with self.autocast():
            out = self.net(image)
        final, deep = split_outputs(out, self.tasks)
        # No .float() copies: the fused loss reads bf16 / fp16 logits and accumulates in fp32 itself.
        total, parts = self.loss(final, targets)
        if self.cfg["loss"]["deep_supervision"]:
            for stage, preds in deep.items():
                stage_total, stage_parts = self.deep_loss(tuple(preds))(preds, targets)
                total = total + stage_total
                for t, v in stage_parts.items():
                    if t in parts:  # each task's deep supervision goes with its own loss (gradient balancing)
                        parts[t] = parts[t] + v
                    else:
                        parts[f"{stage}/{t}"] = v
        return total, parts

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        total, parts = self.compute_losses(batch)
        if self.gradient_level:
            task_losses = {t: parts[t] for t in self.tasks}
            extra = [v for k, v in parts.items() if k not in task_losses]  # auxiliary tasks' deep supervision
            if extra:  # they train the shared part too: add them to the first task's loss
                first = self.tasks[0]
                task_losses[first] = task_losses[first] + sum(extra)
            shared = shared_parameters(self.model, last_layer_only=isinstance(self.balancer, balancing.GradNorm))
            self.balancer.backward(
                task_losses, shared_params=shared, scaler=self.scaler if self.scaler.is_enabled() else None
            )
        else:
            self.scaler.scale(total).backward()
            if self.world > 1 and self.balancer is not None:
                self._average_balancer_grads()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"total": total.detach(), **{t: v.detach() for t, v in parts.items()}}

    # ---------------------------------------------------------------- epochs

    def train_epoch(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        self.model.train()
        if self.balancer is not None:
            self.balancer.train()
        torch.manual_seed(self.cfg["seed"] * 7919 + self.epoch)  # augmentation and dropout: replayed on resume
        loader = self.loader(self.train_set, train=True)
        limit = self.cfg["max_steps_per_epoch"]
        sums: dict[str, torch.Tensor] = {}
        n = 0
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.cfg['epochs']}", disable=not self.progress, leave=False)
        for i, batch in enumerate(bar):
            if limit is not None and i >= limit:
                break
            logs = self.train_step(batch)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v.float()
            n += 1
        bar.close()
        if n == 0:
            raise ConfigError(
                f"config: the training split has {len(self.train_set)} images, fewer than one batch of "
                f"{self.cfg['data']['batch_size']}"
            )
        means = {k: float(v) / n for k, v in sums.items()}  # one host synchronisation per epoch
        if self.world > 1:
            vals = torch.tensor(list(means.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(vals)
            means = dict(zip(means, (vals / self.world).tolist()))
        if self.balancer is not None:
            self.balancer.epoch_end()
        self.scheduler.step()
        return means

    @torch.no_grad()
    def evaluate(self, dataset=None) -> dict:
        """{task: {metric: value}} on the validation split (or `dataset`), plus "delta_m" when the
        single-task metrics are known."""
        self.model.eval()
        meter = metrics.MultiTaskMetrics(self.tasks, **self.metric_kwargs())
        for batch in self.loader(dataset or self.val_set, train=False):
            image = batch["image"].to(self.device).contiguous(memory_format=self.memory_format)
            with self.autocast():
                out = self.model(image)
            final, _ = split_outputs(out, self.tasks)
            meter.update({t: p.float() for t, p in final.items()}, collate_targets(batch, self.tasks, self.device))
        result = meter.compute()
        single = self.single_task_metrics()
        if single is not None:
            result["delta_m"] = metrics.delta_m(result, single)
        return result

    def metric_kwargs(self) -> dict:
        """MultiTaskMetrics arguments: the dataset's class counts, NYUD's edge tolerance, logits for sal / edge."""
        classes = dataset_classes(self.train_set)
        kwargs = {"logits": True}  # the models' sal and edge outputs are logits
        if "semseg" in classes:
            kwargs["num_classes"] = classes["semseg"]
        if "human_parts" in self.tasks and "human_parts" in classes:
            kwargs["human_parts"] = {"num_classes": classes["human_parts"]}
        if self.cfg["data"]["dataset"] == "nyud":
            kwargs["edge_tolerance"] = metrics.MAX_DIST_NYUD
        return kwargs

    def _update_kpis(self, val: dict | None) -> None:
        """DTP's KPIs from the validation metrics (rank 0's; every rank gets its moving average):
        mIoU, maxF and odsF as they are; depth exp(-rmse in metres); normals the cosine of the mean
        angular error (clamped at 0)."""
        if val is not None:
            kpis = {}
            for t in self.tasks:
                name, higher_is_better = metrics.MAIN_METRIC[t]
                v = float(val[t][name])
                if higher_is_better:
                    kpis[t] = min(max(v, 0.0), 1.0)
                elif t == "normals":
                    kpis[t] = max(math.cos(math.radians(v)), 0.0)
                else:
                    kpis[t] = math.exp(-v)
            self.balancer.update_kpis(kpis)
        if self.world > 1:
            dist.broadcast(self.balancer.kpi, 0)

    def single_task_metrics(self):
        ref = self.cfg["single_task_metrics"]
        if isinstance(ref, str):
            if not os.path.isfile(ref):
                raise ConfigError(f"config: single_task_metrics file {ref!r} does not exist")
            with open(ref) as f:
                ref = json.load(f).get("best_metrics")
        return ref

    def fit(self, until: int | None = None) -> dict:
        """Trains the remaining epochs (up to epoch `until`, as if interrupted there; default all), evaluating
        every eval_every; writes results.json, plots and checkpoints."""
        cfg = self.cfg
        t0 = time.perf_counter()
        end = cfg["epochs"] if until is None else min(until, cfg["epochs"])
        while self.epoch < end:
            losses = self.train_epoch()
            self.epoch += 1
            record = {"epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"], "train_loss": losses}
            if self.epoch % cfg["eval_every"] == 0 or self.epoch == cfg["epochs"]:
                if self.world > 1 and self.gradient_level:  # a plain module: rank 0's BN statistics everywhere
                    self._broadcast_state()
                if self.rank == 0:
                    record["val"] = self.evaluate()
                if isinstance(self.balancer, balancing.DTP):
                    self._update_kpis(record.get("val"))
                if self.world > 1:
                    dist.barrier()
            self.history.append(record)
            if self.rank == 0:
                self.log(record)
                better = "val" in record and self.is_better(record["val"])
                if better:
                    self.best = {"epoch": self.epoch, "metrics": record["val"]}
                self.save(self.path("last.pt"))
                if better:  # the same state: a second name for last.pt, not a second write
                    link_atomic(self.path("last.pt"), self.path("best.pt"))
        results = self.results(time.perf_counter() - t0)
        if self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(self.path("results.json"), "w") as f:
                json.dump(results, f, indent=1)
            from .plots import plot_loss_curves, plot_predictions

            plot_loss_curves(self.history, self.path("loss_curves.png"))
            plot_predictions(self, self.path("predictions.png"))
        if self.writer is not None:
            self.writer.close()
        return results

    def is_better(self, val: dict) -> bool:
        """Model selection: the higher Delta_m when the single-task metrics are known, else the latest."""
        if self.best is None or "delta_m" not in val or "delta_m" not in self.best["metrics"]:
            return True
        return val["delta_m"] > self.best["metrics"]["delta_m"]

    def log(self, record: dict) -> None:
        parts = [f"epoch {record['epoch']}/{self.cfg['epochs']}", f"loss {record['train_loss']['total']:.4f}"]
        if "val" in record:
            for t in self.tasks:
                name, _ = metrics.MAIN_METRIC[t]
                parts.append(f"{t} {name} {record['val'][t][name]:.4f}")
            if "delta_m" in record["val"]:
                parts.append(f"delta_m {record['val']['delta_m']:+.2f}%")
        print("  " + ", ".join(parts), flush=True)
        if self.writer is not None:
            for k, v in record["train_loss"].items():
                self.writer.add_scalar(f"train/{k}", v, record["epoch"])
            for t, values in record.get("val", {}).items():
                if isinstance(values, dict):
                    for k, v in values.items():
                        self.writer.add_scalar(f"val/{t}/{k}", v, record["epoch"])

    def results(self, seconds: float) -> dict:
        last = next((r["val"] for r in reversed(self.history) if "val" in r), None)
        return {
            "name": self.cfg["name"],
            "config": self.cfg,
            "epochs": self.epoch,
            "train_seconds": seconds,
            "parameters": models.num_parameters(self.model),
            "history": self.history,
            "last_metrics": last,
            "best_epoch": None if self.best is None else self.best["epoch"],
            "best_metrics": None if self.best is None else self.best["metrics"],
        }

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "balancer": None if self.balancer is None else self.balancer.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "rng": rng_state(),
            "config": self.cfg,
        }

    def save(self, path: str) -> None:
        save_atomic(self.state_dict(), path)

    def load(self, path: str) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.balancer is not None and state["balancer"] is not None:
            self.balancer.load_state_dict(state["balancer"])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        set_rng_state(state["rng"])


def train(cfg: dict, *, resume: bool = False, progress: bool = True) -> dict:
    """Trains a checked config (see load_config) and returns its results (also in <run dir>/results.json)."""
    return Trainer(cfg, resume=resume, progress=progress).fit()
