"""Test setup shared by every test module.

Without a GPU, Triton kernels run on the CPU under TRITON_INTERPRET=1, which
must be set before triton is imported: so here, before mtl_kernels is.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mtl_kernels  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def fused_backends(device: str) -> list[str]:
    """Every non-reference backend this build can run on `device`."""
    available = mtl_kernels.available_backends()
    if device == "cpu":  # Triton takes CPU tensors only in the interpreter (off where a GPU is)
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        return [b for b in ("cpu", "triton") if b in available and (b == "cpu" or interpret)]
    return [b for b in ("cuda", "triton") if b in available]


def devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
