"""Drop-in modules backed by the fused ops."""

from .cross_stitch import CrossStitch

__all__ = ["CrossStitch"]
