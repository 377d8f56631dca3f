"""Semantic segmentation and human parts: mIoU from a confusion matrix accumulated over the dataset.

The survey (evaluation/eval_semseg.py, eval_human_parts.py, SemsegMeter / HumanPartsMeter) counts,
over every valid pixel (target != 255) of the whole dataset, tp, fp and fn per class, then

    IoU_c = tp_c / max(tp_c + fp_c + fn_c, 1e-8),    mIoU = mean over all C classes of IoU_c,

so a class that never occurs in the targets nor in the predictions has IoU 0 and still counts in
the mean (``ignore_absent=True`` averages over the classes that occur instead). Here the counts
come from one C x (C + 1) confusion matrix (rows: target class, columns: predicted class, the
last column every predicted label outside [0, C)), accumulated with one bincount per batch on the
tensors' device: a predicted label outside [0, C) is a false negative of the target's class and a
false positive of no class, as in the survey's per-class loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import as_tensor, map_bhw, nan, same_shape

VOC_CATEGORY_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
NYU_CATEGORY_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes",
    "ceiling", "books", "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard",
    "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture",
    "otherprop",
)  # fmt: skip
PART_CATEGORY_NAMES = ("background", "head", "torso", "uarm", "larm", "uleg", "lleg")


class SemsegMeter:
    """mIoU, per-class IoU and pixel accuracy of a segmentation, accumulated over batches.

    num_classes: C; None takes it from the first logits given to update() (labels need it set).
    ignore_index: target value of pixels that are not evaluated (255, as the survey).
    class_names: names for the per-class keys of compute() (IoU_<name>); default IoU_<index>.
    ignore_absent: False (the survey): mIoU averages all C classes, a class absent from both the
        targets and the predictions counting as IoU 0; True: only classes with tp + fp + fn > 0.
    per_class: whether compute() lists the per-class IoUs.

    update(pred, gt): pred [B, C, H, W] scores or logits (argmax over C) or [B, H, W] /
    [B, 1, H, W] integer labels; gt [B, H, W] or [B, 1, H, W] labels in [0, C) or ignore_index.
    compute() -> {"mIoU", "pixel_acc", "IoU_<name>"...} as fractions in [0, 1]; NaN before any
    valid pixel was seen.
    """

    name = "SemsegMeter"

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        ignore_absent: bool = False,
        per_class: bool = True,
    ):
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"{self.name}: num_classes must be a positive int or None, got {num_classes!r}")
        if class_names is not None:
            class_names = tuple(str(c) for c in class_names)
            if num_classes is not None and len(class_names) != num_classes:
                raise ValueError(f"{self.name}: class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)
        self.class_names = class_names
        self.ignore_absent = bool(ignore_absent)
        self.per_class = bool(per_class)
        self.reset()

    def reset(self) -> None:
        self._cm = None  # [C, C + 1] int64 on the device of the first update

    @torch.no_grad()
    def update(self, pred, gt) -> None:
        pred = as_tensor(pred, "pred", self.name)
        gt = map_bhw(as_tensor(gt, "gt", self.name), "gt", self.name, "class labels")
        if pred.dim() == 4 and pred.shape[1] != 1:
            if not pred.is_floating_point():
                raise ValueError(
                    f"{self.name}: pred of shape {tuple(pred.shape)} looks like per-class scores [B, C, H, W] "
                    f"but has dtype {pred.dtype}; give float scores or [B, H, W] labels"
                )
            if self.num_classes is None:
                self._set_num_classes(pred.shape[1])
            elif pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"{self.name}: pred has {pred.shape[1]} channels but num_classes is {self.num_classes}"
                )
            labels = pred.argmax(dim=1)
        else:
            labels = map_bhw(pred, "pred", self.name, "class labels, or [B, C, H, W] scores")
            if labels.is_floating_point():
                labels = labels.round()
            if self.num_classes is None:
                raise ValueError(
                    f"{self.name}: num_classes is needed when pred is labels (or give [B, C, H, W] scores first)"
                )
        same_shape(labels, gt, self.name)
        C = self.num_classes
        labels = labels.to(gt.device).long()
        gt = gt.long()
        valid = gt != self.ignore_index
        bad = valid & ((gt < 0) | (gt >= C))
        if bool(bad.any()):
            found = torch.unique(gt[bad])[:8].tolist()
            raise ValueError(
                f"{self.name}: gt has labels {found} outside [0, {C}) that are not ignore_index={self.ignore_index}"
            )
        g = gt[valid]
        p = labels[valid]
        p = torch.where((p >= 0) & (p < C), p, torch.full_like(p, C))
        counts = torch.bincount(g * (C + 1) + p, minlength=C * (C + 1)).view(C, C + 1)
        if self._cm is None:
            self._cm = counts
        else:
            self._cm += counts.to(self._cm.device)

    def _set_num_classes(self, c: int) -> None:
        if self.class_names is not None and len(self.class_names) != c:
            raise ValueError(f"{self.name}: class_names has {len(self.class_names)} names but pred has {c} channels")
        self.num_classes = int(c)

    def confusion_matrix(self) -> torch.Tensor:
        """[C, C + 1] int64 counts on the CPU: rows target class, columns predicted class (last: out of range)."""
        if self._cm is None:
            c = self.num_classes or 0
            return torch.zeros(c, c + 1, dtype=torch.int64)
        return self._cm.cpu()

    def iou(self) -> torch.Tensor:
        """Per-class IoU [C] float64, the survey's tp / max(tp + fp + fn, 1e-8)."""
        cm = self.confusion_matrix().double()
        C = cm.shape[0]
        tp = cm.diagonal()
        fn = cm.sum(1) - tp
        fp = cm[:, :C].sum(0) - tp
        return tp / torch.clamp(tp + fp + fn, min=1e-8)

    def compute(self) -> dict[str, float]:
        cm = self.confusion_matrix().double()
        if self._cm is None or cm.sum() == 0:
            out = {"mIoU": nan(), "pixel_acc": nan()}
            return out
        C = cm.shape[0]
        tp = cm.diagonal()
        union = cm.sum(1) + cm[:, :C].sum(0) - tp
        iou = tp / torch.clamp(union, min=1e-8)
        if self.ignore_absent:
            present = union > 0
            miou = float(iou[present].mean()) if bool(present.any()) else nan()
        else:
            miou = float(iou.mean())
        out = {"mIoU": miou, "pixel_acc": float(tp.sum() / cm.sum())}
        if self.per_class:
            names = self.class_names or [str(i) for i in range(C)]
            out.update({f"IoU_{n}": float(v) for n, v in zip(names, iou.tolist())})
        return out


