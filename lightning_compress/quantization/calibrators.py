"""Calibrators: the statistics a quantizer collects from data (running max, histograms of ``|x|``) and the ``amax``
they give, with TensorRT's conventions (:mod:`~lightning_compress.quantization.amax` holds the searches), plus the
one-shot :func:`compute_amax`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_compress.quantization.amax import (
    METHODS,
    _check_unsigned,
    _what,
    amax_entropy,
    amax_mse,
    amax_percentile,
    check_finite,
    validate_method,
    validate_percentile,
)
from lightning_compress.quantization.functional import validate_num_bits

__all__ = [
    "METHODS",
    "HistogramCalibrator",
    "MaxCalibrator",
    "amax_entropy",
    "amax_mse",
    "amax_percentile",
    "check_finite",
    "compute_amax",
    "validate_method",
    "validate_percentile",
]


# --------------------------------------------------------------------------------------- calibrators


class MaxCalibrator:
    """Running max of ``|x|``, per tensor or per channel along ``axis``.

    Args:
        axis: channel axis to keep (e.g. 0 for weights); ``None`` for one amax.
        unsigned: data must be non-negative.
        name: layer name used in error messages.

    >>> cal = MaxCalibrator(axis=0)
    >>> cal.collect(torch.tensor([[1.0, -2.0], [0.5, 0.25]])); cal.collect(torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    >>> cal.compute_amax()
    tensor([2., 3.])
    """

    def __init__(self, axis: int | None = None, *, unsigned: bool = False, name: str | None = None) -> None:
        self.axis, self.unsigned, self.name = axis, unsigned, name
        self.amax: Tensor | None = None

    def collect(self, x: Tensor) -> None:
        """Update the running max with a batch (NaN / Inf raise a ``ValueError`` naming the layer)."""
        x = x.detach()
        check_finite(x, self.name)
        _check_unsigned(x, self.unsigned, self.name)
        a = x.abs().float()
        if self.axis is None:
            batch = a.max() if a.numel() else torch.zeros(())
        else:
            batch = a.transpose(0, self.axis).reshape(a.shape[self.axis], -1).amax(dim=1)
        self.amax = batch.cpu() if self.amax is None else torch.maximum(self.amax, batch.cpu())

    def merge_(self, other: MaxCalibrator) -> MaxCalibrator:
        """Fold another calibrator's max into this one (e.g. after gathering across ranks)."""
        if other.amax is not None:
            self.amax = other.amax.clone() if self.amax is None else torch.maximum(self.amax, other.amax)
        return self

    def compute_amax(self) -> Tensor:
        """The running max; raises a ``RuntimeError`` before any data."""
        if self.amax is None:
            raise RuntimeError(f"MaxCalibrator for {_what(self.name)} has collected no data")
        return self.amax.clone()

    def reset(self) -> None:
        self.amax = None

    def state_dict(self) -> dict[str, Any]:
        return {"amax": None if self.amax is None else self.amax.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.amax = None if state["amax"] is None else state["amax"].detach().cpu().float().clone()


class HistogramCalibrator:
    """Histogram of ``|x|`` over many batches (never the activations themselves).

    ``num_bins`` bins over ``[0, max of the first batch]``; a later batch with a larger max appends bins of the same
    width (``ceil(max / width)`` bins in all). Counts are int64. State: ``counts``, ``bin_width`` and the exact
    ``max`` seen, a few KiB whatever the number of batches.

    Across ranks (DDP): all-reduce (MAX) each batch's ``|x|.max()`` and pass it as ``range_max`` to
    :meth:`collect`, so every rank grows its bins identically; after calibration all-reduce (SUM) ``counts`` and
    (MAX) ``max`` (or gather and :meth:`merge_`). The result equals one process collecting the global batches.

    Args:
        num_bins: bins over the first batch's range.
        unsigned: data must be non-negative.
        name: layer name used in error messages.

    >>> cal = HistogramCalibrator(num_bins=4)
    >>> cal.collect(torch.tensor([0.1, -0.6, 1.0, 2.0])); cal.collect(torch.tensor([2.9]))
    >>> cal.counts, cal.bin_width, cal.compute_amax("percentile", percentile=50.0)
    (tensor([1, 1, 1, 1, 0, 1]), 0.5, tensor(1.))
    """

    def __init__(self, num_bins: int = 2048, *, unsigned: bool = False, name: str | None = None) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins={num_bins!r} must be an integer >= 2")
        self.num_bins, self.unsigned, self.name = num_bins, unsigned, name
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.bin_width = 0.0  # 0 while only zeros (or nothing) were seen
        self.max = 0.0

    @property
    def range_max(self) -> float:
        """Upper edge of the last bin."""
        return self.bin_width * self.counts.numel()

    def collect(self, x: Tensor, *, range_max: float | Tensor | None = None) -> None:
        """Add a batch. ``range_max`` (>= ``|x|.max()``) replaces the batch max for the range, e.g. the max
        all-reduced across ranks. NaN / Inf raise a ``ValueError`` naming the layer."""
        x = x.detach()
        check_finite(x, self.name)
        _check_unsigned(x, self.unsigned, self.name)
        a = x.abs().float().reshape(-1)
        if a.numel() == 0:
            return
        batch_max = float(a.max())
        top = batch_max if range_max is None else float(range_max)
        if top < batch_max:
            raise ValueError(f"range_max={top!r} is below the batch max {batch_max!r} of {_what(self.name)}")
        self.max = max(self.max, batch_max)
        if self.bin_width == 0.0:
            if top == 0.0:
                zeros = torch.zeros(self.num_bins, dtype=torch.int64)
                zeros[0] = a.numel() + (int(self.counts[0]) if self.counts.numel() else 0)
                self.counts = zeros
                return
            previous_zeros = int(self.counts[0]) if self.counts.numel() else 0
            self.bin_width = top / self.num_bins
            self.counts = torch.zeros(self.num_bins, dtype=torch.int64)
            self.counts[0] = previous_zeros
        else:  # keep the width, add bins (tolerance: first max / width may round to just above num_bins)
            grown = math.ceil(top / self.bin_width * (1 - 1e-12))
            if grown > self.counts.numel():
                extra = torch.zeros(grown - self.counts.numel(), dtype=torch.int64)
                self.counts = torch.cat([self.counts, extra])
        n = self.counts.numel()
        idx = (a * n / self.range_max).long().clamp_(0, n - 1)  # torch.histc arithmetic
        self.counts += torch.bincount(idx, minlength=n).cpu()  # no weights: deterministic on CUDA too

    def merge_(self, other: HistogramCalibrator) -> HistogramCalibrator:
        """Add another histogram with the same bin width (bins appended as needed)."""
        if other.counts.numel() == 0:
            return self
        if self.bin_width and other.bin_width and not math.isclose(self.bin_width, other.bin_width, rel_tol=1e-12):
            raise ValueError(
                f"cannot merge histograms of bin widths {self.bin_width!r} and {other.bin_width!r}; "
                "pass a common range_max to collect() on every rank"
            )
        n = max(self.counts.numel(), other.counts.numel())
        merged = torch.zeros(n, dtype=torch.int64)
        merged[: self.counts.numel()] += self.counts
        merged[: other.counts.numel()] += other.counts
        self.counts, self.bin_width = merged, self.bin_width or other.bin_width
        self.max = max(self.max, other.max)
        return self

    def compute_amax(
        self,
        method: str,
        *,
        num_bits: int = 8,
        start_bin: int = 128,
        stride: int = 1,
        percentile: float = 99.99,
    ) -> Tensor:
        """amax by ``method`` (``"max"``, ``"percentile"``, ``"mse"``, ``"entropy"`` / ``"kl"``); 0 for all-zero data.

        Raises:
            ValueError: unknown method, bits outside 2..16, percentile outside (0, 100], ``start_bin`` past the bins.
            RuntimeError: no data collected yet.
        """
        method = validate_method(method)
        validate_num_bits(num_bits)
        validate_percentile(percentile)
        if self.counts.numel() == 0:
            raise RuntimeError(f"HistogramCalibrator for {_what(self.name)} has collected no data")
        if self.bin_width == 0.0:
            return torch.tensor(0.0)
        if method == "max":
            return torch.tensor(self.max, dtype=torch.float32)
        if method == "percentile":
            return amax_percentile(self.counts, self.bin_width, percentile)
        search = amax_mse if method == "mse" else amax_entropy
        return search(
            self.counts, self.bin_width, num_bits=num_bits, unsigned=self.unsigned, start_bin=start_bin, stride=stride
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts.clone(),
            "bin_width": self.bin_width,
            "max": self.max,
            "num_bins": self.num_bins,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = state["counts"].detach().cpu().to(torch.int64).clone()
        self.bin_width, self.max = float(state["bin_width"]), float(state["max"])
        self.num_bins = int(state["num_bins"])


# ----------------------------------------------------------------------------------------- one shot


def compute_amax(
    x: Tensor,
    method: str,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    num_bins: int = 2048,
    start_bin: int = 128,
    stride: int = 1,
    percentile: float = 99.99,
    axis: int | None = None,
    name: str | None = None,
) -> Tensor:
    """Clipping threshold of one tensor by ``method``, in TensorRT / NVIDIA conventions (module docstring).

    Args:
        x: data (weights or a batch of activations).
        method: ``"max"``, ``"percentile"``, ``"mse"``, ``"entropy"`` (``"kl"`` is the same).
        num_bits: 2 to 16.
        unsigned: non-negative data quantized to ``[0, 2^b - 1]``.
        num_bins: histogram bins over ``[0, max|x|]``.
        start_bin: first candidate bin of the mse / entropy searches.
        stride: step between candidates.
        percentile: in ``(0, 100]``.
        axis: one amax per slice along ``axis`` (each slice with its own histogram).
        name: layer name for error messages.

    Raises:
        ValueError: unknown method, bits outside 2..16, percentile outside (0, 100], NaN / Inf in ``x``, negative
            data with ``unsigned``.

    >>> x = torch.linspace(-1, 1, 201)
    >>> compute_amax(x, "max"), compute_amax(x, "percentile", num_bins=100, percentile=90.0)
    (tensor(1.), tensor(0.9000))
    """
    method = validate_method(method)
    validate_num_bits(num_bits)
    validate_percentile(percentile)
    x = x.detach()
    check_finite(x, name)
    _check_unsigned(x, unsigned, name)
    if axis is not None:
        if method == "max":
            return x.abs().transpose(0, axis).reshape(x.shape[axis], -1).amax(dim=1).float().cpu()
        per_slice = []
        for s in x.transpose(0, axis).reshape(x.shape[axis], -1):  # one histogram per channel
            cal = HistogramCalibrator(num_bins, unsigned=unsigned, name=name)
            cal.collect(s)
            per_slice.append(
                cal.compute_amax(method, num_bits=num_bits, start_bin=start_bin, stride=stride, percentile=percentile)
            )
        return torch.stack(per_slice)
    if method == "max":
        return x.abs().max().float().cpu() if x.numel() else torch.tensor(0.0)
    cal = HistogramCalibrator(num_bins, unsigned=unsigned, name=name)
    cal.collect(x)
    return cal.compute_amax(method, num_bits=num_bits, start_bin=start_bin, stride=stride, percentile=percentile)
