"""Sparsity schedules: how far along the way to the target sparsity training is at each step or epoch.

A schedule returns a *progress* in ``[0, 1]``; the callback owns the target, so the sparsity at position ``t`` is
``target * schedule.progress(t)`` (:func:`sparsity_at`). Progress is 0 before ``start``, 1 at and after ``end``, and
changes only on multiples of ``frequency`` counted from ``start``. Positions ``t`` count completed units (epochs or
optimizer steps, as ``unit`` says). Schedules are frozen dataclasses with plain typed arguments: picklable and
expressible in YAML (``class_path: lightning_compress.pruning.schedules.AGP``).

>>> schedule = AGP(start=0, end=4)
>>> [round(sparsity_at(schedule, 0.8, t), 4) for t in range(6)]
[0.0, 0.4625, 0.7, 0.7875, 0.8, 0.8]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AGP",
    "Constant",
    "Cosine",
    "Exponential",
    "Linear",
    "Schedule",
    "compounding_amounts",
    "default_recovery_epochs",
    "recovery_schedule",
    "sparsity_at",
]

_UNITS = ("epoch", "step")


@dataclass(frozen=True)
class Schedule:
    """Base class: a progress curve from ``start`` to ``end``, updated every ``frequency`` units.

    Subclasses override :meth:`shape`, a map of the stepped linear fraction ``f`` in ``[0, 1]`` onto progress with
    ``shape(0) = 0`` and ``shape(1) = 1`` (public override point).

    Args:
        start: position (in ``unit``) where progress begins to grow.
        end: position where progress reaches 1; ``end == start`` jumps to 1 at ``start``.
        frequency: progress changes only every ``frequency`` units counted from ``start``.
        unit: ``"epoch"`` or ``"step"``; the callback decides which counter it passes.

    Raises:
        ValueError: for a start, end or frequency that is not an integer (e.g. ``nan``, ``inf``, ``1.5``), a
            negative start, a schedule that ends before it starts, a frequency below 1 or an unknown unit.
    """

    start: int = 0
    end: int = 10
    frequency: int = 1
    unit: str = "epoch"

    def __post_init__(self) -> None:
        for name in ("start", "end", "frequency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{type(self).__name__}: {name} must be an integer, got {name}={value!r}.")
        if self.start < 0:
            raise ValueError(f"A schedule starts at a position >= 0, got start={self.start!r}.")
        if self.end < self.start:
            raise ValueError(
                f"A schedule that ends before it starts: start={self.start!r}, end={self.end!r}; need end >= start."
            )
        if self.frequency < 1:
            raise ValueError(f"frequency must be an integer >= 1, got frequency={self.frequency!r}.")
        if self.unit not in _UNITS:
            raise ValueError(f"unit must be one of {_UNITS}, got unit={self.unit!r}.")

    def fraction(self, t: float) -> float:
        """The linear fraction of the way from ``start`` to ``end``, stepped to multiples of ``frequency``."""
        if t < self.start:
            return 0.0
        if t >= self.end:
            return 1.0
        stepped = math.floor((t - self.start) / self.frequency) * self.frequency
        return min(stepped / (self.end - self.start), 1.0)

    def shape(self, fraction: float) -> float:
        """Progress for a linear ``fraction``; the identity here."""
        return fraction

    def progress(self, t: float) -> float:
        """Progress in ``[0, 1]`` at position ``t``: 0 before ``start``, 1 at and after ``end``."""
        if t >= self.end:
            return 1.0
        return min(max(self.shape(self.fraction(t)), 0.0), 1.0)

    def is_update(self, t: float) -> bool:
        """Whether the progress may change at position ``t`` (a multiple of ``frequency`` from start, or ``end``)."""
        if t < self.start or t > self.end:
            return False
        return t == self.end or (t - self.start) % self.frequency == 0


@dataclass(frozen=True)
class Linear(Schedule):
    """Progress grows linearly from ``start`` to ``end``.

    >>> [Linear(start=2, end=6, frequency=2).progress(t) for t in range(8)]
    [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    """


@dataclass(frozen=True)
class Constant(Schedule):
    """Full target from ``start`` on (one-shot pruning); ``end`` and ``frequency`` are ignored.

    >>> [Constant(start=1).progress(t) for t in range(3)]
    [0.0, 1.0, 1.0]
    """

    end: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "end", self.start if self.end == -1 else self.end)
        super().__post_init__()

    def progress(self, t: float) -> float:
        return 1.0 if t >= self.start else 0.0

    def is_update(self, t: float) -> bool:
        return t == self.start


@dataclass(frozen=True)
class AGP(Schedule):
    """Automated Gradual Pruning (Zhu & Gupta 2017): ``progress = 1 - (1 - f)^3``.

    With ``sparsity = target * progress`` this is the paper's
    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` with ``s_i = 0``, ``t0 = start``, ``n dt = end - start`` and
    ``dt = frequency``.

    >>> AGP(start=0, end=10, frequency=5).progress(5)
    0.875
    """

    def shape(self, fraction: float) -> float:
        return 1.0 - (1.0 - fraction) ** 3


@dataclass(frozen=True)
class Exponential(Schedule):
    """Fast early, slow late: ``progress = (1 - exp(-rate f)) / (1 - exp(-rate))``.

    Args:
        rate: curvature, > 0; larger prunes more early on.

    >>> round(Exponential(start=0, end=2, rate=2.0).progress(1), 4)
    0.7311
    """

    rate: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.rate < math.inf:
            raise ValueError(f"rate must be a finite number > 0, got rate={self.rate!r}.")

    def shape(self, fraction: float) -> float:
        return (1.0 - math.exp(-self.rate * fraction)) / (1.0 - math.exp(-self.rate))


@dataclass(frozen=True)
class Cosine(Schedule):
    """Half-cosine ramp: ``progress = (1 - cos(pi f)) / 2``.

    >>> round(Cosine(start=0, end=2).progress(1), 6)
    0.5
    """

    def shape(self, fraction: float) -> float:
        return (1.0 - math.cos(math.pi * fraction)) / 2.0


def sparsity_at(schedule: Schedule, target: float, t: float) -> float:
    """Sparsity at position ``t`` for a ``target`` sparsity: ``target * schedule.progress(t)``.

    Raises:
        ValueError: if ``target`` is outside ``[0, 1)``.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target!r}.")
    return target * schedule.progress(t)


def compounding_amounts(sparsities: Sequence[float]) -> list[float]:
    """Per-step amounts of the *remaining* weights (Lightning's ``ModelPruning`` convention) for target sparsities.

    ``amount_k = (s_k - s_{k-1}) / (1 - s_{k-1})`` with ``s_{-1} = 0``, so pruning ``amount_k`` of what survives at
    each step reaches exactly ``s_k``. For comparison benchmarks only.

    Raises:
        ValueError: if a sparsity is outside ``[0, 1)`` or the sequence decreases.

    >>> [round(a, 4) for a in compounding_amounts([0.5, 0.75, 0.75])]
    [0.5, 0.5, 0.0]
    """
    amounts, previous = [], 0.0
    for k, sparsity in enumerate(sparsities):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsities[{k}]={sparsity!r} is outside [0, 1).")
        if sparsity < previous:
            raise ValueError(f"sparsities must not decrease: sparsities[{k}]={sparsity!r} < {previous!r}.")
        amounts.append((sparsity - previous) / (1.0 - previous))
        previous = sparsity
    return amounts


def default_recovery_epochs(max_epochs: int) -> int:
    """Epochs trained with fixed masks after the default schedule: a third of the fit, rounded up.

    >>> [default_recovery_epochs(n) for n in (1, 2, 10, 30)]
    [1, 1, 4, 10]
    """
    return math.ceil(max_epochs / 3)


def recovery_schedule(max_epochs: int, recovery_epochs: int | None = None) -> Schedule:
    """The default pruning schedule of a fit of ``max_epochs``: AGP (Zhu & Gupta 2017) from epoch 0 to
    ``max_epochs - recovery_epochs``, so the last ``recovery_epochs`` epochs train with the final masks
    (``None``: :func:`default_recovery_epochs`). A fit too short for a ramp prunes in one shot at the start.

    Raises:
        ValueError: for ``max_epochs`` below 1 or ``recovery_epochs`` that is not an integer >= 0.

    >>> recovery_schedule(30)
    AGP(start=0, end=20, frequency=1, unit='epoch')
    >>> recovery_schedule(10, recovery_epochs=10)
    Constant(start=0, end=0, frequency=1, unit='epoch')
    """
    check_recovery_epochs(recovery_epochs)
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, numbers.Integral) or max_epochs < 1:
        raise ValueError(f"The default pruning schedule needs a fit of max_epochs >= 1 epochs, got {max_epochs!r}; "
                         "pass a schedule for a fit limited by steps.")
    recovery = default_recovery_epochs(max_epochs) if recovery_epochs is None else recovery_epochs
    end = max_epochs - recovery
    return AGP(start=0, end=end) if end > 0 else Constant(start=0)


def check_recovery_epochs(recovery_epochs: int | None) -> None:
    """``None`` or an integer >= 0, else a ``ValueError`` naming the value."""
    if recovery_epochs is None:
        return
    if isinstance(recovery_epochs, bool) or not isinstance(recovery_epochs, numbers.Integral) or recovery_epochs < 0:
        raise ValueError(f"recovery_epochs must be an integer >= 0 or None (a third of the fit), "
                         f"got {recovery_epochs!r}.")
