"""Argument checks shared by the metric accumulators: clear errors that name the argument."""

from __future__ import annotations

import numpy as np
import torch


def as_tensor(x, name: str, owner: str) -> torch.Tensor:
    """A torch tensor from a tensor or a numpy array; anything else is a TypeError naming `name`."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{owner}: {name} must be a torch.Tensor (or numpy array), got {type(x).__name__}")


def map_bhw(x: torch.Tensor, name: str, owner: str, what: str) -> torch.Tensor:
    """[B, H, W] or [B, 1, H, W] -> [B, H, W]."""
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{owner}: {name} must be [B, H, W] or [B, 1, H, W] ({what}), got shape {tuple(x.shape)}")
    return x


def same_shape(pred: torch.Tensor, gt: torch.Tensor, owner: str, pred_name: str = "pred", gt_name: str = "gt"):
    if pred.shape != gt.shape:
        raise ValueError(
            f"{owner}: {pred_name} and {gt_name} must have the same batch and spatial size, got {pred_name} "
            f"{tuple(pred.shape)} and {gt_name} {tuple(gt.shape)} (resize the prediction to the target first)"
        )


def nan() -> float:
    return float("nan")
