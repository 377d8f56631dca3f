"""Plain-PyTorch implementations: the definition every fused backend is tested against."""

from .cross_stitch import CrossStitchUnit, cross_stitch
from .nddr import NDDRLayer, nddr

__all__ = ["CrossStitchUnit", "NDDRLayer", "cross_stitch", "nddr"]
