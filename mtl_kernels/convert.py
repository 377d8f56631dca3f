"""convert(model): swap the survey code's modules for fused ones with the same weights.

A survey module is recognised by its class name and its state_dict layout, so
models built from the survey code itself convert without importing it. Later
ops add their converter to CONVERTERS.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ._backend import check_backend_arg
from .nn import NDDR, CrossStitch, MTANAttention, MultiModalDistillation


def _loaded(fused: nn.Module, module: nn.Module, like) -> nn.Module:
    """fused, moved to like's device and dtype first, with module's weights: loading before the
    move would round float64 weights through the fused module's float32 ones."""
    fused.to(device=like.device, dtype=like.dtype)
    fused.load_state_dict(module.state_dict())
    return fused


def _cross_stitch(module: nn.Module, backend: str | None) -> nn.Module | None:
    unit = getattr(module, "cross_stitch_unit", None)
    if not isinstance(unit, nn.ModuleDict) or not unit:
        return None
    tasks = list(unit.keys())
    for row in unit.values():  # the survey's layout: unit[t][s].param, an nn.Parameter of [C]
        if not isinstance(row, nn.ModuleDict) or list(row.keys()) != tasks:
            return None
        if not all(isinstance(getattr(cell, "param", None), nn.Parameter) for cell in row.values()):
            return None
    first = unit[tasks[0]][tasks[0]].param
    return _loaded(CrossStitch(tasks, first.shape[0], backend=backend), module, first)


def _nddr(module: nn.Module, backend: str | None) -> nn.Module | None:
    layer = getattr(module, "layer", None)
    if not isinstance(layer, nn.ModuleDict) or not layer:
        return None
    tasks = list(layer.keys())
    first = layer[tasks[0]]
    if not isinstance(first, nn.Sequential) or len(first) < 2:
        return None
    conv, bn = first[0], first[1]
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or bn.momentum is None:
        return None
    return _loaded(
        NDDR(tasks, conv.out_channels, momentum=bn.momentum, eps=bn.eps, backend=backend), module, conv.weight
    )


def _distillation(module: nn.Module, backend: str | None) -> nn.Module | None:
    attention = getattr(module, "self_attention", None)
    if not isinstance(attention, nn.ModuleDict) or not hasattr(module, "auxilary_tasks"):
        return None
    block = next((b for per_task in attention.values() for b in getattr(per_task, "values", list)()), None)
    if not isinstance(getattr(block, "conv", None), nn.Conv2d):
        return None
    channels = block.conv.out_channels
    fused = MultiModalDistillation(
        list(module.tasks), list(module.auxilary_tasks), channels, key_format="features_{}", backend=backend
    )
    return _loaded(fused, module, block.conv.weight)


def _attention(module: nn.Module, backend: str | None) -> nn.Module | None:
    if not isinstance(module, nn.Sequential) or len(module) != 6:
        return None
    if not all(
        isinstance(module[i], t) for i, t in ((0, nn.Conv2d), (1, nn.BatchNorm2d), (3, nn.Conv2d), (4, nn.BatchNorm2d))
    ):
        return None
    fused = MTANAttention(module[0].in_channels, module[0].out_channels, module[3].out_channels, backend=backend)
    for i in (1, 4):  # the survey's BNs as configured (affine, running statistics, eps, momentum)
        bn = module[i]
        fused[i] = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    return _loaded(fused, module, module[0].weight)


# class name of the survey module -> builds the fused module, or None if the layout differs
CONVERTERS: dict[str, Callable[[nn.Module, str | None], nn.Module | None]] = {
    "CrossStitchUnit": _cross_stitch,
    "NDDRLayer": _nddr,
    "MultiTaskDistillationModule": _distillation,
    "AttentionLayer": _attention,
}


def convert(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Replace every survey module in `model` by its fused counterpart, in place.

    Returns the model (a new module when `model` itself is a survey module).
    The fused modules keep the weights, device, dtype and train/eval mode; a survey module
    registered in several places becomes one fused module shared the same way. A module with a
    survey class name but another layout is left as it is.
    """
    check_backend_arg(backend)
    return _convert(model, backend, {})


def _convert(model: nn.Module, backend: str | None, done: dict[int, nn.Module]) -> nn.Module:
    if id(model) in done:
        return done[id(model)]
    fused = _convert_one(model, backend)
    if fused is not None:
        done[id(model)] = fused
        return fused
    done[id(model)] = model
    # _modules, not named_children(): that skips a module's second registration
    for name, child in list(model._modules.items()):
        if child is not None:
            setattr(model, name, _convert(child, backend, done))
    return model


def _convert_one(module: nn.Module, backend: str | None) -> nn.Module | None:
    converter = CONVERTERS.get(type(module).__name__)
    if converter is None:
        return None
    fused = converter(module, backend)
    if fused is not None:
        fused.train(module.training)
        # and the submodules the two share by name in their own mode (a BN frozen for fine-tuning)
        modes = {name: m.training for name, m in module.named_modules()}
        for name, m in fused.named_modules():
            m.training = modes.get(name, m.training)
    return fused
