"""Plain-PyTorch implementations: the definition every fused backend is tested against."""

from .cross_stitch import CrossStitchUnit, cross_stitch

__all__ = ["CrossStitchUnit", "cross_stitch"]