class HumanPartsMeter(SemsegMeter):
    """SemsegMeter for the survey's human parts (PASCAL-Context: 7 classes, background and 6 parts).

    The survey's offline evaluation (eval_human_parts) skips images whose target is one value, all
    255 or all 0 (no person annotated); its online HumanPartsMeter does not. ``skip_empty=True``
    (default) follows the offline evaluation, so person-free images do not inflate the background
    IoU; False counts every image.
    """

    name = "HumanPartsMeter"

    def __init__(
        self,
        num_classes: int | None = 7,
        *,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        ignore_absent: bool = False,
        per_class: bool = True,
        skip_empty: bool = True,
    ):
        if class_names is None and num_classes == len(PART_CATEGORY_NAMES):
            class_names = PART_CATEGORY_NAMES
        self.skip_empty = bool(skip_empty)
        super().__init__(
            num_classes,
            ignore_index=ignore_index,
            class_names=class_names,
            ignore_absent=ignore_absent,
            per_class=per_class,
        )

    @torch.no_grad()
    def update(self, pred, gt) -> None:
        if not self.skip_empty:
            return super().update(pred, gt)
        gt_t = map_bhw(as_tensor(gt, "gt", self.name), "gt", self.name, "class labels")
        flat = gt_t.flatten(1)
        keep = ~((flat == self.ignore_index).all(1) | (flat == 0).all(1))
        if bool(keep.all()):
            return super().update(pred, gt_t)
        if not bool(keep.any()):
            return None
        pred_t = as_tensor(pred, "pred", self.name)
        if pred_t.shape[0] != gt_t.shape[0]:
            raise ValueError(
                f"{self.name}: pred and gt have different batch sizes, {pred_t.shape[0]} and {gt_t.shape[0]}"
            )
        idx = keep.nonzero().flatten()
        return super().update(pred_t[idx.to(pred_t.device)], gt_t[idx])
