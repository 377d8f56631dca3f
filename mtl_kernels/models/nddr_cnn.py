"""NDDR-CNN (Gao et al. 2019), as in the survey's code."""

from __future__ import annotations

from torch import nn

from ..nn import NDDR
from ..reference import NDDRLayer
from ._soft_sharing import StageFusionNetwork


class NDDRCNN(StageFusionNetwork):
    """Task-specific ResNets (dilated, output stride 8) with an NDDR layer
    (1x1 conv over the concatenated task features, BN, ReLU, per task) after
    every stage, then a DeepLab-v3 head per task.

    alpha, beta: the initial weight of a task's own features and of every
    other task's (0.9, 0.1); the BN momentum is the survey's 0.05.
    The layers are mk.nn.NDDR on `backend`; survey_modules=True builds the
    survey's NDDRLayer instead, which mk.convert(model) swaps for fused ones.
    """

    def __init__(self, out_channels, backbone="resnet18", *, alpha: float = 0.9, beta: float = 0.1, **kwargs):
        self.alpha, self.beta = alpha, beta
        super().__init__(out_channels, backbone, **kwargs)

    def make_unit(self, channels: int, survey_modules: bool) -> nn.Module:
        if survey_modules:
            return NDDRLayer(self.tasks, channels, self.alpha, self.beta)
        return NDDR(self.tasks, channels, self.alpha, self.beta, momentum=0.05, backend=self.backend)
