"""Surface normals: angular error statistics over every valid pixel of the dataset.

The survey's offline evaluation (evaluation/eval_normals.py, from ASTMT) normalises the prediction
and the target to unit length (x / (||x|| + 1e-12)), takes the angle
acos(clip(<pred, gt>, -1, 1)) in degrees at every valid pixel (target of non-zero norm) of every
image, pools all of them and reports their mean, median, RMSE (sqrt of the mean squared angle) and
the percentage of pixels under 11.25, 22.5 and 30 degrees. (Its online NormalsMeter reports the
mean under the name rmse and has no median; the offline numbers are the published ones and are the
ones computed here.) A target pixel is invalid where any channel is ignore_index (255, the
survey's padding value), its norm is 0, or it is not finite.

Sums are exact (float64). The median is read from a histogram of the angles with bins of
``median_resolution`` degrees (default 0.001; memory 180 / resolution counters, independent of the
dataset size), so it is within half a bin of numpy's median of the pooled angles.
"""

from __future__ import annotations

import math

import torch

from ._checks import as_tensor, nan, same_shape

THRESHOLDS = (11.25, 22.5, 30.0)


class NormalsMeter:
    """Mean, median and RMSE angular error (degrees) and % of pixels under 11.25 / 22.5 / 30 degrees.

    update(pred, gt): pred and gt [B, 3, H, W] normal vectors (pred of any length: it is
    normalised first). compute() -> {"mean", "median", "rmse", "11.25", "22.5", "30"} (the
    survey's keys; the last three in percent); NaN before any valid pixel was seen.
    """

    name = "NormalsMeter"

    def __init__(self, *, ignore_index: float = 255.0, median_resolution: float = 1e-3):
        if not median_resolution > 0:
            raise ValueError(f"{self.name}: median_resolution must be > 0 degrees, got {median_resolution}")
        self.ignore_index = float(ignore_index)
        self.median_resolution = float(median_resolution)
        self.num_bins = int(math.ceil(180.0 / self.median_resolution))
        self.reset()

    def reset(self) -> None:
        self._sum = None  # [sum angle, sum angle^2, n, n < 11.25, n < 22.5, n < 30] float64
        self._hist = None

    def _check(self, x, name):
        x = as_tensor(x, name, self.name)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: {name} must be [B, 3, H, W] normal vectors, got shape {tuple(x.shape)}")
        return x

    @torch.no_grad()
    def update(self, pred, gt) -> None:
        pred = self._check(pred, "pred")
        gt = self._check(gt, "gt")
        same_shape(pred, gt, self.name)
        gt = gt.double()
        pred = pred.to(gt.device).double()
        gnorm = torch.linalg.vector_norm(gt, dim=1)
        valid = (gt != self.ignore_index).all(1) & torch.isfinite(gt).all(1) & (gnorm != 0)
        pred = pred / (torch.linalg.vector_norm(pred, dim=1, keepdim=True) + 1e-12)
        gt = gt / (gnorm.unsqueeze(1) + 1e-12)
        cos = torch.clamp((pred * gt).sum(1)[valid], -1.0, 1.0)
        deg = torch.rad2deg(torch.acos(cos))
        deg = torch.nan_to_num(deg, nan=180.0)  # a NaN prediction counts as the worst error
        stats = torch.stack(
            [deg.sum(), (deg**2).sum(), torch.tensor(float(deg.numel()), dtype=torch.float64, device=deg.device)]
            + [(deg < t).sum().double() for t in THRESHOLDS]
        )
        bins = torch.clamp((deg / self.median_resolution).long(), 0, self.num_bins - 1)
        hist = torch.bincount(bins, minlength=self.num_bins)
        if self._sum is None:
            self._sum, self._hist = stats, hist
        else:
            self._sum += stats.to(self._sum.device)
            self._hist += hist.to(self._hist.device)

    def _median(self) -> float:
        hist = self._hist.cpu()
        cum = torch.cumsum(hist, 0)
        n = int(cum[-1])
        ranks = torch.tensor([(n - 1) // 2 + 1, n // 2 + 1], dtype=cum.dtype)  # 1-based ranks of the middle
        idx = torch.searchsorted(cum, ranks)
        return float(((idx.double() + 0.5) * self.median_resolution).mean())

    def compute(self) -> dict[str, float]:
        if self._sum is None or float(self._sum[2]) == 0:
            return {k: nan() for k in ("mean", "median", "rmse", "11.25", "22.5", "30")}
        s = self._sum.cpu().tolist()
        n = s[2]
        return {
            "mean": s[0] / n,
            "median": self._median(),
            "rmse": math.sqrt(s[1] / n),
            "11.25": 100.0 * s[3] / n,
            "22.5": 100.0 * s[4] / n,
            "30": 100.0 * s[5] / n,
        }
