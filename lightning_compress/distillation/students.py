"""Students: a slimmer copy of a reference model, and the next generation of born-again networks."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_compress.utils.data import execution_order, probe_forward

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def slim_copy(
    model: nn.Module, width_multiplier: float = 0.5, drop: Sequence[str] = (), example_inputs: Any = None
) -> nn.Module:
    """A freshly initialised copy of ``model`` with fewer channels and, optionally, fewer blocks: the natural
    student of a reference teacher.

    Every convolution, linear layer and batch norm keeps its place and gets ``max(1, round(c * width_multiplier))``
    channels, except the model's input (the first layer's input width, and batch norms applied to the input
    before any convolution or linear layer) and output (the last linear layer's outputs). A linear layer that
    follows a flatten of a convolution map keeps its ``H * W`` factor. Submodules named in ``drop`` are replaced by
    ``nn.Identity`` (only valid for blocks whose output shape equals their input shape, such as the second block of
    a stage). Weights are newly initialised; the reference is not changed.

    "First" and "last" follow the order of the forward pass when ``example_inputs`` is given (one forward of
    ``model`` finds it, and one of the student checks that it runs and keeps the output shape), else the order in
    which the layers were registered (e.g. ``self.fc`` assigned before the convolutions needs ``example_inputs``).

    Supported layers: ``Conv1d/2d/3d`` (ungrouped or depthwise), ``Linear``, ``BatchNorm1d/2d/3d``, and any
    parameter-free module; other parametrised layers raise.

    Args:
        model: the reference model (e.g. the teacher).
        width_multiplier: channel factor in ``(0, 1]`` (values above 1 widen).
        drop: qualified names of submodules to replace by the identity.
        example_inputs: a batch (tensor or tuple of positional inputs) for the forward order and the check.

    Raises:
        ValueError: for a non-positive multiplier, an unknown name in ``drop``, an unsupported layer, or (with
            ``example_inputs``) a student that does not run or changes the output shape.

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
    others = [n for n, m in student.named_modules() if n and not isinstance(m, _RESIZED)
              and any(True for _ in m.parameters(recurse=False))]
    if others:
        raise ValueError(f"slim_copy cannot resize layers {others}; supported: Conv1d/2d/3d, Linear, BatchNorm.")
    layers = _ordered_layers(student, example_inputs)
    _resize(student, layers, lambda channels: max(1, round(channels * width_multiplier)))
    if example_inputs is not None:
        _check_student(model, student, example_inputs)
    return student


_RESIZED = (*_CONVS, nn.Linear, *_NORMS)


def _ordered_layers(model: nn.Module, example_inputs: Any) -> list[tuple[str, nn.Module]]:
    """The resizable layers in forward order (``example_inputs`` given; layers not called come last) or in
    registration order."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _RESIZED)}
    if example_inputs is None:
        return list(layers.items())
    called = execution_order(model, example_inputs, names=list(layers))
    return [(n, layers[n]) for n in called] + [(n, m) for n, m in layers.items() if n not in called]


def _resize(student: nn.Module, layers: list[tuple[str, nn.Module]], scale: Callable[[int], int]) -> None:
    weighted = [i for i, (_, m) in enumerate(layers) if not isinstance(m, _NORMS)]
    first = weighted[0] if weighted else None
    last_linear = max((i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
    previous_out: tuple[int, int] | None = None  # (original, scaled) output width of the last conv/linear
    for index, (name, layer) in enumerate(layers):
        if isinstance(layer, _NORMS):
            on_input = first is None or index < first  # normalises the model's input: keeps its width
            features = layer.num_features if on_input else scale(layer.num_features)
            norm = type(layer)(features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
            _set_submodule(student, name, norm.train(layer.training))
            continue
        new, previous_out = _resized_layer(name, layer, scale, index == first, index == last_linear, previous_out)
        _set_submodule(student, name, new.train(layer.training))


def _resized_layer(name: str, layer: nn.Module, scale: Callable[[int], int], is_first: bool, is_last: bool,
                   previous_out: tuple[int, int] | None) -> tuple[nn.Module, tuple[int, int]]:
    if isinstance(layer, nn.Linear):
        in_features = layer.in_features
        if not is_first:
            if previous_out and in_features % previous_out[0] == 0:
                in_features = previous_out[1] * (in_features // previous_out[0])
            else:
                in_features = scale(in_features)
        out_features = layer.out_features if is_last else scale(layer.out_features)
        linear = nn.Linear(in_features, out_features, bias=layer.bias is not None)
        return linear, (layer.out_features, out_features)
    assert isinstance(layer, _CONVS)
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
    return type(layer)(in_channels, out_channels, **options), (layer.out_channels, out_channels)


def _check_student(model: nn.Module, student: nn.Module, example_inputs: Any) -> None:
    try:
        got = probe_forward(student, example_inputs)
    except RuntimeError as error:
        raise ValueError(
            f"slim_copy's student of {type(model).__name__} does not run on the example inputs "
            f"({str(error).splitlines()[0]}); its forward may depend on widths slim_copy cannot see (e.g. a "
            "hard-coded view or a width passed as a number)."
        ) from error
    expected = probe_forward(model, example_inputs)
    if getattr(got, "shape", None) != getattr(expected, "shape", None):
        raise ValueError(f"slim_copy's student returns shape {tuple(got.shape)}, the model {tuple(expected.shape)}.")


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
