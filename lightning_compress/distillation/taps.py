"""Taps on intermediate layers (forward hooks by qualified module name) and a check that paired layers match."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.utils.modes import eval_mode
from lightning_compress.utils.outputs import run_model


def check_layer_names(model: nn.Module, names: Sequence[str], role: str = "model") -> None:
    """Raise a ``ValueError`` naming the first name in ``names`` that is not a submodule of ``model``.

    >>> check_layer_names(nn.Sequential(nn.Linear(2, 2)), ["1"], "student")
    Traceback (most recent call last):
    ...
    ValueError: Unknown student layer '1' in Sequential; available: ['0'].
    """
    available = [name for name, _ in model.named_modules() if name]
    for name in names:
        if name not in available:
            raise ValueError(f"Unknown {role} layer {name!r} in {type(model).__name__}; available: {available}.")


class FeatureTaps:
    """Capture the outputs of named submodules during a forward pass (forward hooks, removable).

    Layers are named by their exact qualified name in ``model.named_modules()`` (``"stage2"``, ``"stage2.0.conv1"``).
    Each forward overwrites the captured output of a layer (a layer called twice keeps its last output; a layer that
    returns a tuple or list keeps its first element). Call :meth:`clear` after each step so that no activation
    outlives it, and :meth:`remove` (or leave the ``with`` block) to detach the hooks.

    Args:
        model: the network to tap.
        names: qualified names of the layers to tap, in the order :meth:`features` returns them.

    Raises:
        ValueError: for a name that is not a submodule of ``model`` (the message lists the available names).

    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> with FeatureTaps(model, ["0", "2"]) as taps:
    ...     _ = model(torch.zeros(4, 2))
    ...     [tuple(f.shape) for f in taps.features()]
    [(4, 3), (4, 1)]
    >>> len(model[0]._forward_hooks)
    0
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        check_layer_names(model, names)
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles: list[RemovableHandle] = [
            modules[name].register_forward_hook(self._hook(name)) for name in dict.fromkeys(self.names)
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.outputs[name] = output

        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise KeyError(
                f"Layer {name!r} has no captured output; tapped: {self.names}, captured: {list(self.outputs)}."
            )
        return self.outputs[name]

    def features(self, names: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Captured outputs of ``names`` (default: every tapped layer, in order)."""
        return [self[name] for name in (self.names if names is None else names)]

    def clear(self) -> None:
        """Forget the captured outputs (call after each step)."""
        self.outputs.clear()

    def remove(self) -> None:
        """Remove the hooks and forget the outputs; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()


#: Verdicts of :class:`LayerPair`, from cheapest fix to none.
VERDICTS = ("same", "channels", "spatial", "channels+spatial", "rank", "batch")


@dataclass(frozen=True)
class LayerPair:
    """Shapes of one student/teacher layer pair and what it takes to match them.

    ``verdict``: ``"same"``; ``"channels"`` (fixable by a regressor); ``"spatial"`` (fixable by pooling the larger
    map); ``"channels+spatial"`` (both); ``"rank"`` or ``"batch"`` (cannot be matched).
    """

    student_layer: str
    teacher_layer: str
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]

    @property
    def verdict(self) -> str:
        s, t = self.student_shape, self.teacher_shape
        if len(s) != len(t) or len(s) < 2:
            return "rank"
        if s[0] != t[0]:
            return "batch"
        channels, spatial = s[1] != t[1], s[2:] != t[2:]
        if channels and spatial:
            return "channels+spatial"
        return "channels" if channels else "spatial" if spatial else "same"

    def describe(self) -> str:
        return (
            f"student {self.student_layer!r} {self.student_shape} vs teacher {self.teacher_layer!r} "
            f"{self.teacher_shape}: {self.verdict}"
        )


def _output_shapes(model: nn.Module, names: Sequence[str], example_input: Any) -> dict[str, tuple[int, ...]]:
    with FeatureTaps(model, names) as taps, eval_mode(model), torch.no_grad():
        run_model(model, example_input)
        missing = [name for name in names if name not in taps.outputs]
        if missing:
            raise ValueError(f"Layers {missing} of {type(model).__name__} were not called in the forward pass.")
        return {name: tuple(taps[name].shape) for name in names}


def inspect_layer_pairs(
    student: nn.Module,
    teacher: nn.Module,
    student_layers: Sequence[str],
    teacher_layers: Sequence[str],
    example_input: Any,
) -> list[LayerPair]:
    """Run one forward of each network on ``example_input`` (eval mode, no grad, modes restored) and report the
    output shapes of each paired layer.

    Raises:
        ValueError: for layer lists of different lengths or unknown layer names.
    """
    if len(student_layers) != len(teacher_layers):
        raise ValueError(
            f"student_layers and teacher_layers must pair up one to one, got {len(student_layers)} and "
            f"{len(teacher_layers)}: {list(student_layers)} vs {list(teacher_layers)}."
        )
    check_layer_names(student, student_layers, "student")
    check_layer_names(teacher, teacher_layers, "teacher")
    student_shapes = _output_shapes(student, student_layers, example_input)
    teacher_shapes = _output_shapes(teacher, teacher_layers, example_input)
    return [
        LayerPair(s, t, student_shapes[s], teacher_shapes[t])
        for s, t in zip(student_layers, teacher_layers, strict=True)
    ]


def check_layer_pairs(
    pairs: Sequence[LayerPair], allowed: Sequence[str] = ("same", "channels", "spatial", "channels+spatial"),
    purpose: str = "distillation",
) -> None:
    """Raise a ``ValueError`` naming the first pair whose verdict is not in ``allowed``.

    >>> check_layer_pairs([LayerPair("a", "b", (2, 4, 8, 8), (2, 16))])
    Traceback (most recent call last):
    ...
    ValueError: Layer pair cannot be matched for distillation: student 'a' (2, 4, 8, 8) vs teacher 'b' (2, 16): rank; \
allowed: ['same', 'channels', 'spatial', 'channels+spatial'].
    """
    for pair in pairs:
        if pair.verdict not in allowed:
            raise ValueError(
                f"Layer pair cannot be matched for {purpose}: {pair.describe()}; allowed: {list(allowed)}."
            )
