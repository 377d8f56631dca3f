"""A small benchmark harness shared by every op's benchmark.

A benchmark builds `Case`s (one implementation of one op at one shape and
dtype), hands the cases of each configuration to `run_cases` (which times
them interleaved, so that the ratios between implementations survive a
drifting machine), and passes all the rows to `report`:

    rows = []
    for config in configs:
        rows += run_cases(make_cases(config), settings=Settings.default(device))
    report(rows, device, save_results=True, title="my_op")

Modes (all three measured from the same reps, see time_modes)
  forward   the forward call (with autograd recording, as in training)
  backward  torch.autograd.backward(outputs, grads) alone; the forward runs
            each rep outside its timed region
  both      forward + backward

Timing: a first call (and, for torch.compile, the compile), warm-up, then
`reps` steps, round-robin over the configuration's cases; median, p20 and
p80 in ms. On CUDA with CUDA events after an
L2 flush (as triton.testing.do_bench does); on CPU with time.perf_counter
(the working sets here are far larger than the CPU caches, so no flush).
Each rep starts with every leaf's .grad set to None, outside timing, so
backward allocates fresh gradients as zero_grad(set_to_none=True) training does.

Bandwidth: GB/s = bytes_moved[mode] / median time, with bytes_moved the
fewest bytes the mode must move (each input read once, each output written
once), given by the caller; "% bw" is that over device_bandwidth_gbs().
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

MODES = ("forward", "backward", "both")
# MTL_BENCH_RESULTS_DIR elsewhere: e.g. $OUT on the device machine, so rows saved before a
# command's time limit come back even if a later benchmark is cut off.
RESULTS_DIR = os.environ.get("MTL_BENCH_RESULTS_DIR") or os.path.join(os.path.dirname(__file__), "results")


# --------------------------------------------------------------------------- cases and settings


@dataclasses.dataclass
class Case:
    """One implementation of one op at one configuration.

    forward: runs the op, returns its outputs (a sequence of tensors).
    leaves: the tensors that receive gradients (inputs, weights); their
        .grad is reset to None before every rep.
    bytes_moved: mode -> the fewest bytes that mode must move.
    compiled: forward is a torch.compile'd callable; its first call (which
        compiles forward, then backward) is reported apart, as compile_s.
    """

    op: str
    impl: str  # "eager", "compile", "cpu", "cuda", "triton"
    params: dict
    dtype: torch.dtype
    device: torch.device
    forward: Callable[[], Sequence[torch.Tensor]]
    leaves: Sequence[torch.Tensor]
    bytes_moved: dict[str, int]
    compiled: bool = False


@dataclasses.dataclass
class Settings:
    """How many steps to run.

    warmup: forward+backward steps after the first call and before the step
        that measures peak memory (which is one more warm-up step).
    reps = clamp(target_s / (fastest of those steps), min_reps, max_reps).
    """

    warmup: int = 3
    target_s: float = 1.0
    min_reps: int = 10
    max_reps: int = 200

    @classmethod
    def default(cls, device: torch.device, quick: bool = False) -> Settings:
        if torch.device(device).type == "cuda":
            return cls(warmup=3, target_s=0.2, min_reps=10, max_reps=100) if quick else cls(5, 1.0, 25, 500)
        # CPU: one eager step of the largest shapes takes seconds on a small
        # machine; the first call and the peak-memory step are the warm-up.
        return cls(warmup=0, target_s=0.5, min_reps=5, max_reps=20) if quick else cls(0, 1.0, 3, 20)


# --------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_reference(fn, **kwargs):
    """torch.compile(fn, dynamic=False), for one shape and dtype.

    Resets dynamo first: every configuration compiles the same code object
    (e.g. CrossStitchUnit.forward), and past the recompile limit dynamo would
    silently fall back to eager. So: call it once per shape/dtype, just before
    benchmarking that configuration.
    """
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, **kwargs)


def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict:
    xs = sorted(times_ms)
    return {"median_ms": _percentile(xs, 0.5), "p20_ms": _percentile(xs, 0.2), "p80_ms": _percentile(xs, 0.8)}


def _clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


# --------------------------------------------------------------------------- timing


class _Clock:
    """Marks points in time: CUDA events on CUDA (read after a final sync), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


# About 3 ms of GPU clock cycles at H100 clocks: the host's head start on every timed rep.
_HEAD_START_CYCLES = 5_000_000


