"""CompressionReport: what the compression bought, measured at the end of ``fit``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_compress.measure import format_markdown, measure_model
from lightning_compress.utils import compression_target, log_scalars, log_text
from lightning_compress.utils.data import first_tensor

__all__ = ["CompressionReport", "measure_model"]


class CompressionReport(Callback):
    """Measures the compressed network at the end of ``fit`` and writes ``compression_report.json`` and ``.md``.

    It measures ``pl_module.compression_target`` (the student of a distillation run, the backbone of a
    ``ClassifierModule``) or the whole LightningModule: parameters, non-zero parameters, bytes of the saved
    state, multiply-adds per sample (dense and non-zero), median CPU latency on a batch of ``batch_size`` inputs
    from the validation data, and the last value of ``monitor``. It logs them as ``report/<key>`` through every
    logger, adds the Markdown table to TensorBoard as text (``report/table``) and writes both files into
    ``output_dir`` (default: the logger's directory). Put it after the compression callbacks, so that it sees
    the model they leave. Only global rank zero measures and writes.

    Args:
        monitor: the accuracy metric in ``trainer.callback_metrics``.
        batch_size: inputs per latency measurement (gathered from the validation, else training, loader).
        latency_runs: timed repetitions (median reported).
        warmup: untimed repetitions first.
        num_threads: torch threads during the latency measurement.
        baseline: path to an earlier ``compression_report.json`` to compare with (ratios are baseline / this).
            In Python a model or a report dictionary also works; see :meth:`set_baseline`.
        baseline_accuracy: the baseline model's accuracy, when ``baseline`` is a model.
        output_dir: where to write the files; defaults to ``trainer.log_dir``.
        filename: file name without extension.

    Raises:
        ValueError: for non-positive ``batch_size``/``latency_runs``/``num_threads``, a negative ``warmup`` or a
            baseline file that does not exist.
    """

    def __init__(
        self,
        monitor: str = "val/acc",
        batch_size: int = 64,
        latency_runs: int = 20,
        warmup: int = 5,
        num_threads: int | None = 1,
        baseline: str | None = None,
        baseline_accuracy: float | None = None,
        output_dir: str | None = None,
        filename: str = "compression_report",
    ) -> None:
        for name, value in (("batch_size", batch_size), ("latency_runs", latency_runs)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup!r}.")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}.")
        self.monitor = monitor
        self.batch_size = batch_size
        self.latency_runs = latency_runs
        self.warmup = warmup
        self.num_threads = num_threads
        self.baseline_accuracy = baseline_accuracy
        self.output_dir = output_dir
        self.filename = filename
        self.baseline: nn.Module | dict[str, Any] | None = None
        if baseline is not None:
            self.set_baseline(baseline)
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

    def example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Public override point: the batch the model is measured on (``batch_size`` validation inputs)."""
        datamodule = getattr(trainer, "datamodule", None)
        loaders = []
        if datamodule is not None:
            loaders = [datamodule.val_dataloader, datamodule.train_dataloader]
        elif trainer.val_dataloaders is not None:
            loaders = [lambda: trainer.val_dataloaders]
        chunks: list[torch.Tensor] = []
        for make_loader in loaders:
            try:
                loader = make_loader()
            except (NotImplementedError, AttributeError, TypeError):
                continue
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
            for batch in loader:
                chunks.append(first_tensor(batch))
                if sum(len(c) for c in chunks) >= self.batch_size:
                    break
            if chunks:
                break
        if not chunks:
            raise RuntimeError("CompressionReport found no data to measure on; override example_inputs.")
        inputs = torch.cat(chunks)
        repeats = math.ceil(self.batch_size / len(inputs))
        return inputs.repeat(repeats, *([1] * (inputs.dim() - 1)))[: self.batch_size].to(pl_module.device)

    def model_to_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        """Public override point: the network measured (the compression target by default)."""
        return compression_target(pl_module)

    def _accuracy(self, trainer: pl.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.monitor)
        return None if value is None else float(value)

    def _output_dir(self, trainer: pl.Trainer) -> Path:
        directory = self.output_dir or trainer.log_dir or trainer.default_root_dir
        return Path(directory)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = self.model_to_measure(trainer, pl_module)
        self.report = measure_model(
            model,
            self.example_inputs(trainer, pl_module),
            accuracy=self._accuracy(trainer),
            baseline=self.baseline,
            baseline_accuracy=self.baseline_accuracy,
            latency_runs=self.latency_runs,
            warmup=self.warmup,
            num_threads=self.num_threads,
        )
        self.report["accuracy_metric"] = self.monitor
        self._write(trainer, self.report)

    def _write(self, trainer: pl.Trainer, report: dict[str, Any]) -> None:
        directory = self._output_dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        table = format_markdown(report)
        (directory / f"{self.filename}.json").write_text(json.dumps(report, indent=2) + "\n")
        (directory / f"{self.filename}.md").write_text(table + "\n")
        scalars = {f"report/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and v is not None}
        scalars.update({f"report/ratio/{k}": v for k, v in report.get("ratios", {}).items()})
        log_scalars(trainer, scalars)
        log_text(trainer, "report/table", table)
        for logger in trainer.loggers:
            logger.save()
