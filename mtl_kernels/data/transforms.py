"""The survey's joint augmentations, on the item dicts of ``mtl_kernels.data`` (torch tensors).

Every transform takes and returns a sample dict {"image": [3, H, W] float, "semseg": [H, W] long,
"depth": [1, H, W], "normals": [3, H, W], "edge": [1, H, W], "sal": [1, H, W], "human_parts":
[H, W] long, "meta": ...} (any subset of the targets), and moves the image and every target
together:

- image: bilinear, filled with 0 outside the source;
- semseg, human_parts: nearest, filled with 255 (ignored);
- edge, sal: nearest, filled with 0 (the survey's balanced BCE has no ignore value);
- depth, normals: bilinear where the 2 x 2 source neighbourhood is all valid, else the nearest
  source pixel (so ignore values, 255, never blend into valid ones), filled with 255; normals
  are renormalised to unit length, and rotated in the image plane with the image.

Normals are camera-frame vectors with x to the right and y down (``Scenes``' convention; the
survey's rotation formula assumes the same). A rotation by ``rot`` degrees turns the picture
counter-clockwise on screen (as OpenCV's ``getRotationMatrix2D`` with a positive angle, which
the survey uses) about the image centre, and (n_x, n_y) turns with it:
(n_x cos + n_y sin, -n_x sin + n_y cos). A horizontal flip negates n_x. Scaling by ``sc`` zooms
in by sc and divides depth by sc (the survey's ScaleNRotate), as if the camera moved closer.

Randomness comes from ``torch`` (pass ``generator=`` for a private stream), so DataLoader
workers get different draws. ``survey_transforms(size)`` is the survey's training pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ._common import IGNORE, IMAGENET_MEAN, IMAGENET_STD, normalize_image

__all__ = [
    "Compose",
    "FixedResize",
    "Normalize",
    "PadCrop",
    "RandomHorizontalFlip",
    "RandomRotation",
    "RandomScale",
    "ScaleNRotate",
    "survey_transforms",
]

_LABELS = ("semseg", "human_parts")
_BINARY = ("edge", "sal")
_CONTINUOUS = ("depth", "normals")


def _keys(sample: dict) -> list[str]:
    return [k for k, v in sample.items() if isinstance(v, torch.Tensor)]


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


class Compose:
    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomHorizontalFlip:
    """Flip everything left-right with probability p; normals' x component is negated (where valid)."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p, self.generator = float(p), generator

    def __call__(self, sample: dict) -> dict:
        if float(torch.rand((), generator=self.generator)) >= self.p:
            return sample
        return hflip(sample)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def hflip(sample: dict) -> dict:
    """Deterministic horizontal flip of a sample (see RandomHorizontalFlip)."""
    out = dict(sample)
    for k in _keys(sample):
        x = sample[k].flip(-1)
        if k == "normals":
            valid = (x != IGNORE).all(0)
            x = x.clone()
            x[0] = torch.where(valid, -x[0], x[0])
        out[k] = x
    return out


