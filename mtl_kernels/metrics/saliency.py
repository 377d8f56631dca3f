"""Saliency: maxF and mIoU over 15 thresholds, averaged over images as the survey does.

The survey (evaluation/eval_sal.py and jaccard.py, from ASTMT) binarises the predicted saliency
probability at each of 15 thresholds, np.linspace(0.2, 0.9, 15), with ``pred > t``, and per image
and threshold computes

    jaccard   = |gt & mask| / |gt | mask|      (1 when both are empty)
    precision = tp / (tp + fp + 1e-12),   recall = tp / (tp + fn + 1e-12)

then averages each over the images, per threshold, and reports

    F_t  = (1 + beta^2) mP_t mR_t / (beta^2 mP_t + mR_t + 1e-12),   maxF = max_t F_t
    mIoU = max_t (mean over images of jaccard_t)

that is, the mIoU reported is also a maximum over the thresholds, and maxF is taken from the
averaged precision and recall, not from per-image F. The survey code's F is
2 P R / (P + R + 1e-12), i.e. beta^2 = 1: that is the default here. beta^2 = 0.3 (the usual
salient-object-detection convention) is available with ``beta2=0.3``. The target is positive where
it is non-zero (the survey's gt.astype(bool)); pixels equal to ignore_index (255) are left out,
as jaccard.py's void pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from ._checks import as_tensor, map_bhw, nan, same_shape

SURVEY_THRESHOLDS = tuple(np.linspace(0.2, 0.9, 15).tolist())


class SaliencyMeter:
    """maxF and mIoU (each the best over thresholds) of saliency probabilities, averaged over images.

    thresholds: the binarisation thresholds (default the survey's 15, 0.2 ... 0.9).
    beta2: beta^2 of the F-measure (default 1.0, the survey code; 0.3 is the SOD convention).
    logits: pred is a logit, passed through a sigmoid first (default: pred is a probability).

    update(pred, gt): pred [B, H, W] or [B, 1, H, W] probabilities; gt the same shape, 0 / 1
    (any non-zero value is salient), ignore_index (255) not evaluated.
    compute() -> {"maxF", "mIoU", "maxF_threshold", "mIoU_threshold"}; NaN before any image.
    curves() -> per-threshold mean precision, recall, F and IoU as lists.
    """

    name = "SaliencyMeter"

    def __init__(
        self,
        thresholds=SURVEY_THRESHOLDS,
        *,
        beta2: float = 1.0,
        logits: bool = False,
        ignore_index: float = 255.0,
    ):
        thresholds = [float(t) for t in thresholds]
        if not thresholds:
            raise ValueError(f"{self.name}: thresholds must not be empty")
        if not beta2 > 0:
            raise ValueError(f"{self.name}: beta2 must be > 0, got {beta2}")
        self.thresholds = thresholds
        self.beta2 = float(beta2)
        self.logits = bool(logits)
        self.ignore_index = float(ignore_index)
        self.reset()

    def reset(self) -> None:
        self._sums = None  # [3, T] float64: sum over images of jaccard, precision, recall
        self._n = 0

    @torch.no_grad()
    def update(self, pred, gt) -> None:
        pred = map_bhw(as_tensor(pred, "pred", self.name), "pred", self.name, "saliency probabilities")
        gt = map_bhw(as_tensor(gt, "gt", self.name), "gt", self.name, "saliency targets")
        same_shape(pred, gt, self.name)
        # Compared with the thresholds in the prediction's own precision, as the survey's float32
        # maps: in float64 a float32 51/255 (0.20000000298) would count as above 0.2.
        pred = pred.to(gt.device)
        if pred.dtype not in (torch.float32, torch.float64):
            pred = pred.float()
        if self.logits:
            pred = torch.sigmoid(pred)
        elif pred.numel() and bool(((pred < 0) | (pred > 1)).any()):
            raise ValueError(
                f"{self.name}: pred has values outside [0, 1] (min {float(pred.min()):.4g}, max "
                f"{float(pred.max()):.4g}); it must be probabilities, or pass logits=True for logits"
            )
        B = gt.shape[0]
        gt = gt.flatten(1)
        pred = pred.flatten(1)
        valid = gt != self.ignore_index
        pos = (gt != 0) & valid
        n_pos = pos.sum(1)
        sums = torch.zeros(3, len(self.thresholds), dtype=torch.float64, device=gt.device)
        for j, t in enumerate(self.thresholds):  # one vectorised pass over the batch per threshold
            mask = (pred > t) & valid
            tp = (mask & pos).sum(1).double()
            n_mask = mask.sum(1).double()
            fp = n_mask - tp
            fn = n_pos.double() - tp
            union = tp + fp + fn
            jac = torch.where(union > 0, tp / torch.clamp(union, min=1.0), torch.ones_like(tp))
            sums[0, j] = jac.sum()
            sums[1, j] = (tp / (tp + fp + 1e-12)).sum()
            sums[2, j] = (tp / (tp + fn + 1e-12)).sum()
        if self._sums is None:
            self._sums = sums
        else:
            self._sums += sums.to(self._sums.device)
        self._n += B

    def curves(self) -> dict[str, list[float]]:
        if self._n == 0:
            return {"thresholds": list(self.thresholds), "precision": [], "recall": [], "F": [], "IoU": []}
        m = (self._sums / self._n).cpu()
        iou, p, r = m[0], m[1], m[2]
        f = (1 + self.beta2) * p * r / (self.beta2 * p + r + 1e-12)
        return {
            "thresholds": list(self.thresholds),
            "precision": p.tolist(),
            "recall": r.tolist(),
            "F": f.tolist(),
            "IoU": iou.tolist(),
        }

    def compute(self) -> dict[str, float]:
        if self._n == 0:
            return {"maxF": nan(), "mIoU": nan(), "maxF_threshold": nan(), "mIoU_threshold": nan()}
        c = self.curves()
        jf = int(np.argmax(c["F"]))
        ji = int(np.argmax(c["IoU"]))
        return {
            "maxF": float(c["F"][jf]),
            "mIoU": float(c["IoU"][ji]),
            "maxF_threshold": self.thresholds[jf],
            "mIoU_threshold": self.thresholds[ji],
        }