def time_modes(case: Case, grads: Sequence[torch.Tensor], reps: int, modes: Sequence[str] = MODES) -> dict:
    """mode -> ms per rep, all modes from the same reps.

    Each rep: t0, outputs = forward(), t1, backward(outputs, grads), t2;
    forward = t1 - t0, backward = t2 - t1 (its forward outside the timed
    region), both = t2 - t0. With modes=("forward",) backward is skipped.
    On CUDA the L2 cache is flushed before t0 (backward then finds in L2
    what forward left there, as in training), and then the GPU sleeps a few
    milliseconds (torch.cuda._sleep) while the host queues the rep: the events
    time the GPU's execution, not the host's launches, although run_cases
    synchronises after every rep (it interleaves the implementations rep by
    rep). An implementation whose launches outlast the head start is
    host-bound, and its time shows it.
    """
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    need_backward = any(m != "forward" for m in modes)
    clock = _Clock(case.device)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=case.device) if clock.cuda else None  # > any L2
    marks = []
    for _ in range(reps):
        _clear_grads(case.leaves)
        if flush is not None:
            flush.zero_()
            torch.cuda._sleep(_HEAD_START_CYCLES)
        t0 = clock.mark()
        outs = case.forward()
        t1 = clock.mark()
        if need_backward:
            torch.autograd.backward(outs, grads)
        t2 = clock.mark()
        del outs  # freed outside the timed regions
        marks.append((t0, t1, t2))
    sync(case.device)
    _clear_grads(case.leaves)
    spans = {"forward": (0, 1), "backward": (1, 2), "both": (0, 2)}
    return {m: [clock.ms(ts[spans[m][0]], ts[spans[m][1]]) for ts in marks] for m in modes}


# --------------------------------------------------------------------------- one step, peak memory


