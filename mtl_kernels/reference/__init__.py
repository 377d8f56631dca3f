"""Plain-PyTorch implementations: the definition every fused backend is tested against."""

from .cross_stitch import CrossStitchUnit, cross_stitch
from .distillation import AttentionLayer, MultiTaskDistillationModule, SABlock
from .gate_sum import gate_sum
from .nddr import NDDRLayer, nddr

__all__ = [
    "AttentionLayer",
    "CrossStitchUnit",
    "MultiTaskDistillationModule",
    "NDDRLayer",
    "SABlock",
    "cross_stitch",
    "gate_sum",
    "nddr",
]
