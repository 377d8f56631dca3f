"""Every runnable example in python/ runs (short options) and succeeds."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "python", name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_demo_cross_stitch():
    out = run_example("demo_cross_stitch.py", "--no-bench")
    assert "converted 3 CrossStitchUnit modules" in out
    assert "largest difference" in out


def test_demo_dense_loss():
    for balancer in ("uncertainty", "dwa", "nyud"):
        out = run_example("demo_dense_loss.py", "--steps", "6", "--balancer", balancer)
        assert "largest difference from the reference loss" in out


def test_main_job(tmp_path):
    out = run_example(
        "main_job.py",
        *("--epochs", "1", "--train-length", "16", "--val-length", "8", "--models", "cross_stitch"),
        *("--out", str(tmp_path / "main")),
    )
    assert "| cross_stitch |" in out and "x reference" in out
    assert (tmp_path / "main" / "summary.json").is_file()
    assert (tmp_path / "main" / "cross_stitch" / "predictions.png").is_file()
