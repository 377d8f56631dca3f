"""NYUD-v2 in the survey's NYUD_MT layout (semseg, depth, normals, edge).

root/
  images/<id>.jpg           RGB image
  segmentation/<id>.png     40 classes as 1..40, 0 unlabelled -> semseg 0..39, 255 ignore
  depth/<id>.npy            [H, W] metric depth (0 or non-finite: missing -> 255 ignore)
  normals/<id>.npy          [H, W, 3] unit normals (zero vectors: missing -> 255 ignore)
  edge/<id>.npy             [H, W] binary edges
  gt_sets/{train,val}.txt   one <id> per line

Items follow ``mtl_kernels.data`` (see its docstring): image [3, H, W] (ImageNet-normalised
unless normalize=False), semseg long [H, W], depth [1, H, W], normals [3, H, W], edge [1, H, W],
meta {"image": id, "im_size": (H, W)}. Ignore regions are marked as the survey's
AddIgnoreRegions does (depth 0 -> 255, zero normals -> 255). Targets whose size differs from
the image's are resized to it with nearest neighbours, as the survey does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ._common import (
    IGNORE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_layout,
    check_tasks,
    load_image,
    normalize_image,
    resize_nearest,
)

__all__ = ["NYUD", "NYUD_TASKS"]

NYUD_TASKS = ("semseg", "depth", "normals", "edge")
_DIRS = {"semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"), "normals": ("normals", ".npy")}
_DIRS["edge"] = ("edge", ".npy")
_LAYOUT = {
    "images/<id>.jpg": "RGB images",
    "segmentation/<id>.png": "semseg: 0 unlabelled, 1..40 classes (for task semseg)",
    "depth/<id>.npy": "float [H, W] depth in metres (for task depth)",
    "normals/<id>.npy": "float [H, W, 3] surface normals (for task normals)",
    "edge/<id>.npy": "[H, W] 0/1 edges (for task edge)",
    "gt_sets/<split>.txt": "image ids of the split, one per line",
}


class NYUD(torch.utils.data.Dataset):
    """NYUD-v2 multi-task (the survey's NYUD_MT). split: "train", "val" or a list of splits."""

    num_classes = 40

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] = "val",
        tasks: Sequence[str] | None = None,
        transform: Callable[[dict], dict] | None = None,
        normalize: bool = True,
    ):
        self.root = Path(root)
        self.tasks = check_tasks("NYUD", tasks, NYUD_TASKS)
        self.split = [split] if isinstance(split, str) else sorted(split)
        self.transform, self.normalize = transform, bool(normalize)
        missing: list[str] = []
        if not self.root.is_dir():
            missing.append(f"{self.root} (the dataset directory itself)")
        self.ids: list[str] = []
        for s in self.split:
            f = self.root / "gt_sets" / f"{s}.txt"
            if not f.is_file():
                missing.append(str(f))
                continue
            self.ids += [line.strip() for line in f.read_text().splitlines() if line.strip()]
        for i in self.ids:
            if not (self.root / "images" / f"{i}.jpg").is_file():
                missing.append(str(self.root / "images" / f"{i}.jpg"))
            for t in self.tasks:
                d, ext = _DIRS[t]
                if not (self.root / d / f"{i}{ext}").is_file():
                    missing.append(str(self.root / d / f"{i}{ext}"))
        check_layout("NYUD", self.root, _LAYOUT, missing)
        if not self.ids:
            raise ValueError(f"NYUD: the split file(s) {self.split} under {self.root / 'gt_sets'} list no images")

    def __len__(self) -> int:
        return len(self.ids)

    def _npy(self, task: str, i: str) -> np.ndarray:
        d, ext = _DIRS[task]
        path = self.root / d / f"{i}{ext}"
        try:
            return np.load(path)
        except Exception as e:
            raise ValueError(f"NYUD: cannot read {path}: {e}") from e

    def __getitem__(self, index: int) -> dict:
        i = self.ids[index]
        image = load_image(self.root / "images" / f"{i}.jpg")
        hw = tuple(image.shape[-2:])
        sample = {"image": image}
        if "semseg" in self.tasks:
            from PIL import Image

            path = self.root / "segmentation" / f"{i}.png"
            with Image.open(path) as im:
                seg = torch.from_numpy(np.array(im, dtype=np.int64))
            if seg.dim() != 2:
                raise ValueError(f"NYUD: {path} must be a single-channel label image, got shape {tuple(seg.shape)}")
            sample["semseg"] = resize_nearest(torch.where(seg == 0, IGNORE, seg - 1), hw)
        if "depth" in self.tasks:
            dep = self._npy("depth", i).astype(np.float32)
            if dep.ndim == 3 and dep.shape[-1] == 1:
                dep = dep[..., 0]
            if dep.ndim != 2:
                raise ValueError(f"NYUD: depth/{i}.npy must be [H, W], got shape {dep.shape}")
            dep = torch.from_numpy(dep)
            dep = torch.where(torch.isfinite(dep) & (dep > 0), dep, torch.tensor(float(IGNORE)))
            sample["depth"] = resize_nearest(dep[None], hw)
        if "normals" in self.tasks:
            nrm = self._npy("normals", i).astype(np.float32)
            if nrm.ndim != 3 or nrm.shape[-1] != 3:
                raise ValueError(f"NYUD: normals/{i}.npy must be [H, W, 3], got shape {nrm.shape}")
            nrm = torch.from_numpy(nrm).permute(2, 0, 1)
            bad = (nrm.norm(dim=0, keepdim=True) == 0) | ~torch.isfinite(nrm).all(0, keepdim=True)
            sample["normals"] = resize_nearest(torch.where(bad, torch.tensor(float(IGNORE)), nrm).contiguous(), hw)
        if "edge" in self.tasks:
            edge = self._npy("edge", i).astype(np.float32)
            if edge.ndim != 2:
                raise ValueError(f"NYUD: edge/{i}.npy must be [H, W], got shape {edge.shape}")
            sample["edge"] = resize_nearest(torch.from_numpy(edge)[None], hw)
        sample["meta"] = {"image": i, "im_size": hw}
        if self.transform is not None:
            sample = self.transform(sample)
        if self.normalize:
            sample["image"] = normalize_image(sample["image"], IMAGENET_MEAN, IMAGENET_STD)
        return sample

    def __repr__(self) -> str:
        return f"NYUD(root={str(self.root)!r}, split={self.split}, tasks={list(self.tasks)}, n={len(self)})"
