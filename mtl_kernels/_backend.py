"""Which implementation of an op runs, and what this build has, in one place.

backend names: "reference" (plain PyTorch), "cpu" and "cuda" (the compiled
mtl_kernels._C), "triton" (GPU, or CPU tensors under TRITON_INTERPRET=1), and
"auto", which picks the fastest available one for the tensors' device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
_CHOICES = ("auto", *BACKENDS)

try:
    from . import _C  # noqa: F401  (loads the library and registers the compiled kernels)

    _C_ERROR = None
except ImportError as e:  # no compiler at install time, or a broken build
    _C_ERROR = e
    _built = importlib.util.find_spec("mtl_kernels._C") is not None
    # Python's own message for a missing _C blames a circular import; say what it is.
    _why = f"it failed to load: {e}" if _built else "the package was installed without them (no C++ compiler?)"
    warnings.warn(
        f"mtl_kernels: compiled kernels not available ({_why}); the 'cpu' and 'cuda' backends are off, "
        "'reference' and 'triton' remain",
        stacklevel=2,
    )

# The process-wide default set by use_backend(); a plain global so that
# torch.compile can read it without a graph break.
_default = "auto"


# Triton reads this once, at its import; so do we.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def compiled_error() -> ImportError | None:
    """Why mtl_kernels._C failed to load, or None when it loaded."""
    return _C_ERROR


def _has_kernel(op: str, key: str) -> bool:
    if _C_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mtl_kernels::{op}", key)


def _detect() -> tuple[str, ...]:
    names = ["reference"]
    if _has_kernel("cross_stitch", "CPU"):
        names.append("cpu")
    if _has_kernel("cross_stitch", "CUDA") and torch.cuda.is_available():
        names.append("cuda")
    if importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or _INTERPRET):
        names.append("triton")
    return tuple(names)


# Fixed for the process (TRITON_INTERPRET must be set before triton is
# imported anyway); a global tuple keeps resolve() traceable by torch.compile.
_AVAILABLE = _detect()


def available_backends() -> list[str]:
    """The backends this build and machine can run."""
    return list(_AVAILABLE)


@contextlib.contextmanager
def use_backend(name: str):
    """Run every op inside the block on `name` unless a call passes backend= itself."""
    global _default
    _check_name(name)
    previous, _default = _default, name
    try:
        yield
    finally:
        _default = previous


def forbid_double_backward(op: str) -> None:
    """Call in a fused op's registered backward: under create_graph=True (grad mode on in backward)
    its backward kernels, which have no autograd of their own, would enter the gradient's graph as
    constants, a silent zero second derivative; raise instead."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True) is not supported by the fused backends; "
            "use backend='reference' for higher-order gradients"
        )


def _check_name(name) -> None:
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {', '.join(_CHOICES)}, got {name!r}")


def check_backend_arg(name: str | None) -> str | None:
    """A module's or model's backend= when it is given: None (the process default) or a valid
    name, checked at construction rather than at the first forward."""
    if name is not None:
        _check_name(name)
    return name


def resolve(
    backend: str | None,
    device: torch.device,
    op: str,
    implemented: tuple[str, ...] = BACKENDS,
    *,
    tasks: int | None = None,
    max_tasks: dict[str, int] | None = None,
) -> str:
    """The backend that runs `op` on tensors on `device`; a clear error if it can't.

    implemented: the backends `op` has (an op may not have all four yet).
    max_tasks: the most tasks a backend's kernels take (the CUDA kernels unroll over a
    compile-time T); "auto" passes over a backend whose limit `tasks` exceeds.
    """
    name = _default if backend is None else backend
    _check_name(name)
    if name not in ("auto", *implemented):
        raise NotImplementedError(f"{op}: no {name!r} backend yet; {op} has {', '.join(implemented)}")
    limits = max_tasks or {}

    def takes(n: str) -> bool:
        return tasks is None or tasks <= limits.get(n, tasks)

    if name == "auto":
        if device.type == "cuda":
            order = ("cuda", "triton", "reference")
        elif device.type == "cpu":
            order = ("cpu", "reference")
        else:
            order = ("reference",)
        return next(n for n in order if n in _AVAILABLE and n in implemented and takes(n))
    if not takes(name):
        raise ValueError(
            f"{op}: backend {name!r} takes at most {limits[name]} tasks, got {tasks}; "
            "backend='auto' picks one that takes them all"
        )
    if name == "reference":
        return name
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpu' runs on CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"{op}: backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type == "cpu" and not _INTERPRET:
        raise ValueError(
            f"{op}: backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
        )
    if name not in _AVAILABLE:
        broken = _C_ERROR is not None and name in ("cpu", "cuda")
        why = f" (compiled kernels failed to load: {_C_ERROR})" if broken else ""
        raise RuntimeError(f"{op}: backend {name!r} is not available here; available: {list(_AVAILABLE)}{why}")
    return name
