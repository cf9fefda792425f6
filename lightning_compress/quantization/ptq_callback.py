"""PostTrainingQuantization: fake-quantized copies of the trained model at the end of ``fit`` (or through
``trainer.validate``), their accuracy logged. The math is in ``ptq.py``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_compress.quantization.ptq import (
    PTQ_MODES,
    _Calibration,
    _validate_bit_widths,
    _validate_calibration_batches,
    classification_accuracy,
    quantize_model,
    resolve_specs,
)
from lightning_compress.quantization.quantizers import validate_flag
from lightning_compress.quantization.residual import check_residual_options
from lightning_compress.utils import compression_target, log_scalars
from lightning_compress.utils.data import ChecksNetworkInput, stage_loader

__all__ = ["PostTrainingQuantization"]


def _validate_modes(modes: str | list[str]) -> list[str]:
    """``modes`` as a non-empty list of known modes, or a ``ValueError``."""
    allowed = ", ".join(map(repr, PTQ_MODES))
    chosen = [modes] if isinstance(modes, str) else list(modes)
    if not chosen:
        raise ValueError(f"modes={modes!r} is empty; give one or more of {allowed}")
    for mode in chosen:
        if mode not in PTQ_MODES:
            raise ValueError(f"Unknown mode {mode!r}; allowed: {allowed}")
    return chosen


class PostTrainingQuantization(ChecksNetworkInput, Callback):
    """Post-training quantization of the compression target, at the end of ``fit`` or through
    ``trainer.validate``: each of ``modes`` yields a fake-quantized copy (the trained model is untouched) whose
    accuracy on the validation data is logged as ``ptq/<mode>/acc`` (and the float one as ``ptq/fp32/acc``).

    The copies are kept in :attr:`models` (e.g. for ``export_int8``) and the accuracies in :attr:`results`. Static
    calibration uses the validation loader of the datamodule (the full split on every rank, so all ranks agree) or
    the data given to :meth:`set_calibration_data`.

    Args:
        modes: one of ``"weight_only"``, ``"static"``, ``"dynamic"`` or a non-empty list of them.
        num_bits: 2 to 16.
        calibration: static calibration method (see :func:`quantize_model`).
        amax: threshold(s) for ``"global"``.
        layers: layer names or regexes inside the compression target.
        exclude: names or regexes left float.
        bit_widths: ``{pattern: bits}`` overriding ``num_bits``.
        per_channel: per-output-channel weight ``amax``.
        calibration_batches: at most this many calibration batches (a positive integer; ``None``: all).
        percentile: for ``"percentile"``, in ``(0, 100]``.
        num_bins: histogram bins (>= 2).
        reduce_range: inputs one bit narrower, for an int8 export that runs exactly under the ``x86`` kernels on
            any x86 CPU (see :class:`~lightning_compress.QuantizationAwareTraining`).
        residual_quantizers: in the ``"static"`` mode, also quantize the tensors its int8 export stores in 8 bits
            (outputs feeding residual additions, the residual stream; :mod:`~lightning_compress.quantization.residual`).

    Raises:
        ValueError: an unknown mode, no mode, or any invalid setting (in ``__init__``); a layer pattern matching
            no layer, an unsupported layer type, a ``{pattern: amax}`` missing a layer (in ``setup`` of ``fit``
            and ``validate``, before the first step).
    """

    def __init__(
        self,
        modes: str | list[str] = "static",
        num_bits: int = 8,
        calibration: str = "max",
        amax: float | dict[str, float] | None = None,
        layers: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        bit_widths: dict[str, int] | None = None,
        per_channel: bool = True,
        calibration_batches: int | None = None,
        percentile: float = 99.99,
        num_bins: int = 2048,
        reduce_range: bool = False,
        residual_quantizers: bool = False,
    ) -> None:
        self.modes = _validate_modes(modes)
        check_residual_options(residual_quantizers, "static", calibration)
        self.residual_quantizers = residual_quantizers
        _validate_bit_widths(num_bits, bit_widths, reduce_range)
        self._settings = _Calibration(calibration, amax, percentile, num_bins)
        _validate_calibration_batches(calibration_batches)
        validate_flag("per_channel", per_channel)
        self.options: dict[str, Any] = {
            "num_bits": num_bits, "calibration": calibration, "amax": amax, "layers": layers, "exclude": exclude,
            "bit_widths": bit_widths, "per_channel": per_channel, "calibration_batches": calibration_batches,
            "percentile": percentile, "num_bins": num_bins, "reduce_range": reduce_range,
        }
        self.models: dict[str, Any] = {}
        self.results: dict[str, float] = {}
        self._calibration_data: Any = None

    def set_calibration_data(self, data: Any) -> None:
        """Calibrate on ``data`` (a tensor or an iterable of batches) instead of the validation loader."""
        self._calibration_data = data

    def evaluate(self, model: nn.Module, loader: Iterable[Any], device: torch.device) -> float:
        """Public override point: the accuracy logged for each variant (top-1 on ``(inputs, targets)`` batches)."""
        return classification_accuracy(model, loader, device)

    def _val_loader(self, trainer: pl.Trainer) -> Any:
        loader = stage_loader(trainer, "val")
        if loader is None:
            raise ValueError("PostTrainingQuantization needs validation data (a datamodule or val_dataloaders)")
        return loader

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Quantize the compression target in every mode, evaluate, log; returns :attr:`results`."""
        target = compression_target(pl_module)
        loader = self._val_loader(trainer)
        data = self._calibration_data if self._calibration_data is not None else loader
        self.results = {"fp32": self.evaluate(target, loader, pl_module.device)}
        for mode in self.modes:
            static = mode == "static"
            self.models[mode] = quantize_model(target, mode, data if static else None, **self.options,
                                               residual_quantizers=static and self.residual_quantizers)
            self.results[mode] = self.evaluate(self.models[mode], loader, pl_module.device)
        log_scalars(trainer, {f"ptq/{mode}/acc": acc for mode, acc in self.results.items()})
        return self.results

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in ("fit", "validate"):  # where this callback runs: fail on a bad pattern before the first step
            self._check_layers(compression_target(pl_module))

    def _check_layers(self, target: nn.Module) -> None:
        """Resolve the layer patterns (and the global amax patterns) against ``target`` without changing it."""
        options = self.options
        specs = resolve_specs(target, layers=options["layers"], exclude=options["exclude"],
                              num_bits=options["num_bits"], bit_widths=options["bit_widths"],
                              per_channel=options["per_channel"], unsigned=False, learn="none",
                              reduce_range=options["reduce_range"])
        self._settings.check_covers(specs)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.run(trainer, pl_module)

