"""CompressionReport: what the compression bought, measured at the end of ``fit``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.measure import (
    check_integer,
    compare_with_references,
    format_markdown,
    measure_latency,
    measure_model,
)
from lightning_compress.utils import compression_target, log_scalars, log_text, run_directory
from lightning_compress.utils.data import ChecksNetworkInput, collect_inputs
from lightning_compress.utils.outputs import move_inputs

__all__ = ["CompressionReport", "collect_inputs", "measure_model"]


class CompressionReport(ChecksNetworkInput, Callback):
    """Measures the compressed network at the end of ``fit`` and writes ``compression_report.json`` and ``.md``.

    It measures ``pl_module.compression_target`` (the student of a distillation run, the backbone of a
    ``ClassifierModule``) or the whole LightningModule: parameters, non-zero parameters, bytes of the saved
    state, multiply-adds per sample (dense and non-zero), median CPU latency on a batch of ``batch_size`` inputs
    from the validation data, and the last value of ``monitor``. It logs them as ``report/<key>`` through every
    logger, adds the Markdown table to TensorBoard as text (``report/table``) and writes both files into
    ``output_dir`` (default: the logger's directory). Put it after the compression callbacks, so that it sees
    the model they leave. Only global rank zero measures and writes.

    **int8.** When an :class:`~lightning_compress.Int8Export` is among ``trainer.callbacks`` (and
    ``measure_int8``), the report calls its :meth:`~lightning_compress.Int8Export.export` (whatever the callback
    order; the export runs once) and measures the exported int8 model instead, on CPU: its packed int8
    parameters, bytes and multiply-adds, its latency, and ``accuracy`` = ``export/acc`` (``accuracy_metric`` says
    so). The fake-quantized float-structure model's ``monitor`` value is kept as ``fake_quant_accuracy`` (with
    ``fake_quant_accuracy_metric``), and the export's file, size, agreement and format under ``int8_export``. When
    the export skipped (no quantized layers), the float model is measured as usual.

    **ONNX.** When an :class:`~lightning_compress.OnnxExport` is among the callbacks (and ``measure_onnx``), the
    report calls its ``export`` and measures the deployed file: ``onnx`` holds its path, opset, agreement and
    largest difference with the PyTorch model, ``size_bytes``, onnxruntime latency (1 thread) at batch 1 and 64
    and the PyTorch model's CPU latency at the same sizes beside it (``torch_latency_ms``).

    **References.** ``references`` (or :meth:`set_reference`) names earlier runs to compare with, e.g. the
    uncompressed teacher and the student trained alone. The report gets a ``references`` section with, for each,
    its ``accuracy``, ``parameters``, ``size_bytes``, ``macs``, ``latency_ms`` (and latency settings) and
    ``ratios``: reference / this model for each size, compute and latency key (above 1: this model is smaller or
    faster), ``accuracy_delta`` (this model - reference) and ``accuracy_delta_points`` (the same x 100, for
    accuracies in [0, 1]). The Markdown gets one comparison table (a row per reference and one for this model) and
    the ratios are logged as ``report/reference/<name>/<key>``. ``baseline`` works as before, independently.

    Args:
        monitor: the accuracy metric in ``trainer.callback_metrics``; ``None`` reports no accuracy. A name the module
            never logs fails the fit at the end of its first validation (or warns at the end of the fit when no
            validation ran), listing the metrics that were logged.
        batch_size: inputs per latency measurement (gathered from the validation, else training, loader).
        latency_runs: timed repetitions (median reported).
        warmup: untimed repetitions first.
        num_threads: torch threads during the latency measurement.
        baseline: path to an earlier ``compression_report.json`` to compare with (ratios are baseline / this).
            In Python a model or a report dictionary also works; see :meth:`set_baseline`.
        baseline_accuracy: the baseline model's accuracy, when ``baseline`` is a model.
        output_dir: where to write the files; defaults to ``trainer.log_dir``.
        filename: file name without extension.
        references: ``{name: path of an earlier compression_report.json}``, e.g. ``{"teacher": ...,
            "student_alone": ...}``; see :meth:`set_reference` for models and dictionaries.
        measure_int8: measure the int8 model of an ``Int8Export`` among the callbacks (see above).
        measure_onnx: measure the file of an ``OnnxExport`` among the callbacks (see above).

    Raises:
        ValueError: for a ``batch_size``/``latency_runs``/``num_threads`` that is not a positive integer, a
            ``warmup`` that is not a non-negative integer, a baseline or reference file that does not exist, or an
            empty reference name.
    """

    def __init__(
        self,
        monitor: str | None = "val/acc",
        batch_size: int = 64,
        latency_runs: int = 20,
        warmup: int = 5,
        num_threads: int | None = 1,
        baseline: str | None = None,
        baseline_accuracy: float | None = None,
        output_dir: str | None = None,
        filename: str = "compression_report",
        references: dict[str, str] | None = None,
        measure_int8: bool = True,
        measure_onnx: bool = True,
    ) -> None:
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor must be a metric name or None, got {monitor!r}.")
        self.monitor = monitor
        self._monitor_checked = False
        self.batch_size = check_integer("batch_size", batch_size, 1)
        self.latency_runs = check_integer("latency_runs", latency_runs, 1)
        self.warmup = check_integer("warmup", warmup, 0)
        self.num_threads = None if num_threads is None else check_integer("num_threads", num_threads, 1)
        self.baseline_accuracy = baseline_accuracy
        self.output_dir = output_dir
        self.filename = filename
        self.measure_int8, self.measure_onnx = measure_int8, measure_onnx
        self.baseline: nn.Module | dict[str, Any] | None = None
        if baseline is not None:
            self.set_baseline(baseline)
        self.references: dict[str, nn.Module | dict[str, Any]] = {}
        self._reference_sources: dict[str, str] = {}
        self._reference_accuracy: dict[str, float | None] = {}
        for name, path in (references or {}).items():
            self.set_reference(name, path)
        self.report: dict[str, Any] | None = None

    def set_baseline(self, baseline: str | Path | nn.Module | dict[str, Any]) -> None:
        """Compare with a report file, a report dictionary or a model (measured on the same inputs)."""
        if isinstance(baseline, (str, Path)):
            path = Path(baseline)
            if not path.is_file():
                raise ValueError(f"baseline report {str(baseline)!r} does not exist.")
            self.baseline = json.loads(path.read_text())
        else:
            self.baseline = baseline

    def set_reference(self, name: str, reference: str | Path | nn.Module | dict[str, Any],
                      accuracy: float | None = None) -> None:
        """Add (or replace) a reference to compare with.

        Args:
            name: its row in the comparison table (``"teacher"``, ``"student_alone"``).
            reference: an earlier ``compression_report.json`` (read now), a report dictionary, or a model
                (measured at the end of ``fit`` on the same inputs, on its own device).
            accuracy: the reference's accuracy; for a report it replaces the recorded one.

        Raises:
            ValueError: for an empty name or a report file that does not exist.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a reference needs a non-empty name, got {name!r}.")
        if isinstance(reference, (str, Path)):
            path = Path(reference)
            if not path.is_file():
                raise ValueError(f"reference {name!r}: report {str(reference)!r} does not exist.")
            self.references[name] = json.loads(path.read_text())
            self._reference_sources[name] = str(path)
        elif isinstance(reference, nn.Module):
            self.references[name] = reference
            self._reference_sources[name] = f"model {type(reference).__name__}"
        else:
            self.references[name] = dict(reference)
            self._reference_sources[name] = "report dictionary"
        self._reference_accuracy[name] = accuracy

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        overridden = (type(self).example_inputs is not CompressionReport.example_inputs
                      or type(self).model_to_measure is not CompressionReport.model_to_measure)
        if not overridden:  # the default input and network: check them before training (ChecksNetworkInput)
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Public override point: the batch the model is measured on (``batch_size`` validation inputs)."""
        return move_inputs(collect_inputs(trainer, self.batch_size), pl_module.device)

    def model_to_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        """Public override point: the network measured (the compression target by default)."""
        return compression_target(pl_module)

    def _missing_monitor(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        if self.monitor is None or self.monitor in trainer.callback_metrics:
            return None
        return (f"CompressionReport(monitor={self.monitor!r}): {type(pl_module).__name__} never logs "
                f"{self.monitor!r}; the metrics logged are {sorted(trainer.callback_metrics)}. Pass one of them as "
                "monitor, or monitor=None to report no accuracy.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._monitor_checked = False

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the first validation of ``fit``: the monitored metric must have been logged by now."""
        if trainer.sanity_checking or self._monitor_checked or trainer.state.fn != "fit":
            return
        self._monitor_checked = True
        missing = self._missing_monitor(trainer, pl_module)
        if missing is not None:
            raise ValueError(missing)

    def _accuracy(self, trainer: pl.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.monitor) if self.monitor is not None else None
        return None if value is None else float(value)

    def _output_dir(self, trainer: pl.Trainer) -> Path:
        directory = self.output_dir or run_directory(trainer)
        return Path(directory)

    def _int8(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[nn.Module, dict[str, Any]] | None:
        """The exported int8 model and the export's results, when an ``Int8Export`` callback produced one."""
        from lightning_compress.export.int8_callback import Int8Export

        if not self.measure_int8:
            return None
        exporter = next((c for c in trainer.callbacks if isinstance(c, Int8Export)),  # type: ignore[attr-defined]
                        None)
        model = exporter.export(trainer, pl_module) if exporter is not None else None
        if exporter is None or model is None or exporter.results is None:
            return None
        return model, exporter.results

    def _onnx(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Any) -> dict[str, Any] | None:
        """The deployed ONNX file of an ``OnnxExport`` callback, measured in onnxruntime beside the PyTorch model."""
        from lightning_compress.export.onnx import measure_onnx
        from lightning_compress.export.onnx_callback import OnnxExport

        exporter = next((c for c in trainer.callbacks if isinstance(c, OnnxExport)),  # type: ignore[attr-defined]
                        None)
        if not self.measure_onnx or exporter is None or not torch.is_tensor(inputs):
            return None
        results = exporter.export(trainer, pl_module)
        if results is None or "path" not in results:
            return None
        batch = inputs.cpu()
        measured = measure_onnx(results["path"], batch, runs=self.latency_runs, warmup=self.warmup)
        model = compression_target(pl_module)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        torch_ms = {size: measure_latency(model, _repeat(batch, size).to(device), runs=self.latency_runs,
                                          warmup=self.warmup, num_threads=self.num_threads)["latency_ms"]
                    for size in measured["latency_ms"]}
        keys = ("path", "opset", "agreement", "max_abs_diff", "quantized_layers")
        return {**{key: results.get(key) for key in keys}, **measured, "torch_latency_ms": torch_ms}

    def _measured_references(self, inputs: Any) -> dict[str, dict[str, Any]]:
        measured: dict[str, dict[str, Any]] = {}
        for name, reference in self.references.items():
            accuracy = self._reference_accuracy.get(name)
            if isinstance(reference, nn.Module):
                device = next((p.device for p in reference.parameters()), torch.device("cpu"))
                reference = measure_model(reference, move_inputs(inputs, device),
                                          accuracy=accuracy, latency_runs=self.latency_runs, warmup=self.warmup,
                                          num_threads=self.num_threads)
            elif accuracy is not None:
                reference = {**reference, "accuracy": accuracy}
            measured[name] = reference
        return measured

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        missing = self._missing_monitor(trainer, pl_module)
        if missing is not None:
            rank_zero_warn(missing)
        int8 = self._int8(trainer, pl_module)
        inputs = self.example_inputs(trainer, pl_module)
        if int8 is not None:
            model, inputs, accuracy = int8[0], inputs.cpu(), int8[1].get("acc")
        else:
            model, accuracy = self.model_to_measure(trainer, pl_module), self._accuracy(trainer)
        self.report = measure_model(
            model,
            inputs,
            accuracy=accuracy,
            baseline=self.baseline,
            baseline_accuracy=self.baseline_accuracy,
            latency_runs=self.latency_runs,
            warmup=self.warmup,
            num_threads=self.num_threads,
        )
        self.report["accuracy_metric"] = self.monitor
        if int8 is not None:
            results = int8[1]
            self.report.update(accuracy_metric="export/acc", fake_quant_accuracy=self._accuracy(trainer),
                               fake_quant_accuracy_metric=self.monitor)
            self.report["int8_export"] = {key: results.get(key) for key in (
                "path", "size_bytes", "format", "agreement", "fake_quant_acc", "samples", "identical_after_load")}
        onnx = self._onnx(trainer, pl_module, inputs)
        if onnx is not None:
            self.report["onnx"] = onnx
        if self.references:
            compared = compare_with_references(self.report, self._measured_references(inputs))
            for name, entry in compared.items():
                entry["source"] = self._reference_sources.get(name)
            self.report["references"] = compared
        self._write(trainer, self.report)

    def _write(self, trainer: pl.Trainer, report: dict[str, Any]) -> None:
        directory = self._output_dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        table = format_markdown(report) + _onnx_markdown(report.get("onnx"))
        (directory / f"{self.filename}.json").write_text(json.dumps(report, indent=2) + "\n")
        (directory / f"{self.filename}.md").write_text(table + "\n")
        rank_zero_info(f"CompressionReport: {directory / self.filename}.md (and .json); in TensorBoard: report/*")
        scalars = {f"report/{k}": v for k, v in report.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scalars.update({f"report/ratio/{k}": v for k, v in report.get("ratios", {}).items()})
        for name, entry in report.get("references", {}).items():
            scalars.update({f"report/reference/{name}/{k}": v for k, v in entry["ratios"].items()})
        log_scalars(trainer, scalars)
        log_text(trainer, "report/table", table)
        for logger in trainer.loggers:
            logger.save()


def _repeat(inputs: torch.Tensor, size: int) -> torch.Tensor:
    repeats = -(-size // inputs.shape[0])
    return inputs.repeat(repeats, *([1] * (inputs.dim() - 1)))[:size]


def _onnx_markdown(onnx: dict[str, Any] | None) -> str:
    if not onnx:
        return ""
    rows = [f"| {size} | {ms:.3f} | {onnx['torch_latency_ms'][size]:.3f} |" for size, ms in onnx["latency_ms"].items()]
    head = (f"\n\nONNX file `{Path(onnx['path']).name}` (opset {onnx['opset']}, {onnx['size_bytes']} bytes, "
            f"agreement {onnx['agreement']:.4f} with PyTorch), onnxruntime on 1 thread:\n\n")
    return head + "| batch | onnxruntime ms | PyTorch ms |\n|---|---|---|\n" + "\n".join(rows)
