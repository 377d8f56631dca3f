"""PASCAL-Context in the survey's PASCAL_MT layout (semseg, human_parts, normals, sal, edge).

root/
  JPEGImages/<id>.jpg                    RGB image
  ImageSets/Context/{train,val}.txt      image ids of the split, one per line
  semseg/VOC12/<id>.png                  semseg (21 classes, 0 background, 255 ignore), or
  semseg/pascal-context/<id>.png           the same from PASCAL-Context where VOC12 has none
  pascal-context/trainval/<id>.mat       'LabelMap': the 459-class PASCAL-Context labels (edges, normals mask)
  human_parts/<id>.mat                   'anno': PASCAL-Part objects and their part masks
  normals_distill/<id>.png               distilled normals, RGB (n + 1) * 255 / 2
  sal_distill/<id>.png                   distilled saliency, grey levels (> 127.5 salient)
  ImageSets/Parts/<split>.txt            optional: JSON {id: [object classes]} (used to find images with people)

Read as the survey code's PASCALContext reads them:
- semseg: the PNG's values as they are.
- edge: pixels where the Laplacian (4-neighbour, reflected border) of LabelMap is non-zero,
  thinned to one pixel (skimage.morphology.thin when scikit-image is installed, else a
  Zhang-Suen thinning written here; the two can differ on a few pixels).
- human_parts: for every person (class 15) with parts, each part mask painted with its group
  id (num_human_parts = 1, 4, 6 (default) or 14 groups), 0 elsewhere; 255 everywhere on images
  with no person parts (the survey's AddIgnoreRegions).
- normals: 2 * png / 255 - 1, kept only on pixels whose LabelMap class also exists in NYUD
  (the survey's NYU / Context class intersection plus tvmonitor), 255 elsewhere (its
  AddIgnoreRegions), renormalised to unit length.
- sal: png / 255 > 0.5.
Items follow ``mtl_kernels.data``: image [3, H, W], semseg / human_parts long [H, W], normals
[3, H, W], sal / edge [1, H, W], meta {"image": id, "im_size": (H, W)}. Targets of another size
than the image are resized to it with nearest neighbours. Only the files of the requested
tasks are required. With tasks=["human_parts"] alone, images without people are left out
(as the survey does, so batches have parts).
"""

from __future__ import annotations

import json
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

__all__ = ["PASCALContext", "PASCAL_TASKS", "HUMAN_PART_GROUPS", "NORMALS_VALID_CLASSES"]

PASCAL_TASKS = ("semseg", "human_parts", "normals", "sal", "edge")
PERSON = 15  # VOC class index of person

_HEAD = ("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye")
_P14 = {"neck": 2, "torso": 2, "ruarm": 3, "rlarm": 4, "rhand": 5, "luarm": 6, "llarm": 7, "lhand": 8}
_P14.update({"ruleg": 9, "rlleg": 10, "rfoot": 11, "luleg": 12, "llleg": 13, "lfoot": 14})
HUMAN_PART_GROUPS = {
    1: {p: 1 for p in (*_HEAD, *_P14)},
    4: {
        **{p: 1 for p in _HEAD},
        **{"neck": 2, "torso": 2},
        **{p: 3 for p in ("luarm", "llarm", "lhand", "ruarm", "rlarm", "rhand")},
        **{p: 4 for p in ("luleg", "llleg", "lfoot", "ruleg", "rlleg", "rfoot")},
    },
    6: {
        **{p: 1 for p in _HEAD},
        **{"neck": 2, "torso": 2, "luarm": 3, "ruarm": 3},
        **{p: 4 for p in ("llarm", "lhand", "rlarm", "rhand")},
        **{"luleg": 5, "ruleg": 5},
        **{p: 6 for p in ("llleg", "lfoot", "rlleg", "rfoot")},
    },
    14: {**{p: 1 for p in _HEAD}, **_P14},
}

# PASCAL-Context label ids (of its 459 classes) whose names are also NYUD classes, plus tvmonitor (427):
# the survey keeps distilled normals on these only.
NORMALS_VALID_CLASSES = frozenset(
    [3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55]
    + [56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113]
    + [115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193]
    + [195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250]
    + [251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293]
    + [295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357]
    + [368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421]
    + [423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457]
)

_LAYOUT = {
    "JPEGImages/<id>.jpg": "RGB images",
    "ImageSets/Context/<split>.txt": "image ids of the split, one per line",
    "semseg/VOC12/<id>.png or semseg/pascal-context/<id>.png": "semseg labels (task semseg)",
    "pascal-context/trainval/<id>.mat": "LabelMap (tasks edge and normals)",
    "human_parts/<id>.mat": "PASCAL-Part 'anno' struct (task human_parts)",
    "normals_distill/<id>.png": "distilled normals (task normals)",
    "sal_distill/<id>.png": "distilled saliency (task sal)",
}


