"""Aligned-MTL, independent component alignment (Senushkin, Patakin, Kuznetsov and Konushin, CVPR 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .gradient import GradientBalancer

SCALES = ("min", "median", "rmse")


class AlignedMTL(GradientBalancer):
    """Aligned-MTL: make the system of task gradients perfectly conditioned, then sum it.

    With the gradients as columns of J and G = J^T J = V diag(lambda) V^T, the balance transformation
    B = sqrt(lambda_s) V diag(lambda)^(-1/2) V^T makes the Gram of the aligned gradients J B equal to
    lambda_s I (condition number 1: orthogonal components of equal norm), and the update is their sum,
    J B 1: weights alpha = B 1. lambda_s is the smallest eigenvalue ("min", the paper's choice and the
    default), the median ("median", the lower median as torch.median) or the mean ("rmse") of the kept
    eigenvalues. As in the official code, eigenvalues <= lambda_max * T * eps(float32) are dropped
    (a pseudo-inverse on the span of the gradients). With shared_repr the gradients are those of the
    shared representation: the paper's Aligned-MTL-UB.

    The eigendecomposition is torch.linalg.eigh on the device. Note: on CUDA, torch.linalg.eigh checks
    its error flag on the host (torch has no eigh_ex), so this is the one method whose solve
    synchronises once; everything else stays on the device.
    """

    def __init__(self, tasks: Sequence[str], scale: str = "min", scaler: torch.amp.GradScaler | None = None):
        super().__init__(tasks, scaler)
        if scale not in SCALES:
            raise ValueError(f"AlignedMTL: scale must be one of {SCALES}, got {scale!r}")
        self.scale = scale

    def balance_matrix(self, G: Tensor) -> Tensor:
        """B = sqrt(lambda_s) V diag(lambda)^(-1/2) V^T on the kept eigenvalues, [T, T]."""
        T = G.shape[0]
        lam, V = torch.linalg.eigh(G)  # ascending
        keep = lam > lam[-1] * T * torch.finfo(torch.float32).eps
        n = keep.sum()
        if self.scale == "min":
            s = torch.where(keep, lam, torch.inf).min()
        elif self.scale == "median":
            # The kept eigenvalues are the last n; the lower median is the ((n - 1) // 2)-th of them.
            s = lam.gather(0, (T - n + (n - 1).clamp_min(0) // 2).clamp(0, T - 1).view(1))[0]
        else:
            s = torch.where(keep, lam, 0.0).sum() / n.clamp_min(1)
        inv = torch.where(keep, lam.clamp_min(torch.finfo(G.dtype).tiny).rsqrt(), 0.0)
        B = (V * inv[None, :]) @ V.T
        # No gradient at all (nothing kept): B = 0 rather than inf * 0.
        return torch.where(keep.any(), s.clamp_min(0).sqrt(), 0.0) * B

    def solve(self, G: Tensor, losses: Tensor) -> Tensor:
        return self.balance_matrix(G).sum(1)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, scale={self.scale!r}"
