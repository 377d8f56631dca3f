"""Functional ops: argument checks, fake kernels, autograd and backend choice."""

from .cross_stitch import cross_stitch
from .nddr import nddr

__all__ = ["cross_stitch", "nddr"]
