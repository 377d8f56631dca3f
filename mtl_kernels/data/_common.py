"""Helpers shared by the datasets: task lists, image normalisation, clear errors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255


def check_tasks(owner: str, tasks: Sequence[str] | str | None, allowed: Sequence[str]) -> tuple[str, ...]:
    """The requested tasks as a tuple (all of `allowed` when None), or a ValueError naming the bad ones."""
    if tasks is None:
        return tuple(allowed)
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in allowed]
    if bad or not tasks:
        raise ValueError(f"{owner}: tasks must be a non-empty subset of {list(allowed)}, got {list(tasks)}")
    return tasks


def normalize_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(image - mean) / std per channel, image [3, H, W] (or [B, 3, H, W]) in [0, 1]."""
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image - m) / s


def check_layout(name: str, root, expected: dict[str, str], missing: list[str]) -> None:
    """Raise FileNotFoundError listing the expected layout and what is missing (when anything is)."""
    if not missing:
        return
    shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
    layout = "\n  ".join(f"{k:<40} {v}" for k, v in expected.items())
    raise FileNotFoundError(
        f"{name}: the dataset at {root} is missing or incomplete.\nMissing:\n  {shown}\n"
        f"Expected layout (relative to root):\n  {layout}"
    )


def load_image(path) -> torch.Tensor:
    """RGB image file -> float32 [3, H, W] in [0, 1]."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises several kinds
        raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_nearest(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of [H, W] or [C, H, W] to hw (the survey resizes mismatched targets so)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    y = x.float()
    y = torch.nn.functional.interpolate(y[None] if y.dim() == 3 else y[None, None], size=hw, mode="nearest")
    return (y[0] if x.dim() == 3 else y[0, 0]).to(x.dtype)