def _step(case: Case, grads, measure_memory: bool = False, backward: bool = True) -> tuple[float, float, float | None]:
    """One synchronised forward+backward: (forward s, backward s, peak MiB or None).

    With measure_memory: the peak memory of the step above what was allocated
    before it. It counts every tensor allocated during the step and alive at
    the same time: outputs, saved activations, temporaries, and the input
    gradients (which outlive the step). Inputs, weights and output gradients
    already exist: they are the baseline, not counted. Measure it after
    warm-up (first calls may allocate workspaces, autotune buffers ...).
      CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(),
        minus memory_allocated() before (tensor bytes of the caching
        allocator, not its reserved pool).
      CPU: the profiler's [memory] events (each c10 CPU allocator alloc/free
        with its byte count) summed in time order; the peak of that running
        sum. Tensor storage only: no Python objects, no malloc slack.
    """
    _clear_grads(case.leaves)
    gc.collect()
    cuda = case.device.type == "cuda"
    prof = None
    if measure_memory and cuda:
        sync(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
        base = torch.cuda.memory_allocated(case.device)
    elif measure_memory:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    sync(case.device)
    t0 = time.perf_counter()
    outs = case.forward()
    sync(case.device)
    t1 = time.perf_counter()
    if backward:
        torch.autograd.backward(outs, grads)
    sync(case.device)
    t2 = time.perf_counter()
    del outs
    peak = None
    if measure_memory and cuda:
        peak = (torch.cuda.max_memory_allocated(case.device) - base) / 2**20
    elif measure_memory:
        prof.__exit__(None, None, None)
        peak = _profiler_peak_bytes(prof) / 2**20
    _clear_grads(case.leaves)
    return t1 - t0, t2 - t1, peak


def _profiler_peak_bytes(prof) -> int:
    # prof.events() folds allocations into their parent op's totals; the raw
    # kineto events keep one [memory] event per alloc (+bytes) and free (-bytes).
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------- device info


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    device = torch.device(device)
    name = slug(device_name(device))
    return name if device.type == "cuda" else f"cpu-{name}"


# Peak DRAM bandwidth from the data sheets, GB/s. First match wins: every
# substring of the key must be in the lower-cased torch.cuda.get_device_name().
_KNOWN_GPU_BANDWIDTH = (
    (("gh200",), 4000),  # the 96 GB HBM3 version (144 GB HBM3e: 4900)
    (("h200",), 4800),
    (("h100", "nvl"), 3900),
    (("h100", "pcie"), 2000),
    (("h100",), 3350),  # SXM5: "NVIDIA H100 80GB HBM3"
    (("h800", "pcie"), 2000),
    (("h800",), 3350),
    (("b200",), 8000),
    (("a100", "80gb", "pcie"), 1935),
    (("a100", "80gb"), 2039),  # SXM4
    (("a100",), 1555),  # 40 GB, SXM4 and PCIe
    (("a800", "80gb"), 2039),
    (("l40",), 864),  # L40 and L40S
    (("l4",), 300),
    (("a10g",), 600),
    (("a10",), 600),
    (("v100",), 900),
    (("t4",), 320),
    (("rtx 4090",), 1008),
    (("rtx 3090",), 936),
)


@functools.cache
def _device_bandwidth(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for keys, gbs in _KNOWN_GPU_BANDWIDTH:
            if all(k in name for k in keys):
                return float(gbs), "spec"
        nbytes, reps = 1 << 30, 10
    else:
        nbytes, reps = 256 << 20, 5
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(2):  # first touch of the pages, thread pool start-up
        dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9, "measured copy"


def device_bandwidth(device) -> tuple[float, str]:
    """(GB/s, how it was found): the data sheet for known GPUs, else measured once per process.

    Measured: the fastest of several large copies dst.copy_(src) (1 GiB on
    CUDA, 256 MiB on CPU, same for all threads torch uses), counting the bytes
    read plus the bytes written.
    """
    return _device_bandwidth(torch.device(device))


def device_bandwidth_gbs(device) -> float:
    return device_bandwidth(device)[0]


# --------------------------------------------------------------------------- running a case


def run_case(case: Case, settings: Settings | None = None, modes: Sequence[str] = MODES) -> list[dict]:
    """One case alone: run_cases([case], ...)."""
    return run_cases([case], settings, modes)


def run_cases(cases: Sequence[Case], settings: Settings | None = None, modes: Sequence[str] = MODES) -> list[dict]:
    """The implementations of one configuration, timed interleaved; one row per case and mode.

    Each case gets its first call, warm-up and peak-memory step in turn; then the timed reps go
    round-robin, one rep of every case per round (the order rotating from round to round), so a
    machine whose speed drifts during the run (page-fault costs, other load) skews every case
    alike and the ratios between them hold. reps is the same for every case:
    clamp(target_s x cases / (sum of their fastest steps), min_reps, max_reps).
    """
    cases = list(cases)
    if not cases:
        return []
    s = settings or Settings.default(cases[0].device)
    prepared = [_prepare(case, s, modes) for case in cases]
    step_s = sum(p[3] for p in prepared)
    reps = int(min(s.max_reps, max(s.min_reps, s.target_s * len(cases) / max(step_s, 1e-6))))
    times = [{m: [] for m in modes} for _ in cases]
    for r in range(reps):
        for k in range(len(cases)):
            i = (k + r) % len(cases)
            for mode, ms in time_modes(cases[i], prepared[i][0], 1, modes).items():
                times[i][mode] += ms
    rows = []
    for case, (_, first_s, peak_mib, _), t in zip(cases, prepared, times):
        rows += _rows(case, t, reps, first_s, peak_mib, modes)
    del prepared
    gc.collect()
    return rows


def _prepare(case: Case, s: Settings, modes: Sequence[str]):
    """First call (making the output gradients; for a compiled case, the compile), warm-up and the
    peak-memory step: (grads, first call s, peak MiB, fastest step s)."""
    _clear_grads(case.leaves)
    sync(case.device)
    t0 = time.perf_counter()
    outs = case.forward()
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in outs]
    backward = any(m != "forward" for m in modes)  # forward-only ops (no autograd) time mode "forward"
    if backward:
        torch.autograd.backward(outs, grads)
    sync(case.device)
    first_s = time.perf_counter() - t0
    del outs
    steps = [_step(case, grads, backward=backward) for _ in range(s.warmup)]
    steps.append(_step(case, grads, measure_memory=True, backward=backward))
    return grads, first_s, steps[-1][2], min(f + b for f, b, _ in steps)


def _rows(case: Case, times: dict, reps: int, first_s: float, peak_mib, modes: Sequence[str]) -> list[dict]:
    bw_gbs, bw_how = device_bandwidth(case.device)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for mode in modes:
        stats = summarize(times[mode])
        gbs = case.bytes_moved[mode] / (stats["median_ms"] / 1e3) / 1e9
        rows.append(
            {
                "op": case.op,
                "device": device_name(case.device),
                "device_type": case.device.type,
                "impl": case.impl,
                "params": dict(case.params),
                "dtype": str(case.dtype).removeprefix("torch."),
                "mode": mode,
                **stats,
                "reps": reps,
                "peak_mib": peak_mib,
                "bytes_moved": case.bytes_moved[mode],
                "gbs": gbs,
                "pct_bw": 100 * gbs / bw_gbs,
                "device_bw_gbs": bw_gbs,
                "device_bw_source": bw_how,
                "compile_s": first_s if case.compiled else None,
                "threads": torch.get_num_threads() if case.device.type == "cpu" else None,
                # cuDNN convolutions run in TF32 by default: eager / compile "float32" rows with
                # convolutions are TF32 there, the fused GEMMs IEEE fp32.
                "cudnn_tf32": torch.backends.cudnn.allow_tf32 if case.device.type == "cuda" else None,
                "torch": torch.__version__,
                "commit": _git_commit(),
                "date": date,
                "interleaved": True,
            }
        )
    return rows


@functools.cache
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# --------------------------------------------------------------------------- reporting


def _config(row: dict) -> tuple:
    return row["op"], row["device"], json.dumps(row["params"], sort_keys=True), row["dtype"]


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager / _vs_compile: that impl's median over this row's, same run, config and mode."""
    medians = {(_config(r), r["mode"], r["impl"]): r["median_ms"] for r in rows}
    for r in rows:
        for base in ("eager", "compile"):
            m = medians.get((_config(r), r["mode"], base))
            r[f"speedup_vs_{base}"] = m / r["median_ms"] if m is not None else None


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


_COLUMNS = (
    ("op", lambda r: r["op"]),
    ("params", lambda r: ",".join(f"{k}={v}" for k, v in r["params"].items())),
    ("dtype", lambda r: r["dtype"]),
    ("mode", lambda r: r["mode"]),
    ("impl", lambda r: r["impl"]),
    ("median ms", lambda r: f"{r['median_ms']:.3f}"),
    ("p20", lambda r: f"{r['p20_ms']:.3f}"),
    ("p80", lambda r: f"{r['p80_ms']:.3f}"),
    ("reps", lambda r: str(r["reps"])),
    ("peak MiB", lambda r: f"{r['peak_mib']:.0f}"),
    ("GB/s", lambda r: f"{r['gbs']:.1f}"),
    ("% bw", lambda r: f"{r['pct_bw']:.0f}"),
    ("x eager", lambda r: _ratio(r.get("speedup_vs_eager"))),
    ("x compile", lambda r: _ratio(r.get("speedup_vs_compile"))),
)
_LEFT = {"op", "params", "dtype", "mode", "impl"}


def format_table(rows: list[dict]) -> str:
    """One line per row, grouped by configuration and mode (impls next to each other)."""
    first_seen = {}
    for r in rows:
        first_seen.setdefault(_config(r), len(first_seen))
    order = {"forward": 0, "backward": 1, "both": 2}
    # configurations in run order, then modes; stable, so impls keep their run order
    rows = sorted(rows, key=lambda r: (first_seen[_config(r)], order.get(r["mode"], 9)))
    cells = [[f(r) for _, f in _COLUMNS] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _) in enumerate(_COLUMNS)]

    def line(values):
        return "  ".join(v.ljust(w) if h in _LEFT else v.rjust(w) for v, w, (h, _) in zip(values, widths, _COLUMNS))

    lines = [line([h for h, _ in _COLUMNS]), "  ".join("-" * w for w in widths)]
    for i, (r, c) in enumerate(zip(rows, cells)):
        if i and (_config(r), r["mode"]) != (_config(rows[i - 1]), rows[i - 1]["mode"]):
            lines.append("")
        lines.append(line(c))
    return "\n".join(lines)


def save(rows: list[dict], device, results_dir: str = RESULTS_DIR) -> str:
    """Append rows to <results_dir>/<device-slug>.json (a JSON list); returns the path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{device_slug(device)}.json")
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(old + rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def report(rows: list[dict], device, *, save_results: bool = True, title: str | None = None) -> None:
    """Add the speedups to the rows, print the table, append the rows to the results file if asked."""
    device = torch.device(device)
    add_speedups(rows)
    bw, how = device_bandwidth(device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\n== {title or 'benchmark'} on {device_name(device)}{threads} (bandwidth {bw:.0f} GB/s, {how})")
    print("x eager / x compile: that impl's median time over this row's (same run; > 1 = this row is faster)")
    print(format_table(rows))
    if save_results and rows:
        print(f"appended {len(rows)} rows to {save(rows, device)}")


def release(device: torch.device) -> None:
    """Frees compiled graphs and cached memory between configurations."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv, doc: str, title: str, run, *, quick_help: str, full_help: str | None = None) -> list[dict]:
    """The command line every benchmark shares: --quick, [--full,] --no-save, --device, --impls.

    run(device, quick=, impls=[, full=]) returns the rows; they are printed and
    (unless --no-save) appended to benchmarks/results/<device>.json ($MTL_BENCH_RESULTS_DIR if set).
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    if full_help:
        p.add_argument("--full", action="store_true", help=full_help)
    p.add_argument("--no-save", action="store_true", help="print only; don't append to benchmarks/results/")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", help="comma-separated subset of eager,compile,cpu,cuda,triton")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    extra = {"full": args.full} if full_help else {}
    rows = run(device, quick=args.quick, impls=args.impls.split(",") if args.impls else None, **extra)
    if args.quick:
        grid = "quick"
    elif full_help and not args.full and device.type == "cpu":
        grid = "reduced CPU grid"
    else:
        grid = "full"
    report(rows, device, save_results=not args.no_save, title=f"{title} ({grid})")
    return rows
