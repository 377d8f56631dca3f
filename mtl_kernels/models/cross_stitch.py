"""Cross-stitch network (Misra et al. 2016), as in the survey's code."""

from __future__ import annotations

from torch import nn

from ..nn import CrossStitch
from ..reference import CrossStitchUnit
from ._soft_sharing import StageFusionNetwork


class CrossStitchNetwork(StageFusionNetwork):
    """Task-specific ResNets (dilated, output stride 8) with a cross-stitch unit
    after every stage (stem + layer1, layer2, layer3, layer4), then a DeepLab-v3
    head per task.

    alpha, beta: the units' initial weights on and off the diagonal (0.9, 0.1).
    The units are mk.nn.CrossStitch on `backend`; survey_modules=True builds
    the survey's CrossStitchUnit instead (plain PyTorch, the survey's
    state_dict keys), which mk.convert(model) swaps for fused ones.
    """

    def __init__(self, out_channels, backbone="resnet18", *, alpha: float = 0.9, beta: float = 0.1, **kwargs):
        self.alpha, self.beta = alpha, beta
        super().__init__(out_channels, backbone, **kwargs)

    def make_unit(self, channels: int, survey_modules: bool) -> nn.Module:
        if survey_modules:
            return CrossStitchUnit(self.tasks, channels, self.alpha, self.beta)
        return CrossStitch(self.tasks, channels, self.alpha, self.beta, backend=self.backend)
