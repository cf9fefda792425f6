"""Activation ranges that follow a network while it trains (``QuantizationAwareTraining(ranges=...)``).

Ranges calibrated once on an untrained network are outgrown as it learns: its activations widen and get clipped
(``ranges="fixed"``, the classic fine-tuning flow of Jacob et al. 2018). ``ranges="track"`` updates every input
range at every training step with a moving average of the batch's min and max, as torch.ao's
``MovingAverageMinMaxObserver`` (averaging constant 0.01) and TF-MOT's ``MovingAverageQuantizer`` (EMA decay 0.999
of the range) do, until ``freeze_epoch``; quantization is symmetric, so the threshold in use is
``amax = max(-min, max)`` (``max`` for an unsigned input: a tracked input whose calibration data were all
non-negative, e.g. after a ReLU, becomes unsigned, as torch.ao's ``quint8`` activations). The first range is the
calibrated one (the calibrator's method applies there). Under DDP each step's batch min / max are all-reduced
first, so every rank tracks the range of the global batch and holds the same value. No Lightning here: the
callback wires these pieces.

``ranges="auto"`` picks ``"track"`` for a network QAT starts on from scratch (attached before the first training
step while every quantized layer's weights are still within PyTorch's default initialisation bound
``1/sqrt(fan_in)``) and ``"fixed"`` otherwise (a trained network being fine-tuned, or ``start_epoch > 0`` after
float training). Learned ranges (``learn="lsq"`` / ``"pact"``) and user-given ones (``calibration="global"``) are
not tracked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AVERAGING_CONSTANT",
    "RANGES",
    "RangeTracker",
    "choose_ranges",
    "connect_trackers",
    "looks_untrained",
    "signs_from_data",
    "start_tracking",
    "validate_ranges",
]

RANGES = ("auto", "track", "fixed")
#: torch.ao's ``MovingAverageMinMaxObserver`` default (TF-MOT's EMA decay 0.999 weighs a batch 0.001)
AVERAGING_CONSTANT = 0.01

Reducer = Callable[[Tensor], Tensor]


def validate_ranges(ranges: str, averaging_constant: float, learn: str = "none") -> None:
    """Raise a ``ValueError`` quoting the value unless ``ranges`` is one of :data:`RANGES`, the averaging constant
    is in ``(0, 1]`` and a tracked range is not a learned one.

    >>> validate_ranges("track", 0.01, learn="lsq")
    Traceback (most recent call last):
    ...
    ValueError: ranges='track' cannot be combined with learn='lsq' (its ranges are learned); use ranges='auto'
    """
    if ranges not in RANGES:
        raise ValueError(f"ranges={ranges!r} is not supported; allowed: {', '.join(map(repr, RANGES))}")
    if isinstance(averaging_constant, bool) or not isinstance(averaging_constant, int | float) \
            or not 0 < averaging_constant <= 1:
        raise ValueError(f"averaging_constant={averaging_constant!r} must be a number in (0, 1]")
    if ranges == "track" and learn != "none":
        raise ValueError(f"ranges='track' cannot be combined with learn={learn!r} (its ranges are learned); "
                         "use ranges='auto'")


def looks_untrained(layers: Mapping[str, Any]) -> bool:
    """Whether every layer's weight (and bias) still lies within PyTorch's default initialisation bound
    ``1/sqrt(fan_in)`` (``kaiming_uniform_(a=sqrt(5))``), as a network that has not trained yet does.

    >>> _ = torch.manual_seed(0); layer = torch.nn.Linear(16, 4); looks_untrained({"fc": layer})
    True
    >>> _ = layer.weight.data.mul_(3.0); looks_untrained({"fc": layer})
    False
    """
    for layer in layers.values():
        weight = layer.weight.detach()
        bound = 1.0 / math.sqrt(max(weight[0].numel(), 1)) * (1 + 1e-6)
        if weight.numel() and float(weight.abs().max()) > bound:
            return False
        bias = getattr(layer, "bias", None)
        if bias is not None and bias.numel() and float(bias.detach().abs().max()) > bound:
            return False
    return True


def choose_ranges(ranges: str, *, learn: str, method: str, untrained: bool) -> str:
    """``"track"`` or ``"fixed"``: ``ranges`` itself unless ``"auto"``, which tracks the ranges of an
    ``untrained`` network unless they are learned (``learn``) or given (``method="global"``).

    >>> choose_ranges("auto", learn="none", method="entropy", untrained=True)
    'track'
    >>> choose_ranges("auto", learn="none", method="entropy", untrained=False)
    'fixed'
    """
    if ranges != "auto":
        return ranges
    return "track" if untrained and learn == "none" and method != "global" else "fixed"


class RangeTracker:
    """Moving-average min / max of a tensor's values (torch.ao ``MovingAverageMinMaxObserver``):
    ``min <- min + c (batch min - min)``, likewise ``max``.

    Args:
        low: the starting min.
        high: the starting max.
        averaging_constant: ``c`` in ``(0, 1]``.

    >>> tracker = RangeTracker(-1.0, 2.0, averaging_constant=0.5)
    >>> tracker.update(torch.tensor([-3.0, 4.0]))  # min -2, max 3
    tensor(3.)
    >>> tracker.amax(unsigned=False), tracker.amax(unsigned=True)
    (tensor(3.), tensor(3.))
    """

    def __init__(self, low: float, high: float, averaging_constant: float = AVERAGING_CONSTANT) -> None:
        self.low = torch.tensor(float(low))
        self.high = torch.tensor(float(high))
        self.averaging_constant = float(averaging_constant)
        self.unsigned = False
        #: maps ``[-batch min, batch max]`` to the values every rank agrees on (DDP: an all-reduce MAX)
        self.reducer: Reducer | None = None

    def amax(self, unsigned: bool | None = None) -> Tensor:
        """The symmetric threshold: ``max(-min, max)``, or ``max`` when ``unsigned``."""
        unsigned = self.unsigned if unsigned is None else unsigned
        return self.high.clamp_min(0) if unsigned else torch.maximum(-self.low, self.high).clamp_min(0)

    @torch.no_grad()
    def update(self, x: Tensor) -> Tensor:
        """Fold one batch in and return the new threshold (on ``x``'s device)."""
        if x.numel():
            low, high = torch.aminmax(x.detach().float())
            bounds = torch.stack([-low, high])
            if self.reducer is not None:
                bounds = self.reducer(bounds)
            if self.low.device != x.device:
                self.low, self.high = self.low.to(x.device), self.high.to(x.device)
            bounds = bounds.to(x.device)
            self.low = self.low + self.averaging_constant * (-bounds[0] - self.low)
            self.high = self.high + self.averaging_constant * (bounds[1] - self.high)
        return self.amax()

    def state_dict(self) -> dict[str, Any]:
        return {"low": self.low.detach().cpu().clone(), "high": self.high.detach().cpu().clone(),
                "averaging_constant": self.averaging_constant, "unsigned": self.unsigned}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RangeTracker:
        tracker = cls(0.0, 0.0, state["averaging_constant"])
        tracker.low, tracker.high = state["low"].clone().float(), state["high"].clone().float()
        tracker.unsigned = bool(state["unsigned"])
        return tracker


def start_tracking(layers: Mapping[str, Any], averaging_constant: float = AVERAGING_CONSTANT,
                   reduce_min: Callable[[float], float] | None = None) -> dict[str, RangeTracker]:
    """One tracker per layer's input, starting at its calibrated ``amax``: max ``amax``, min the smallest value
    calibration saw (``min_seen``, over every rank through ``reduce_min``) within ``[-amax, 0]`` (``0`` if unsigned).

    >>> from lightning_compress.quantization.quantizers import QuantSpec, attach_quantizer
    >>> layer = attach_quantizer(torch.nn.Linear(2, 2), QuantSpec())
    >>> _ = layer.input_quantizer.amax.fill_(4.0); layer.input_quantizer.min_seen = -1.0
    >>> tracker = start_tracking({"fc": layer})["fc"]; float(tracker.low), float(tracker.high)
    (-1.0, 4.0)
    """
    trackers = {}
    for name, layer in layers.items():
        inq = layer.input_quantizer
        amax = float(inq.amax.detach().reshape(-1)[0]) if inq.amax.numel() else 0.0
        low = float(inq.min_seen)
        if reduce_min is not None:
            low = float(reduce_min(low))
        low = 0.0 if inq.unsigned else min(max(low, -amax), 0.0)  # an infinite min_seen (no data): 0
        tracker = RangeTracker(low, amax, averaging_constant)
        tracker.unsigned = bool(inq.unsigned)
        trackers[name] = tracker
    return trackers


def signs_from_data(layers: Mapping[str, Any]) -> None:
    """Let every signed, not learned input become unsigned at the end of calibration if all it saw (on every rank)
    was non-negative, e.g. after a ReLU: ``[0, 2^b - 1]`` as torch.ao's ``quint8`` activations, twice the
    resolution of a symmetric signed range on such data (``ptq._choose_sign`` decides)."""
    for layer in layers.values():
        inq = layer.input_quantizer
        inq.sign_from_data = inq.sign_from_data or (not inq.unsigned and inq.learn == "none")


def connect_trackers(layers: Mapping[str, Any], trackers: Mapping[str, RangeTracker],
                     reducer: Reducer | None = None) -> None:
    """Let each layer's input quantizer update its range from ``trackers`` at every call (an empty mapping
    disconnects them all, and the trackers drop their reducer)."""
    for name, layer in layers.items():
        if layer.input_quantizer.tracker is not None:
            layer.input_quantizer.tracker.reducer = None
        tracker = trackers.get(name)
        if tracker is not None:
            tracker.reducer = reducer
        layer.input_quantizer.tracker = tracker
