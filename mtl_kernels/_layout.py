"""Memory layouts the fused kernels compute in (mirrors csrc/common/cross_stitch.h).

The kernels read and write two dense layouts in place, NCHW and channels_last;
an input in any other layout (a strided slice, say) is copied once, into
channels_last when its channels are contiguous (a channel slice of a
channels_last tensor), else into NCHW.
"""

from __future__ import annotations

import torch


def dense_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) or (x.dim() == 4 and x.stride(1) == 1):
        return torch.channels_last  # channels_last, or a channel slice of a channels_last tensor
    return torch.contiguous_format


def empty_like_all(xs, fmt: torch.memory_format) -> list[torch.Tensor]:
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) for x in xs]
