"""Students: a slimmer copy of a reference model, and the next generation of born-again networks."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def slim_copy(model: nn.Module, width_multiplier: float = 0.5, drop: Sequence[str] = ()) -> nn.Module:
    """A freshly initialised copy of ``model`` with fewer channels and, optionally, fewer blocks: the natural
    student of a reference teacher.

    Every convolution, linear layer and batch norm keeps its place and gets ``max(1, round(c * width_multiplier))``
    channels, except the model's input (the first layer's input width) and output (the last linear layer's
    outputs). A linear layer that follows a flatten of a convolution map keeps its ``H * W`` factor. Submodules
    named in ``drop`` are replaced by ``nn.Identity`` (only valid for blocks whose output shape equals their input
    shape, such as the second block of a stage). Weights are newly initialised; the reference is not changed.

    Supported layers: ``Conv1d/2d/3d`` (ungrouped or depthwise), ``Linear``, ``BatchNorm1d/2d/3d``, and any
    parameter-free module; other parametrised layers raise.

    Args:
        model: the reference model (e.g. the teacher).
        width_multiplier: channel factor in ``(0, 1]`` (values above 1 widen).
        drop: qualified names of submodules to replace by the identity.

    Raises:
        ValueError: for a non-positive multiplier, an unknown name in ``drop`` or an unsupported layer.

    >>> from lightning_compress.demo import ResidualCNN
    >>> import torch
    >>> student = slim_copy(ResidualCNN(width=16), 0.5)
    >>> student.stage1[0].conv1, student(torch.zeros(2, 1, 8, 8)).shape
    (Conv2d(8, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False), torch.Size([2, 10]))
    """
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier!r}.")
    names = {name for name, _ in model.named_modules() if name}
    for name in drop:
        if name not in names:
            raise ValueError(f"Unknown layer {name!r} in drop; available: {sorted(names)}.")
    student = copy.deepcopy(model)
    for name in drop:
        _set_submodule(student, name, nn.Identity())

    def scale(channels: int) -> int:
        return max(1, round(channels * width_multiplier))

    layers = [(n, m) for n, m in student.named_modules() if isinstance(m, (*_CONVS, nn.Linear, *_NORMS))]
    others = [n for n, m in student.named_modules() if n and not isinstance(m, (*_CONVS, nn.Linear, *_NORMS))
              and any(True for _ in m.parameters(recurse=False))]
    if others:
        raise ValueError(f"slim_copy cannot resize layers {others}; supported: Conv1d/2d/3d, Linear, BatchNorm.")
    last_linear = max((i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
    previous_out: tuple[int, int] | None = None  # (original, scaled) output width of the last conv/linear
    for index, (name, layer) in enumerate(layers):
        if isinstance(layer, _NORMS):
            norm = type(layer)(scale(layer.num_features), layer.eps, layer.momentum, layer.affine,
                               layer.track_running_stats)
            _set_submodule(student, name, norm.train(layer.training))
            continue
        is_first, is_last = index == 0, index == last_linear
        if isinstance(layer, nn.Linear):
            in_features = layer.in_features
            if not is_first:
                if previous_out and in_features % previous_out[0] == 0:
                    in_features = previous_out[1] * (in_features // previous_out[0])
                else:
                    in_features = scale(in_features)
            out_features = layer.out_features if is_last else scale(layer.out_features)
            new: nn.Module = nn.Linear(in_features, out_features, bias=layer.bias is not None)
            previous_out = (layer.out_features, out_features)
        else:
            depthwise = layer.groups == layer.in_channels == layer.out_channels and layer.groups > 1
            if layer.groups > 1 and not depthwise:
                raise ValueError(f"slim_copy cannot resize grouped convolution {name!r} (groups={layer.groups}).")
            in_channels = layer.in_channels if is_first else scale(layer.in_channels)
            out_channels = in_channels if depthwise else scale(layer.out_channels)
            options: dict[str, Any] = {
                "kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding,
                "dilation": layer.dilation, "groups": in_channels if depthwise else 1,
                "bias": layer.bias is not None, "padding_mode": layer.padding_mode,
            }
            new = type(layer)(in_channels, out_channels, **options)
            previous_out = (layer.out_channels, out_channels)
        _set_submodule(student, name, new.train(layer.training))
    return student


def reinitialize(model: nn.Module) -> nn.Module:
    """Reset every submodule that defines ``reset_parameters`` (weights and batch-norm statistics), in place."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return model


def born_again(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The next generation of Born-Again Networks (Furlanello et al. 2018): ``(student, teacher)`` where the
    teacher is a frozen copy of the trained ``model`` and the student a freshly initialised copy of the same
    architecture, ready for ``DistillationModule(student, teacher)``.

    >>> student, teacher = born_again(nn.Linear(2, 2))
    >>> student is not teacher, teacher.weight.requires_grad, student.weight.requires_grad
    (True, False, True)
    """
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student = reinitialize(copy.deepcopy(model)).requires_grad_(True)
    return student, teacher
