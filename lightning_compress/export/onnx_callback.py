"""OnnxExport: the compression target as an ONNX file, verified in onnxruntime, at the end of ``fit``.

The Lightning side of :func:`~lightning_compress.export.onnx.export_onnx`; modelled on
:class:`~lightning_compress.export.int8_callback.Int8Export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_compress.export.int8_callback import _validation_batches
from lightning_compress.export.onnx import DEFAULT_OPSET, OnnxMismatchError, _validate, export_onnx
from lightning_compress.export.qdq import _check_static
from lightning_compress.export.verify import check_export_settings
from lightning_compress.quantization.quantizers import quantized_layers
from lightning_compress.utils import compression_target, first_tensor, log_scalars, run_directory
from lightning_compress.utils.data import ChecksNetworkInput, collect_inputs

__all__ = ["OnnxExport"]


class OnnxExport(ChecksNetworkInput, Callback):
    """Writes ``pl_module.compression_target`` (float, compacted or fake-quantized) as ONNX at the end of ``fit``.

    At ``on_fit_end`` (global rank zero only) it calls :func:`~lightning_compress.export.onnx.export_onnx` with
    ``batch_size`` validation inputs as the example batch (their first dimension dynamic) and verifies the file in
    onnxruntime on them and on the validation batches (at most ``eval_batches``, limited like the validation loop).
    Quantized layers become QuantizeLinear / DequantizeLinear pairs with the run's scales and int8 weights. It logs
    ``onnx/agreement``, ``onnx/max_abs_diff`` and ``onnx/size_bytes``; below ``min_agreement`` (or above
    ``max_abs_diff``) the run fails with :class:`~lightning_compress.export.onnx.OnnxMismatchError` and no file is
    written. A quantizer still calibrating or dynamic at the end warns and skips. :meth:`export` is public and runs
    once per fit (``CompressionReport`` calls it to measure the deployed file).

    Args:
        output_dir: where ``<filename>.onnx`` is written; defaults to the logger's run directory.
        filename: file name without the ``.onnx`` extension.
        batch_size: validation inputs used as the example batch.
        eval_batches: at most this many validation batches are verified (``None``: as the validation loop;
            ``0``: the example batch only).
        opset: the ONNX opset (13 to 20).
        min_agreement: the smallest share of samples whose argmax matches the PyTorch model; ``None`` never fails.
        max_abs_diff: the largest allowed output difference; ``None`` never fails on it.
        integer_kernels: see :func:`~lightning_compress.export.onnx.export_onnx` (``None``: where exact).

    Raises:
        ValueError: an empty ``filename``, a non-positive ``batch_size``, a negative ``eval_batches``, an opset or
            threshold out of range (in ``__init__``).
        OnnxMismatchError: at the end of fit, when onnxruntime disagrees beyond the thresholds.

    Attributes:
        results: what :func:`~lightning_compress.export.onnx.export_onnx` returned, or ``skipped`` (the reason);
            ``None`` before the export.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        filename: str = "model",
        batch_size: int = 64,
        eval_batches: int | None = None,
        opset: int = DEFAULT_OPSET,
        min_agreement: float | None = 0.995,
        max_abs_diff: float | None = None,
        integer_kernels: bool | None = None,
    ) -> None:
        check_export_settings(filename, batch_size, eval_batches)
        _validate(opset, min_agreement, max_abs_diff)
        self.output_dir, self.filename, self.batch_size = output_dir, filename, batch_size
        self.eval_batches = eval_batches
        self.opset, self.min_agreement, self.max_abs_diff = opset, min_agreement, max_abs_diff
        self.integer_kernels = integer_kernels
        self.results: dict[str, Any] | None = None

    def path(self, trainer: pl.Trainer) -> Path:
        """The file the model is written to."""
        return Path(self.output_dir or run_directory(trainer)) / f"{self.filename}.onnx"

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(trainer, pl_module)

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """Export, verify, write and log once per fit (later calls return the same results); rank zero only."""
        if self.results is not None or not trainer.is_global_zero:
            return self.results
        target = compression_target(pl_module)
        reason = _not_static(target)
        if reason is not None:
            rank_zero_warn(f"OnnxExport skipped: {reason}. No ONNX file was written.")
            self.results = {"skipped": reason}
            return self.results
        inputs = collect_inputs(trainer, self.batch_size).cpu()
        checks = [first_tensor(batch).cpu() for batch in _validation_batches(trainer, self.eval_batches)]
        device = next((p.device for p in target.parameters()), None)
        target.cpu()
        try:
            self.results = export_onnx(target, inputs, self.path(trainer), opset=self.opset, check_inputs=checks,
                                       min_agreement=self.min_agreement, max_abs_diff=self.max_abs_diff,
                                       integer_kernels=self.integer_kernels)
        except OnnxMismatchError as error:
            raise OnnxMismatchError(f"OnnxExport: {error}") from error
        finally:
            if device is not None:
                target.to(device)
        log_scalars(trainer, {"onnx/agreement": self.results["agreement"],
                              "onnx/max_abs_diff": self.results["max_abs_diff"],
                              "onnx/size_bytes": self.results["size_bytes"]})
        return self.results


def _not_static(target: Any) -> str | None:
    for name, layer in quantized_layers(target).items():
        try:
            _check_static(layer.input_quantizer)
        except ValueError as error:
            return f"layer {name!r}: {error}"
    return None
