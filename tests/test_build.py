"""What the build produced: the compiled library loads and registers its kernels.

`make test` builds the CUDA kernels even on a machine with no GPU and sets
MTL_KERNELS_EXPECT_CUDA=1, so this proves they compiled and the extension imports.
"""

import os

import pytest
import torch

import mtl_kernels as mk
from mtl_kernels import _backend

OPS = ["cross_stitch", "cross_stitch_backward"]


def test_compiled_library_loaded():
    assert _backend.compiled_error() is None, f"mtl_kernels._C failed to load: {_backend.compiled_error()}"
    assert "cpu" in mk.available_backends()


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mtl_kernels::{op}", "CPU")


@pytest.mark.skipif(os.environ.get("MTL_KERNELS_EXPECT_CUDA") != "1", reason="not a CUDA build")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mtl_kernels::{op}", "CUDA")


def test_triton_backend_present_where_it_can_run():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in mk.available_backends()
