"""Drop-in modules backed by the fused ops."""

from .cross_stitch import CrossStitch
from .nddr import NDDR

__all__ = ["CrossStitch", "NDDR"]
