"""Datasets for multi-task dense prediction: the built-in procedural Scenes, NYUD-v2 and PASCAL-Context.

Every dataset returns a dict per image:

    {"image": float32 [3, H, W],      ImageNet mean/std normalised (normalize=False: in [0, 1])
     "semseg": int64 [H, W],          class indices, 255 = ignore
     "depth": float32 [1, H, W],      metres, 255 = ignore (missing)
     "normals": float32 [3, H, W],    unit camera-frame normals, 255 on all channels = ignore
     "edge": float32 [1, H, W],       0 / 1
     "sal": float32 [1, H, W],        0 / 1
     "human_parts": int64 [H, W],     0 background, 1.. parts, 255 = ignore (all 255: none in view)
     "meta": {"image": id, "im_size": (H, W), ...}}

holding only the tasks asked for (``tasks=``). These are the survey code's conventions
(SimonVandenhende/Multi-Task-Learning-PyTorch: its ToTensor makes every target a float
[C, H, W] tensor, its AddIgnoreRegions marks missing depth, normals and human parts with 255,
and its Normalize uses the ImageNet statistics), with one deliberate difference: the two
label maps are int64 [H, W], what ``torch.nn.functional.cross_entropy``, ``mk.nn.DenseMultiTaskLoss``
and ``mk.metrics`` take (the survey's own loss squeezes its [1, H, W] float labels to that).
A DataLoader's default collate stacks them into [B, ...] batches.

``transforms`` holds the survey's joint augmentations (flip, scale and rotation with the normals
rotated, resize, crop / pad); a dataset applies ``transform=`` before normalising the image.
"""

from . import transforms
from .nyud import NYUD, NYUD_TASKS
from .pascal import HUMAN_PART_GROUPS, PASCAL_TASKS, PASCALContext
from .scenes import CLASSES, PART_CLASSES, SCENES_TASKS, Scenes

TASKS = ("semseg", "depth", "normals", "edge", "sal", "human_parts")


def train_transform(size):
    """The survey's training augmentations to (H, W): flip, scale and rotate, resize."""
    return transforms.survey_transforms(size, train=True)


def eval_transform(size):
    """The survey's evaluation transform to (H, W): resize."""
    return transforms.survey_transforms(size, train=False)


__all__ = [
    "CLASSES",
    "HUMAN_PART_GROUPS",
    "NYUD",
    "NYUD_TASKS",
    "PART_CLASSES",
    "PASCALContext",
    "PASCAL_TASKS",
    "SCENES_TASKS",
    "Scenes",
    "TASKS",
    "eval_transform",
    "train_transform",
    "transforms",
]
