"""Depth: RMSE and log-RMSE pooled over every valid pixel of the dataset.

The survey (evaluation/eval_depth.py) sums squared errors over the valid pixels of all images and
takes one square root at the end (not a mean of per-image RMSEs):

    rmse     = sqrt( sum (gt - pred)^2 / n_valid )
    log_rmse = sqrt( sum (log gt - log pred)^2 / n_valid )

with the prediction clamped to at least 1e-9 first (so log pred is finite; a prediction <= 0
costs a large log error). Its offline eval_depth takes target 0 as missing depth (NYUD's holes)
and its online DepthMeter takes 255 (the padding value); both are invalid here, as are negative
and non-finite targets, so log gt is always defined.
"""

from __future__ import annotations

import math

import torch

from ._checks import as_tensor, map_bhw, nan, same_shape


class DepthMeter:
    """RMSE and log-RMSE of depth, pooled over the valid pixels of every batch.

    update(pred, gt): pred and gt [B, H, W] or [B, 1, H, W]; valid target pixels are finite,
    > 0 and != ignore_index (255). compute() -> {"rmse", "log_rmse"}, in the targets' unit; NaN
    before any valid pixel was seen.
    """

    name = "DepthMeter"

    def __init__(self, *, ignore_index: float = 255.0, min_pred: float = 1e-9):
        self.ignore_index = float(ignore_index)
        self.min_pred = float(min_pred)
        self.reset()

    def reset(self) -> None:
        self._sq = None
        self._log_sq = None
        self._n = None

    @torch.no_grad()
    def update(self, pred, gt) -> None:
        pred = map_bhw(as_tensor(pred, "pred", self.name), "pred", self.name, "depth")
        gt = map_bhw(as_tensor(gt, "gt", self.name), "gt", self.name, "depth")
        same_shape(pred, gt, self.name)
        gt = gt.double()
        pred = pred.to(gt.device).double()
        valid = torch.isfinite(gt) & (gt > 0) & (gt != self.ignore_index)
        g = gt[valid]
        p = torch.clamp(pred[valid], min=self.min_pred)
        sq = ((g - p) ** 2).sum()
        log_sq = ((torch.log(g) - torch.log(p)) ** 2).sum()
        n = valid.sum()
        if self._n is None:
            self._sq, self._log_sq, self._n = sq, log_sq, n
        else:
            dev = self._n.device
            self._sq += sq.to(dev)
            self._log_sq += log_sq.to(dev)
            self._n += n.to(dev)

    def compute(self) -> dict[str, float]:
        n = 0 if self._n is None else int(self._n)
        if n == 0:
            return {"rmse": nan(), "log_rmse": nan()}
        return {"rmse": math.sqrt(float(self._sq) / n), "log_rmse": math.sqrt(float(self._log_sq) / n)}
