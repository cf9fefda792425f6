"""How a fractional number of channels (a rate times a count) becomes a whole number."""

from __future__ import annotations

import math

__all__ = ["ROUNDINGS", "check_rounding", "round_count"]

#: ``"nearest"`` (halves up), ``"up"`` (at least the rate: Torch-Pruning's count), ``"down"`` (at most the rate)
ROUNDINGS = ("nearest", "up", "down")


def check_rounding(rounding: str) -> str:
    """Return ``rounding``, or raise ``ValueError`` if it is not one of :data:`ROUNDINGS`."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")
    return rounding


def round_count(value: float, rounding: str = "nearest") -> int:
    """``value`` (a fractional number of units) as a whole number: ``"nearest"`` (halves up), ``"up"`` or
    ``"down"``, ignoring float noise of 1e-9 (``0.55 * 100`` rounds up to 55, not 56).

    >>> round_count(6.4), round_count(6.4, "up"), round_count(6.5), round_count(0.55 * 100, "up")
    (6, 7, 7, 55)
    """
    if check_rounding(rounding) == "up":
        return math.ceil(value - 1e-9)
    if rounding == "down":
        return math.floor(value + 1e-9)
    return math.floor(value + 0.5)
