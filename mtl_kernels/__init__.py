"""mtl_kernels: fused kernels for multi-task dense prediction in PyTorch.

import mtl_kernels as mk
unit = mk.nn.CrossStitch(["semseg", "depth"], channels=64)
out = unit({"semseg": x_seg, "depth": x_depth})
model = mk.convert(model)   # survey modules -> fused ones, same weights
"""

from . import balancing, data, metrics, models, nn, ops, reference, train
from ._backend import available_backends, use_backend
from .convert import convert

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "balancing",
    "convert",
    "data",
    "metrics",
    "models",
    "nn",
    "ops",
    "reference",
    "train",
    "use_backend",
]