def _laplacian_nonzero(labels: np.ndarray) -> np.ndarray:
    """cv2.Laplacian(labels) != 0 with its default 3x3 kernel and BORDER_REFLECT_101."""
    x = np.pad(labels.astype(np.float64), 1, mode="reflect")
    lap = x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * x[1:-1, 1:-1]
    return lap != 0


def thin(mask: np.ndarray) -> np.ndarray:
    """Thin a binary mask to one-pixel-wide lines (skimage's thin if available, else Zhang-Suen)."""
    try:
        from skimage.morphology import thin as sk_thin
    except ImportError:
        sk_thin = None
    if sk_thin is not None:
        return sk_thin(mask)
    img = mask.astype(bool).copy()
    while True:
        changed = False
        for step in (0, 1):
            p = np.pad(img, 1)
            n = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]
            nb = sum(x.astype(np.int32) for x in n)  # P2..P9: N, NE, E, SE, S, SW, W, NW
            trans = sum((~n[i] & n[(i + 1) % 8]).astype(np.int32) for i in range(8))
            p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
            if step == 0:
                c = ~(p2 & p4 & p6) & ~(p4 & p6 & p8)
            else:
                c = ~(p2 & p4 & p8) & ~(p2 & p6 & p8)
            delete = img & (nb >= 2) & (nb <= 6) & (trans == 1) & c
            if delete.any():
                img &= ~delete
                changed = True
        if not changed:
            return img


def _loadmat(path: Path):
    import scipy.io as sio

    try:
        return sio.loadmat(str(path))
    except Exception as e:
        raise ValueError(f"PASCALContext: cannot read {path}: {e}") from e


