"""Per-task metrics of the survey, accumulated over a dataset, and the multi-task performance Delta_m.

    meter = mk.metrics.MultiTaskMetrics(["semseg", "depth", "normals"], semseg={"num_classes": 40})
    for batch in loader:
        meter.update(model(batch["image"]), batch)      # dicts {task: tensor}
    scores = meter.compute()                            # {task: {metric: float}}
    mk.metrics.delta_m(scores, single_task_scores)      # percent

Each accumulator has update(pred, gt) (torch tensors on any device, [B, ...]), compute() -> dict
of floats and reset(); the module docstrings say exactly what each computes and how it follows
the survey's evaluation code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .delta import DELTA_M_METRICS, MAIN_METRIC, delta_m, task_deltas
from .depth import DepthMeter
from .edge import MAX_DIST, MAX_DIST_NYUD, EdgeMeter, edge_counts, edge_scores, thin
from .normals import NormalsMeter
from .saliency import SURVEY_THRESHOLDS, SaliencyMeter
from .semseg import NYU_CATEGORY_NAMES, PART_CATEGORY_NAMES, VOC_CATEGORY_NAMES, HumanPartsMeter, SemsegMeter

METERS = {
    "semseg": SemsegMeter,
    "human_parts": HumanPartsMeter,
    "depth": DepthMeter,
    "normals": NormalsMeter,
    "sal": SaliencyMeter,
    "edge": EdgeMeter,
}

# The survey's datasets: constructor arguments of each task's meter.
DATASETS = {
    "NYUD": {
        "semseg": {"num_classes": 40, "class_names": NYU_CATEGORY_NAMES},
        "edge": {"max_dist": MAX_DIST_NYUD},
    },
    "PASCALContext": {
        "semseg": {"num_classes": 21, "class_names": VOC_CATEGORY_NAMES},
        "human_parts": {"num_classes": 7},
        "edge": {"max_dist": MAX_DIST},
    },
}


class MultiTaskMetrics:
    """One accumulator per task: update(preds, targets) with dicts, compute() -> {task: {metric: value}}.

    tasks: task names among semseg, human_parts, depth, normals, sal, edge.
    dataset: None, "NYUD" or "PASCALContext": the survey's class counts and edge tolerance.
    num_classes: semseg's class count, or {"semseg": C, "human_parts": P} (semseg's is else
        inferred from the first [B, C, H, W] scores; human_parts defaults to 7).
    edge_tolerance: edge's max_dist, a fraction of the image diagonal (0.0075; NYUD 0.011).
    logits: sal and edge predictions are logits (a sigmoid is applied); default probabilities.
    **kw: per-task constructor arguments, e.g. semseg={"num_classes": 13}, edge={"thin": True};
        they override all of the above.

    Predictions are what each meter takes (semseg / human_parts scores or labels, depth, normal
    vectors, saliency and edge probabilities); targets are the dataset's. Keys of preds or targets
    that are not tasks here (images, metadata, auxiliary outputs) are ignored.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        dataset: str | None = None,
        num_classes: int | Mapping[str, int] | None = None,
        edge_tolerance: float | None = None,
        logits: bool = False,
        **kw: Mapping,
    ):
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = list(tasks)
        if not tasks:
            raise ValueError("MultiTaskMetrics: tasks must name at least one task")
        unknown = [t for t in tasks if t not in METERS]
        if unknown:
            raise ValueError(f"MultiTaskMetrics: unknown tasks {unknown}; the valid tasks are {list(METERS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"MultiTaskMetrics: tasks has duplicates: {tasks}")
        extra = [k for k in kw if k not in tasks]
        if extra:
            raise ValueError(
                f"MultiTaskMetrics: keyword arguments {extra} are not among tasks {tasks} "
                f"(give per-task arguments as task={{...}} for a task in the list)"
            )
        if dataset is not None and dataset not in DATASETS:
            raise ValueError(f"MultiTaskMetrics: unknown dataset {dataset!r}; known are {list(DATASETS)} or None")
        preset = {t: dict(a) for t, a in DATASETS.get(dataset, {}).items()}
        if num_classes is not None:
            per_task = dict(num_classes) if isinstance(num_classes, Mapping) else {"semseg": num_classes}
            bad = [t for t in per_task if t not in ("semseg", "human_parts")]
            if bad:
                raise ValueError(f"MultiTaskMetrics: num_classes is for semseg and human_parts, got {bad}")
            for t, c in per_task.items():
                args = preset.setdefault(t, {})
                args["num_classes"] = c
                if args.get("class_names") is not None and len(args["class_names"]) != c:
                    del args["class_names"]
        if edge_tolerance is not None:
            preset.setdefault("edge", {})["max_dist"] = edge_tolerance
        if logits:
            preset.setdefault("edge", {})["logits"] = True
            preset.setdefault("sal", {})["logits"] = True
        self.tasks = tasks
        self.meters = {}
        for t in tasks:
            args = dict(preset.get(t, {}))
            user = kw.get(t, {})
            if not isinstance(user, Mapping):
                raise TypeError(f"MultiTaskMetrics: {t}= must be a dict of {METERS[t].__name__} arguments")
            args.update(user)
            self.meters[t] = METERS[t](**args)

    def reset(self) -> None:
        for m in self.meters.values():
            m.reset()

    def update(self, preds: Mapping, targets: Mapping) -> None:
        if not isinstance(preds, Mapping) or not isinstance(targets, Mapping):
            raise TypeError("MultiTaskMetrics.update: preds and targets must be dicts {task: tensor}")
        missing_p = [t for t in self.tasks if t not in preds]
        missing_t = [t for t in self.tasks if t not in targets]
        if missing_p or missing_t:
            raise ValueError(
                f"MultiTaskMetrics.update: preds lacks {missing_p}, targets lacks {missing_t} (tasks {self.tasks})"
            )
        for t in self.tasks:
            try:
                self.meters[t].update(preds[t], targets[t])
            except (ValueError, TypeError) as e:
                raise type(e)(f"task {t!r}: {e}") from e

    def compute(self) -> dict[str, dict[str, float]]:
        return {t: self.meters[t].compute() for t in self.tasks}

    def __getitem__(self, task: str):
        return self.meters[task]


__all__ = [
    "DATASETS",
    "DELTA_M_METRICS",
    "MAIN_METRIC",
    "MAX_DIST",
    "MAX_DIST_NYUD",
    "METERS",
    "NYU_CATEGORY_NAMES",
    "PART_CATEGORY_NAMES",
    "SURVEY_THRESHOLDS",
    "VOC_CATEGORY_NAMES",
    "DepthMeter",
    "EdgeMeter",
    "HumanPartsMeter",
    "MultiTaskMetrics",
    "NormalsMeter",
    "SaliencyMeter",
    "SemsegMeter",
    "delta_m",
    "edge_counts",
    "edge_scores",
    "task_deltas",
    "thin",
]
