"""The multi-task performance Delta_m of the survey (Maninis et al. 2019; Vandenhende et al. 2021).

    Delta_m = (1 / T) sum_t (-1)^{l_t} (M_t - M_single,t) / M_single,t,    l_t = 1 where lower is better,

the mean relative change of each task's main metric against its single-task baseline, in percent
(the survey stores the fraction and prints 100 x it). Each task's main metric and direction
follow the survey's calculate_multi_task_performance (evaluation/evaluate_utils.py): semseg,
human_parts and sal use mIoU (higher is better; for sal that is the survey's max-over-thresholds
mIoU, not maxF), depth rmse and normals mean angle (lower is better), edge odsF (higher is better).
"""

from __future__ import annotations

from collections.abc import Mapping

# task: (metric, higher_is_better)
DELTA_M_METRICS: dict[str, tuple[str, bool]] = {
    "semseg": ("mIoU", True),
    "human_parts": ("mIoU", True),
    "sal": ("mIoU", True),
    "depth": ("rmse", False),
    "normals": ("mean", False),
    "edge": ("odsF", True),
}

MAIN_METRIC = DELTA_M_METRICS  # the same table under a shorter name


def _table(metrics: Mapping[str, tuple[str, bool]] | None) -> dict[str, tuple[str, bool]]:
    table = dict(DELTA_M_METRICS)
    if metrics is not None:
        for task, spec in metrics.items():
            if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)):
                raise ValueError(f"delta_m: metrics[{task!r}] must be (metric_name, higher_is_better), got {spec!r}")
            table[task] = (spec[0], bool(spec[1]))
    return table


def task_deltas(
    results: Mapping[str, Mapping[str, float]],
    single_task: Mapping[str, Mapping[str, float]],
    metrics: Mapping[str, tuple[str, bool]] | None = None,
) -> dict[str, float]:
    """Each task's signed relative change (-1)^{l_t} (M_t - M_single,t) / M_single,t, in percent.

    results: {task: {metric: value}} of the model evaluated (every task in it is used; entries that
        are not dicts, such as a stored "delta_m" number, are skipped);
    single_task: {task: {metric: value}} of the single-task baselines (may hold more tasks);
    metrics: {task: (metric, higher_is_better)} overriding or extending DELTA_M_METRICS.
    Positive means better than the baseline.
    """
    table = _table(metrics)
    if not isinstance(results, Mapping) or not isinstance(single_task, Mapping):
        raise TypeError("delta_m: results and single_task must be dicts {task: {metric: value}}")
    results = {t: v for t, v in results.items() if isinstance(v, Mapping)}
    if not results:
        raise ValueError("delta_m: results has no task entry {task: {metric: value}}")
    unknown = [t for t in results if t not in table]
    if unknown:
        raise ValueError(
            f"delta_m: no main metric known for tasks {unknown}; known tasks are {sorted(table)} "
            f"(pass metrics={{task: (metric, higher_is_better)}})"
        )
    missing = [t for t in results if t not in single_task]
    if missing:
        raise ValueError(f"delta_m: single_task has no baseline for tasks {missing}; it has {sorted(single_task)}")
    out = {}
    for task, res in results.items():
        metric, higher = table[task]
        for name, d in (("results", res), ("single_task", single_task[task])):
            if not isinstance(d, Mapping) or metric not in d:
                have = sorted(d) if isinstance(d, Mapping) else type(d).__name__
                raise ValueError(f"delta_m: {name}[{task!r}] has no {metric!r} (it has {have})")
        m, base = float(res[metric]), float(single_task[task][metric])
        if base == 0:
            raise ValueError(f"delta_m: the single-task {task} {metric} is 0, the relative change is undefined")
        rel = (m - base) / base
        out[task] = 100.0 * (rel if higher else -rel)
    return out


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    single_task: Mapping[str, Mapping[str, float]],
    metrics: Mapping[str, tuple[str, bool]] | None = None,
) -> float:
    """Delta_m in percent over the tasks of `results` (see task_deltas for the arguments)."""
    d = task_deltas(results, single_task, metrics)
    return sum(d.values()) / len(d)
