"""Argument checks and shape helpers shared by the distillation losses (no Lightning import)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_temperature(temperature: float) -> None:
    """Raise a ``ValueError`` unless ``temperature`` is a finite positive number."""
    if not (_is_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}.")


def check_nonnegative(value: Any, name: str) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a finite non-negative number
    (``inf`` would turn the loss into NaN, ``nan`` would silently drop the term)."""
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}.")
    return float(value)


def check_count(value: Any, name: str) -> int:
    """``value`` if it is a non-negative integer, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return value


def check_weights(weights: Sequence[float] | None, count: int, name: str = "weights") -> list[float]:
    """Validate finite non-negative weights, not all zero, one per item; ``None`` gives equal weights of 1."""
    if weights is None:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"{name} must have one entry per item ({count}), got {len(weights)}: {weights!r}.")
    bad = [w for w in weights if not (_is_number(w) and w >= 0)]
    if bad:
        raise ValueError(f"{name} must be finite non-negative numbers, got {weights!r} ({bad[0]!r} is not).")
    weights = [float(w) for w in weights]
    if not any(w > 0 for w in weights):
        raise ValueError(f"{name} must not all be zero, got {weights!r}.")
    return weights


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Logits must be ``(B, num_classes)`` with equal shapes (same batch, same number of classes)."""
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be (batch, classes), got shape {tuple(student_logits.shape)}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape (batch, classes), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )


def check_same_batch(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher features must share the batch size, got shapes {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}."
        )


_POOLS: dict[int, Any] = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}


def pool_to_common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two ``(B, C, *spatial)`` maps to the spatial size of the smaller.

    Each spatial dimension is pooled to the minimum of the two sizes; maps of equal size are returned unchanged.
    """
    if a.dim() != b.dim():
        raise ValueError(f"feature maps must have the same rank, got shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.shape[2:] == b.shape[2:]:
        return a, b
    if a.dim() not in _POOLS:
        raise ValueError(f"cannot pool feature maps of shape {tuple(a.shape)} and {tuple(b.shape)}.")
    size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:], strict=True))
    pool = _POOLS[a.dim()]
    a = a if tuple(a.shape[2:]) == size else pool(a, size)
    b = b if tuple(b.shape[2:]) == size else pool(b, size)
    return a, b


def check_reduction(reduction: str, allowed: Sequence[str]) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {tuple(allowed)}, got {reduction!r}.")
