"""Every Triton kernel, as the wrappers launch it for CUDA tensors, compiles for sm_90 (H100),
within the block's shared memory and CUDA's grid limits; no GPU needed (see triton_sm90.py).

The interpreter runs the kernels' arithmetic in the other tests; this catches what only the
compiler sees (a module global that is not a constexpr, tl.dot shapes, types). With the
installed Triton, and with a second one in MTL_KERNELS_EXTRA_TRITON (a pip --target folder;
`make test` puts the GPU machines' Triton 3.6 there): their compilers differ."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_sm90.py")
SM90_MAX_SHARED = 232448  # bytes a block may opt into on sm_90 (227 KiB)
MAX_GRID = (2**31 - 1, 65535, 65535)


EXTRA = os.environ.get("MTL_KERNELS_EXTRA_TRITON") or None


PARAMS = [None, EXTRA] if EXTRA else [None]
_started: dict = {}  # param -> (Popen, stdout file, stderr file): every Triton's compile starts at the first request


def _start(param):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if param is not None:
        assert os.path.isdir(os.path.join(param, "triton")), f"no triton in {param}"
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(param), env.get("PYTHONPATH", "")])
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files, not pipes: never full
    return subprocess.Popen([sys.executable, SCRIPT], env=env, stdout=out, stderr=err, text=True), out, err


@pytest.fixture(scope="module", params=PARAMS, ids=lambda p: p or "installed")
def compiled(request):
    pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend: nothing to compile")
    # Both Tritons compile at once: each compile is one process (ptxas on one core), and a
    # cold cache (as in CI) takes minutes each on the 2-core machine.
    for param in PARAMS:
        if param not in _started:
            _started[param] = _start(param)
    proc, out, err = _started[request.param]
    try:
        proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    assert proc.returncode == 0, stderr[-6000:]
    *rows, summary = (json.loads(line) for line in stdout.splitlines())
    if request.param is not None:
        assert summary["triton"] != __import__("triton").__version__, "the extra Triton was not the one imported"
    return rows, summary


def test_every_kernel_compiles_in_every_variant(compiled):
    rows, summary = compiled
    assert summary["launchable"], "no Triton kernels found"
    for name in summary["launchable"]:
        mine = [r for r in rows if r["kernel"] == name]
        assert mine, f"{name} was never launched"
        for flag in ("INT64", "ALIGNED"):  # both variants of a kernel's specialisation flags
            if any(flag in r["constexprs"] for r in mine):
                assert {r["constexprs"][flag] for r in mine} == {"False", "True"}, (name, flag)


def test_shared_memory_and_grids_fit_an_h100(compiled):
    rows, _ = compiled
    for r in rows:
        assert r["shared"] <= SM90_MAX_SHARED, (r["kernel"], r["constexprs"], r["shared"])
        for grid in r["grids"]:
            assert all(0 < g <= m for g, m in zip(grid, MAX_GRID)), (r["kernel"], r["constexprs"], grid)
    print(f"\n{len(rows)} kernels compiled for sm_90; most shared memory: {max(r['shared'] for r in rows)} bytes")