def _grid(theta: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    return F.affine_grid(theta[None], [1, 1, out_hw[0], out_hw[1]], align_corners=False)


def _sample(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    return F.grid_sample(x[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def _resample(sample: dict, theta: torch.Tensor, out_hw: tuple[int, int], rot_rad: float = 0.0, sc: float = 1.0):
    """Warp every tensor of `sample` by the affine map theta (output -> input, normalised coordinates)."""
    out = dict(sample)
    keys = _keys(sample)
    if not keys:
        return out
    ref = sample[keys[0]]
    grid = _grid(theta.to(torch.float32), out_hw).to(ref.device)
    inside = None
    for k in keys:
        x = sample[k]
        xf = x.float()
        if xf.dim() == 2:
            xf = xf[None]
        if inside is None:
            inside = _sample(torch.ones_like(xf[:1]), grid, "nearest") > 0.5
        if k == "image":
            y = _sample(xf, grid, "bilinear")
        elif k in _LABELS or k in _BINARY or k not in _CONTINUOUS:
            fill = IGNORE if k in _LABELS else 0
            y = torch.where(inside, _sample(xf, grid, "nearest"), torch.tensor(float(fill)))
        else:
            valid = (xf != IGNORE).all(0, keepdim=True).float()
            vs = _sample(valid, grid, "bilinear")
            lin = _sample(xf * valid, grid, "bilinear") / vs.clamp_min(1e-12)
            near = _sample(xf, grid, "nearest")
            near_ok = inside & (near != IGNORE).all(0, keepdim=True)
            y = torch.where(vs > 1 - 1e-4, lin, torch.where(near_ok, near, torch.tensor(float(IGNORE))))
            ok = (y != IGNORE).all(0, keepdim=True)
            if k == "normals":
                if rot_rad:
                    c, s = math.cos(rot_rad), math.sin(rot_rad)
                    y = torch.cat([c * y[0:1] + s * y[1:2], -s * y[0:1] + c * y[1:2], y[2:3]])
                y = y / y.norm(dim=0, keepdim=True).clamp_min(1e-12)
            elif k == "depth" and sc != 1.0:
                y = y / sc
            y = torch.where(ok, y, torch.tensor(float(IGNORE)))
        if x.dim() == 2:
            y = y[0]
        out[k] = y.to(x.dtype)
    return out


def scale_rotate(sample: dict, rot: float, sc: float) -> dict:
    """Rotate by `rot` degrees (counter-clockwise on screen) and zoom by `sc` about the image centre."""
    h, w = sample["image"].shape[-2:] if "image" in sample else sample[_keys(sample)[0]].shape[-2:]
    a = math.radians(rot)
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[c / sc, -s * h / (w * sc), 0.0], [s * w / (h * sc), c / sc, 0.0]], dtype=torch.float64)
    return _resample(sample, theta, (h, w), rot_rad=a, sc=sc)


class ScaleNRotate:
    """The survey's ScaleNRotate: a random rotation in rots (degrees) and zoom in scales, as one warp.

    rots, scales: (min, max) ranges drawn uniformly, or lists of values to choose from."""

    def __init__(self, rots=(-20.0, 20.0), scales=(0.75, 1.25), generator: torch.Generator | None = None):
        if isinstance(rots, list) != isinstance(scales, list):
            raise ValueError("ScaleNRotate: rots and scales must both be (min, max) tuples or both be lists")
        self.rots, self.scales, self.generator = rots, scales, generator

    def _draw(self, spec) -> float:
        if isinstance(spec, list):
            return float(spec[int(torch.randint(len(spec), (), generator=self.generator))])
        return _uniform(float(spec[0]), float(spec[1]), self.generator)

    def __call__(self, sample: dict) -> dict:
        rot, sc = self._draw(self.rots), self._draw(self.scales)
        if rot == 0.0 and sc == 1.0:
            return sample
        return scale_rotate(sample, rot, sc)

    def __repr__(self) -> str:
        return f"ScaleNRotate(rots={self.rots}, scales={self.scales})"


class RandomScale(ScaleNRotate):
    def __init__(self, scales=(0.75, 1.25), generator: torch.Generator | None = None):
        super().__init__(rots=[0.0] if isinstance(scales, list) else (0.0, 0.0), scales=scales, generator=generator)


class RandomRotation(ScaleNRotate):
    def __init__(self, rots=(-20.0, 20.0), generator: torch.Generator | None = None):
        super().__init__(rots=rots, scales=[1.0] if isinstance(rots, list) else (1.0, 1.0), generator=generator)


class FixedResize:
    """Resize everything to size (H, W) (the survey's FixedResize; labels nearest, normals renormalised)."""

    def __init__(self, size: Sequence[int]):
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, sample: dict) -> dict:
        theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
        return _resample(sample, theta, self.size)

    def __repr__(self) -> str:
        return f"FixedResize(size={self.size})"


class PadCrop:
    """Pad (evenly on both sides, with each key's fill value) to at least size, then crop to size
    (at a random place when random=True, else centred)."""

    def __init__(self, size: Sequence[int], random: bool = True, generator: torch.Generator | None = None):
        self.size, self.random, self.generator = (int(size[0]), int(size[1])), bool(random), generator

    def __call__(self, sample: dict) -> dict:
        keys = _keys(sample)
        h, w = sample[keys[0]].shape[-2:]
        th, tw = self.size
        ph, pw = max(th - h, 0), max(tw - w, 0)
        hh, ww = h + ph, w + pw
        if self.random:
            y0 = int(torch.randint(hh - th + 1, (), generator=self.generator))
            x0 = int(torch.randint(ww - tw + 1, (), generator=self.generator))
        else:
            y0, x0 = (hh - th) // 2, (ww - tw) // 2
        out = dict(sample)
        for k in keys:
            x = sample[k]
            fill = IGNORE if (k in _LABELS or k in _CONTINUOUS) else 0
            if ph or pw:
                padded = torch.full((*x.shape[:-2], hh, ww), fill, dtype=x.dtype, device=x.device)
                padded[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w] = x
                x = padded
            out[k] = x[..., y0 : y0 + th, x0 : x0 + tw].contiguous()
        return out

    def __repr__(self) -> str:
        return f"PadCrop(size={self.size}, random={self.random})"


class Normalize:
    """(image - mean) / std on the image (ImageNet statistics by default, as the survey)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        out["image"] = normalize_image(sample["image"], self.mean, self.std)
        return out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def survey_transforms(size: Sequence[int], train: bool = True, generator: torch.Generator | None = None) -> Compose:
    """The survey's pipeline without its final normalisation (the datasets normalise):
    train: RandomHorizontalFlip, ScaleNRotate(rots=(-20, 20), scales=(0.75, 1.25)), FixedResize(size);
    eval: FixedResize(size)."""
    if not train:
        return Compose([FixedResize(size)])
    return Compose(
        [
            RandomHorizontalFlip(generator=generator),
            ScaleNRotate((-20.0, 20.0), (0.75, 1.25), generator=generator),
            FixedResize(size),
        ]
    )
