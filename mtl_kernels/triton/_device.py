"""What the Triton wrappers ask of the device, in one place: a GPU or the interpreter (CPU tensors),
how many SMs, the launch guard, and whether offsets need 64 bits.

The wrappers call these through the module (`_device.on_gpu(...)`), so that
tests/test_triton_sm90.py can stand in a GPU and compile every launch for sm_90 on a machine without one."""

from __future__ import annotations

import contextlib
import functools

import torch


def on_gpu(device: torch.device) -> bool:
    """CUDA tensors run compiled; anything else runs under TRITON_INTERPRET=1, one program at a time."""
    return device.type == "cuda"


@functools.cache
def num_sms(device: torch.device) -> int:
    if on_gpu(device):
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: a few big programs are fastest


def device_guard(device: torch.device):
    # Triton launches on the current CUDA device.
    return torch.cuda.device(device) if on_gpu(device) else contextlib.nullcontext()


def needs_int64(*ts: torch.Tensor) -> bool:
    # 32-bit offsets suffice while every element addressed (of the tensors' storage span,
    # slices of wider tensors included) is below 2**31.
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) >= 2**31 - 1 for t in ts)


def upload(ts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Small host tables onto `device`. To a GPU through pinned memory: the copies are queued on
    the stream and the host does not wait (a copy from pageable memory would synchronise)."""
    if not on_gpu(device):
        return ts
    return [t.pin_memory().to(device, non_blocking=True) for t in ts]
