"""The benchmark harness: run_cases times the implementations of a configuration interleaved."""

import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # noqa: E402


def make_case(impl, calls, leaf):
    def forward():
        calls.append(impl)
        return [leaf * 2.0]

    return harness.Case(
        op="toy",
        impl=impl,
        params={"n": leaf.numel()},
        dtype=leaf.dtype,
        device=leaf.device,
        forward=forward,
        leaves=[leaf],
        bytes_moved={"forward": 8, "backward": 8, "both": 16},
    )


def test_run_cases_interleaves_the_reps():
    calls = []
    leaf = torch.randn(64, requires_grad=True)
    cases = [make_case(impl, calls, leaf) for impl in ("eager", "compile", "cpu")]
    settings = harness.Settings(warmup=1, target_s=0.0, min_reps=4, max_reps=4)
    rows = harness.run_cases(cases, settings)
    assert [(r["impl"], r["mode"]) for r in rows] == [
        (impl, mode) for impl in ("eager", "compile", "cpu") for mode in harness.MODES
    ]
    assert all(r["reps"] == 4 and r["interleaved"] and r["median_ms"] > 0 for r in rows)
    # Preparation case by case (first call, 1 warm-up, the memory step), then rounds of one
    # rep per case, the starting case rotating.
    prep, timed = calls[:9], calls[9:]
    assert prep == ["eager"] * 3 + ["compile"] * 3 + ["cpu"] * 3
    assert timed == ["eager", "compile", "cpu", "compile", "cpu", "eager", "cpu", "eager", "compile"] + [
        "eager",
        "compile",
        "cpu",
    ]
    assert harness.run_cases([], settings) == []


def test_results_dir_from_the_environment(tmp_path):
    """MTL_BENCH_RESULTS_DIR (e.g. $OUT on the device machine) is where rows are appended."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from benchmarks import harness; print(harness.RESULTS_DIR)"
    env = {**os.environ, "MTL_BENCH_RESULTS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path)
    harness.save([{"op": "toy"}], torch.device("cpu"), str(tmp_path))
    path = harness.save([{"op": "toy2"}], torch.device("cpu"), str(tmp_path))
    with open(path) as f:
        assert [r["op"] for r in json.load(f)] == ["toy", "toy2"]