class PASCALContext(torch.utils.data.Dataset):
    """PASCAL-Context multi-task (the survey's PASCALContext). split: "train", "val" or a list."""

    num_classes = 21

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] = "val",
        tasks: Sequence[str] | None = None,
        transform: Callable[[dict], dict] | None = None,
        normalize: bool = True,
        num_human_parts: int = 6,
    ):
        self.root = Path(root)
        self.tasks = check_tasks("PASCALContext", tasks, PASCAL_TASKS)
        self.split = [split] if isinstance(split, str) else sorted(split)
        self.transform, self.normalize = transform, bool(normalize)
        if num_human_parts not in HUMAN_PART_GROUPS:
            raise ValueError(f"PASCALContext: num_human_parts must be one of {sorted(HUMAN_PART_GROUPS)}")
        self.num_human_parts = num_human_parts
        self.num_parts = num_human_parts + 1  # with the background part 0
        self.part_groups = HUMAN_PART_GROUPS[num_human_parts]
        missing: list[str] = []
        if not self.root.is_dir():
            missing.append(f"{self.root} (the dataset directory itself)")
        self.ids: list[str] = []
        for s in self.split:
            f = self.root / "ImageSets" / "Context" / f"{s}.txt"
            if not f.is_file():
                missing.append(str(f))
                continue
            self.ids += [line.strip() for line in f.read_text().splitlines() if line.strip()]
        for i in self.ids:
            for path in self._paths(i).values():
                if isinstance(path, tuple):
                    if not any(p.is_file() for p in path):
                        missing.append(" or ".join(str(p) for p in path))
                elif not path.is_file():
                    missing.append(str(path))
        check_layout("PASCALContext", self.root, _LAYOUT, missing)
        if not self.ids:
            raise ValueError(f"PASCALContext: the split file(s) {self.split} list no images")
        if self.tasks == ("human_parts",):
            self.ids = [i for i in self.ids if self._has_person(i)]

    def _paths(self, i: str) -> dict:
        r = self.root
        out = {"image": r / "JPEGImages" / f"{i}.jpg"}
        if "semseg" in self.tasks:
            out["semseg"] = (r / "semseg" / "VOC12" / f"{i}.png", r / "semseg" / "pascal-context" / f"{i}.png")
        if "edge" in self.tasks or "normals" in self.tasks:
            out["labelmap"] = r / "pascal-context" / "trainval" / f"{i}.mat"
        if "human_parts" in self.tasks:
            out["human_parts"] = r / "human_parts" / f"{i}.mat"
        if "normals" in self.tasks:
            out["normals"] = r / "normals_distill" / f"{i}.png"
        if "sal" in self.tasks:
            out["sal"] = r / "sal_distill" / f"{i}.png"
        return out

    def _has_person(self, i: str) -> bool:
        if not hasattr(self, "_part_index"):
            self._part_index = {}
            for s in self.split:
                f = self.root / "ImageSets" / "Parts" / f"{s}.txt"
                if f.is_file():
                    try:
                        self._part_index.update(json.loads(f.read_text()))
                    except ValueError as e:
                        raise ValueError(f"PASCALContext: {f} is not the survey's JSON {{id: [classes]}}: {e}") from e
        if i in self._part_index:
            return PERSON in [int(c) for c in self._part_index[i]]
        return any(int(cls) == PERSON for cls, _, _ in self._objects(i))

    def _objects(self, i: str):
        """(class index, instance mask, [(part name, mask)]) for each object of human_parts/<id>.mat."""
        path = self.root / "human_parts" / f"{i}.mat"
        mat = _loadmat(path)
        try:
            objects = mat["anno"][0][0][1][0]
            out = []
            for obj in objects:
                parts = obj[3]
                plist = [(str(parts[0][k][0][0]), parts[0][k][1]) for k in range(parts.shape[1])] if parts.size else []
                out.append((int(obj[1][0][0]), obj[2], plist))
            return out
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(
                f"PASCALContext: {path} is not a PASCAL-Part annotation (expected 'anno' with objects "
                f"(class, class_ind, mask, parts(part_name, mask))): {e!r}"
            ) from e

    def _labelmap(self, i: str) -> np.ndarray:
        path = self.root / "pascal-context" / "trainval" / f"{i}.mat"
        mat = _loadmat(path)
        if "LabelMap" not in mat:
            raise ValueError(f"PASCALContext: {path} has no 'LabelMap' (keys: {sorted(mat)})")
        return np.asarray(mat["LabelMap"])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        i = self.ids[index]
        paths = self._paths(i)
        image = load_image(paths["image"])
        hw = tuple(image.shape[-2:])
        sample = {"image": image}
        labelmap = self._labelmap(i) if "labelmap" in paths else None
        if "semseg" in self.tasks:
            path = next(p for p in paths["semseg"] if p.is_file())
            with Image.open(path) as im:
                seg = np.array(im, dtype=np.int64)
            if seg.ndim != 2:
                raise ValueError(f"PASCALContext: {path} must be a single-channel label image, got {seg.shape}")
            sample["semseg"] = resize_nearest(torch.from_numpy(seg), hw)
        if "human_parts" in self.tasks:
            target = None
            for cls, mask, parts in self._objects(i):
                if cls != PERSON or not parts:
                    continue
                if target is None:
                    target = np.zeros(np.shape(mask), dtype=np.int64)
                for name, pmask in parts:
                    if name not in self.part_groups:
                        raise ValueError(f"PASCALContext: unknown person part {name!r} in human_parts/{i}.mat")
                    target[np.asarray(pmask).astype(bool)] = self.part_groups[name]
            if target is None or not target.any():
                target = np.full(hw, IGNORE, dtype=np.int64)
            sample["human_parts"] = resize_nearest(torch.from_numpy(target), hw)
        if "normals" in self.tasks:
            with Image.open(paths["normals"]) as im:
                nrm = np.asarray(im.convert("RGB"), dtype=np.float32) * (2.0 / 255.0) - 1.0
            valid = np.isin(labelmap, list(NORMALS_VALID_CLASSES))
            if valid.shape != nrm.shape[:2]:
                valid = resize_nearest(torch.from_numpy(valid), nrm.shape[:2]).numpy()
            n = torch.from_numpy(nrm).permute(2, 0, 1)
            n = n / n.norm(dim=0, keepdim=True).clamp_min(1e-12)
            ok = torch.from_numpy(valid)[None] & (n.norm(dim=0, keepdim=True) > 0.5)
            sample["normals"] = resize_nearest(torch.where(ok, n, torch.tensor(float(IGNORE))).contiguous(), hw)
        if "sal" in self.tasks:
            with Image.open(paths["sal"]) as im:
                sal = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            sample["sal"] = resize_nearest(torch.from_numpy((sal > 0.5).astype(np.float32))[None], hw)
        if "edge" in self.tasks:
            edge = thin(_laplacian_nonzero(labelmap)).astype(np.float32)
            sample["edge"] = resize_nearest(torch.from_numpy(edge)[None], hw)
        sample["meta"] = {"image": i, "im_size": hw}
        if self.transform is not None:
            sample = self.transform(sample)
        if self.normalize:
            sample["image"] = normalize_image(sample["image"], IMAGENET_MEAN, IMAGENET_STD)
        return sample

    def __repr__(self) -> str:
        return f"PASCALContext(root={str(self.root)!r}, split={self.split}, tasks={list(self.tasks)}, n={len(self)})"
