"""Task balancing: how per-task losses (or gradients) are combined into one update.

Every method is a Balancer: total, weights = balancer({task: loss}); total.backward()
(or weights = balancer.backward(losses)), and balancer.epoch_end() after each epoch.
Gradient-level methods (GradientBalancer subclasses: GradNorm, MGDA, PCGrad, CAGrad, IMTLG,
NashMTL, AlignedMTL, UPGrad) have backward only:
weights = balancer.backward(losses, shared_params=backbone.parameters()) or shared_repr=features.
"""

from .aligned import AlignedMTL
from .base import Balancer, check_losses
from .cagrad import CAGrad
from .dtp import DTP
from .dwa import DWA
from .fixed import EW, PRESETS, Fixed
from .gls import GLS
from .gradient import GradientBalancer
from .gradnorm import GradNorm
from .imtl import IMTLG
from .mgda import MGDA
from .nash import NashMTL
from .pcgrad import PCGrad
from .rlw import RLW
from .uncertainty import Uncertainty
from .upgrad import UPGrad

__all__ = [
    "DTP",
    "DWA",
    "EW",
    "GLS",
    "IMTLG",
    "MGDA",
    "PRESETS",
    "RLW",
    "AlignedMTL",
    "Balancer",
    "CAGrad",
    "Fixed",
    "GradNorm",
    "GradientBalancer",
    "NashMTL",
    "PCGrad",
    "UPGrad",
    "Uncertainty",
    "check_losses",
]
