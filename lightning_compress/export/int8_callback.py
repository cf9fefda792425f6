"""Int8Export: the real int8 model of a quantization-aware run, checked, written to a file and evaluated at the end of
``fit``.

The file is TorchScript (``torch.jit.script`` of the converted FX graph, ``torch.jit.trace`` when scripting fails):
of the formats torch 2.13 offers for a ``torch.ao`` int8 model it is the one that loads back with ``torch.jit.load``
alone and gives bit-identical outputs. Pickling the whole converted ``GraphModule`` (``torch.save(model)``) saves but
fails to load (``'ConvReLU2d' object has no attribute '_modules'``), and ``torch.export`` cannot handle the packed
weights (``Conv2dPackedParamsBase`` has no ``__obj_flatten__``).

Packed int8 weights are re-packed for the process's current quantized engine when the file is loaded, so the file
records the engine it was made for (inside it, and in ``<name>.json`` beside it): :func:`load_int8` selects it; with
``torch.jit.load`` alone, set ``torch.backends.quantized.engine`` to it first.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.export.engines import ENGINES, host_summary, quantized_engine, validate_engine
from lightning_compress.export.int8 import METHODS, Int8Model, deterministic_off, export_int8, resolve_method
from lightning_compress.export.int8_dynamic import (
    dynamic_int8_layers,
    export_int8_dynamic,
    load_int8_dynamic,
    save_int8_dynamic,
)
from lightning_compress.export.kernel_check import check_kernel
from lightning_compress.export.verify import Int8MismatchError, check_export_settings
from lightning_compress.quantization.quantizers import quantized_layers
from lightning_compress.utils import compression_target, log_scalars, run_directory
from lightning_compress.utils.data import ChecksNetworkInput, batch_labels, collect_inputs, stage_loader
from lightning_compress.utils.modes import eval_mode
from lightning_compress.utils.outputs import logits_of, model_inputs, move_inputs, run_model

__all__ = ["Int8Export", "int8_metadata", "load_int8", "save_int8"]

_METADATA = "lightning_compress.json"


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit.* is deprecated (for export)
        warnings.filterwarnings("ignore", message=".*(TorchScript|Converting a tensor to a Python|quantized tensor).*")
        yield


def save_int8(model: nn.Module, path: str | Path, example_inputs: Any) -> str:
    """Write an int8 model from :func:`~lightning_compress.quantization.export_int8` as TorchScript.

    The converted graph's type annotations are dropped first, in place (a model written with ``from __future__
    import annotations`` leaves string annotations that TorchScript cannot parse); when scripting still fails the
    graph is traced on ``example_inputs`` (it has no data-dependent control flow left). The quantized engine the
    weights were packed for, the host and the export's verification are written into the file (extra file
    ``lightning_compress.json``) and beside it (``<path stem>.json``). The file loads back with ``torch.jit.load``
    alone once ``torch.backends.quantized.engine`` is set to that engine (:func:`load_int8` does it).

    Args:
        model: the :class:`~lightning_compress.export.int8.Int8Model` (or its inner graph module).
        path: the file to write.
        example_inputs: a batch (tensor or tuple), used only when tracing.

    Returns:
        ``"script"`` or ``"trace"``: how the file was made.
    """
    graph = model.model if isinstance(model, Int8Model) else model
    engine = model.engine if isinstance(model, Int8Model) else torch.backends.quantized.engine
    metadata = json.dumps({"engine": engine, "torch": torch.__version__, "exported_on": host_summary(),
                           "verification": getattr(model, "verification", {})}, indent=2, default=str)
    if isinstance(graph, torch.fx.GraphModule):
        for node in graph.graph.nodes:
            node.type = None
        graph.recompile()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with _quiet(), deterministic_off(), torch.no_grad(), quantized_engine(engine):
        try:
            scripted, how = torch.jit.script(graph), "script"
        except Exception:  # TorchScript rejects some Python; the graph is straight-line, so a trace is exact
            scripted, how = torch.jit.trace(graph, args, check_trace=False), "trace"
        torch.jit.save(scripted, str(path), _extra_files={_METADATA: metadata})
    Path(path).with_suffix(".json").write_text(metadata + "\n")
    return how


def int8_metadata(path: str | Path) -> dict[str, Any]:
    """What :func:`save_int8` recorded in the file: ``engine``, ``torch``, ``exported_on``, ``verification``."""
    extra = {_METADATA: ""}
    with _quiet():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[_METADATA]:
        raise ValueError(f"{str(path)!r} holds no lightning_compress metadata; was it written by save_int8?")
    return json.loads(extra[_METADATA])


def load_int8(path: str | Path, engine: str | None = None) -> Int8Model:
    """Load a file written by :func:`save_int8` under the quantized engine it records (or ``engine``).

    The packed weights are re-packed for the engine current at load time, so the file is loaded under that engine
    and the returned :class:`~lightning_compress.export.int8.Int8Model` runs under it (and with
    deterministic algorithms off), restoring the process's settings after each call.

    Raises:
        ValueError: the recorded engine is not available in this torch build.
    """
    chosen = engine or int8_metadata(path)["engine"]
    if chosen not in ENGINES[1:]:
        raise ValueError(f"{str(path)!r} records engine {chosen!r}, which is not one of {list(ENGINES[1:])}")
    validate_engine(chosen)
    with _quiet(), quantized_engine(chosen):
        return Int8Model(torch.jit.load(str(path), map_location="cpu"), chosen).eval()


class Int8Export(ChecksNetworkInput, Callback):
    """Converts the quantization-aware-trained compression target into a real int8 model at the end of ``fit``.

    At ``on_fit_end`` (global rank zero only) :func:`~lightning_compress.quantization.export_int8` converts
    ``pl_module.compression_target`` (whose quantized layers :class:`~lightning_compress.QuantizationAwareTraining`
    or :class:`~lightning_compress.PostTrainingQuantization` attached) into an int8 model for CPU, using
    ``batch_size`` validation inputs to trace it and to observe the tensors that have no quantizer of ours. The
    model runs under the quantized ``engine`` that computes it exactly on this CPU (``"auto"``; see
    :mod:`~lightning_compress.export.engines`).

    It runs the validation batches (the data module's validation loader, limited like the validation loop by
    ``limit_val_batches``, or at most ``eval_batches``) through both models and logs through every logger:
    ``export/acc`` (int8 top-1 accuracy; also put into ``trainer.callback_metrics``), ``export/fake_quant_acc``
    (the fake-quantized model on the same batches), ``export/agreement`` (share of samples where both predict the
    same class) and ``export/size_bytes`` (the file). Below ``min_agreement`` (measured on those batches, or on the
    export's example inputs with ``eval_batches=0``) the run fails with :class:`Int8MismatchError` and no file is
    written. Otherwise the model is written to ``<output_dir>/<filename>.pt`` as TorchScript, with the engine it
    needs recorded inside and in ``<filename>.json``: :func:`load_int8` loads it under that engine; with torch
    alone, set ``torch.backends.quantized.engine`` to it and call ``torch.jit.load(path)`` (the outputs are checked
    to be identical after writing; a mismatch warns). Call it with deterministic algorithms off (quantized kernels
    refuse them). The int8 model stays in :attr:`model` and the numbers in :attr:`results`.

    :meth:`export` is public and runs once per fit, so another callback (``CompressionReport`` does) can ask for
    the int8 model whatever the callback order. A fit with neither a ``QuantizationAwareTraining`` callback nor a
    network quantized beforehand fails in ``setup``; a QAT ``start_epoch`` at or past ``max_epochs`` warns there.
    If at the end there are still no quantized layers, or quantizers that never got static scales (calibration
    still running, dynamic quantization), it warns and skips: the fit is not lost, and :attr:`model` stays
    ``None``.

    Args:
        output_dir: where the file is written; defaults to the logger's run directory (else ``default_root_dir``).
        filename: file name without the ``.pt`` extension.
        batch_size: validation inputs used to trace the model and observe its intermediate tensors.
        eval_batches: at most this many validation batches are evaluated (``None``: as many as the validation
            loop runs; ``0``: no evaluation).
        engine: the quantized engine (``"auto"``, ``"x86"``, ``"fbgemm"``, ``"onednn"``, ``"qnnpack"``); a named
            engine that cannot compute the model exactly on this CPU fails the export.
        min_agreement: the smallest share of samples on which the int8 and the fake-quantized model must agree;
            ``None`` never fails.
        method: ``"fx"``, ``"dynamic"`` (transformers: int8 ``Linear`` / ``Conv1D`` swapped module by module, no
            quantizers needed, written with ``torch.save``; load with :func:`load_int8_dynamic`) or ``"auto"``
            (dynamic for transformers); resolved in ``setup``, so a model that cannot be exported fails there.

    Raises:
        ValueError: for an empty ``filename``, a non-positive ``batch_size``, a negative ``eval_batches``, an
            unknown or unavailable ``engine`` or a ``min_agreement`` outside [0, 1] (in ``__init__``); in
            ``setup``, when nothing will quantize the compression target.
        Int8MismatchError: at the end of fit, when the agreement is below ``min_agreement``.

    Attributes:
        model: the int8 model (an :class:`~lightning_compress.export.int8.Int8Model`), or ``None``.
        results: ``path``, ``size_bytes``, ``acc``, ``fake_quant_acc``, ``agreement``, ``samples``,
            ``quantized_layers``, ``format``, ``identical_after_load``, ``engine`` and ``verification`` (the
            export's check on its example inputs); or ``skipped`` (the reason); ``None`` before the export.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        filename: str = "model_int8",
        batch_size: int = 256,
        eval_batches: int | None = None,
        engine: str = "auto",
        min_agreement: float | None = 0.99,
        method: str = "auto",
    ) -> None:
        check_export_settings(filename, batch_size, eval_batches)
        if min_agreement is not None and not 0 <= min_agreement <= 1:
            raise ValueError(f"min_agreement={min_agreement!r} must be in [0, 1] or None.")
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported; allowed: {METHODS}.")
        self.engine, self.min_agreement, self.method = validate_engine(engine), min_agreement, method
        self._resolved = "fx"
        self.output_dir = output_dir
        self.filename = filename
        self.batch_size = batch_size
        self.eval_batches = eval_batches
        self.model: nn.Module | None = None
        self.results: dict[str, Any] | None = None

    def path(self, trainer: pl.Trainer) -> Path:
        """The file the int8 model is written to."""
        directory = self.output_dir or run_directory(trainer)
        return Path(directory) / f"{self.filename}.pt"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the first step: something must quantize the compression target during this fit."""
        from lightning_compress.quantization.qat_callback import QuantizationAwareTraining

        if stage != "fit":
            return
        self._resolved = resolve_method(compression_target(pl_module), self.method)  # before training, not at the end
        if self._resolved == "dynamic":
            if not dynamic_int8_layers(compression_target(pl_module)):
                raise ValueError("Int8Export(method='dynamic') found no Linear or Conv1D layer to quantize in "
                                 f"{type(compression_target(pl_module)).__name__}.")
            return
        qat = [c for c in trainer.callbacks if isinstance(c, QuantizationAwareTraining)]  # type: ignore[attr-defined]
        if not qat and not quantized_layers(compression_target(pl_module)):
            raise ValueError("Int8Export needs a quantized network at the end of fit: add QuantizationAwareTraining "
                             f"to the callbacks (found {[type(c).__name__ for c in trainer.callbacks]}) or "  # type: ignore[attr-defined]
                             "quantize the network before fit.")
        last = trainer.max_epochs
        for callback in qat:
            if last is not None and last >= 0 and callback.start_epoch >= last:
                rank_zero_warn(f"Int8Export: QuantizationAwareTraining(start_epoch={callback.start_epoch}) starts "
                               f"after the last epoch (max_epochs={last}); no int8 model will be written.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.model, self.results = None, None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(trainer, pl_module)

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module | None:
        """Export, write, evaluate and log once per fit (later calls return the same model); global rank zero only.

        Returns:
            The int8 model, or ``None`` when skipped (see the class docstring) or on other ranks.
        """
        if self.results is not None or not trainer.is_global_zero:
            return self.model
        target = compression_target(pl_module)
        if self._resolved == "dynamic":
            return self._export_dynamic(trainer, target)
        reason = _not_exportable(target)
        if reason is not None:
            rank_zero_warn(f"Int8Export skipped: {reason}. No int8 model was written.")
            self.results = {"skipped": reason}
            return None
        inputs = move_inputs(collect_inputs(trainer, self.batch_size), "cpu")
        model = export_int8(target, inputs, engine=self.engine, min_agreement=None)
        evaluated = self._evaluate(trainer, target, model)
        self.results = {"engine": model.engine, "verification": model.verification,
                        "quantized_layers": len(quantized_layers(target)), **evaluated}
        self._check_agreement(trainer)
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        how = save_int8(model, path, inputs)
        self.model = model
        self.results.update(path=str(path), size_bytes=path.stat().st_size, format=f"torchscript ({how})",
                            identical_after_load=self._identical_after_load(model, path, inputs))
        self._log(trainer)
        return model

    def _export_dynamic(self, trainer: pl.Trainer, target: nn.Module) -> nn.Module:
        """The transformer path: int8 Linear swapped module by module, written as a pickled module."""
        inputs = move_inputs(collect_inputs(trainer, self.batch_size), "cpu")  # a tensor or a dict of them
        model = export_int8_dynamic(target, inputs, engine=self.engine, min_agreement=None)
        self.results = {"engine": model.engine, "verification": model.verification,
                        "quantized_layers": model.verification["int8_layers"],
                        **self._evaluate(trainer, target, model)}
        self._check_agreement(trainer)
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_int8_dynamic(model, path)
        self.model = model
        with torch.no_grad():
            identical = torch.equal(logits_of(run_model(load_int8_dynamic(path), inputs)),
                                    logits_of(run_model(model, inputs)))
        self.results.update(path=str(path), size_bytes=path.stat().st_size, format="pickle (torch.save)",
                            identical_after_load=identical)
        self._log(trainer)
        return model

    def _check_agreement(self, trainer: pl.Trainer) -> None:
        """Fail the run (after logging the numbers) when the int8 model disagrees with the fake-quantized one."""
        assert self.results is not None
        measured = self.results if self.results.get("agreement") is not None else self.results["verification"]
        kernel = self.results["verification"].get("kernel")
        if self.min_agreement is not None and kernel and kernel["wrong"]:
            self._log(trainer)
            check_kernel(kernel, self.results["engine"])
        if self.min_agreement is None or measured["agreement"] >= self.min_agreement:
            return
        self._log(trainer)
        raise Int8MismatchError(
            f"Int8Export: the int8 model agrees with the fake-quantized model on {measured['agreement']:.2%} of "
            f"{measured['samples']} samples, below min_agreement={self.min_agreement} (engine "
            f"{self.results['engine']!r} on a {torch.backends.cpu.get_cpu_capability()} CPU); no file was written. "
            "Set min_agreement=None to "
            "write it anyway, or engine= another engine.")

    @staticmethod
    def _identical_after_load(model: nn.Module, path: Path, inputs: torch.Tensor) -> bool:
        with torch.no_grad():
            identical = torch.equal(logits_of(run_model(load_int8(path), inputs)), logits_of(run_model(model, inputs)))
        if not identical:
            rank_zero_warn(f"Int8Export: the model loaded back from {str(path)!r} does not reproduce the int8 model's "
                           "outputs exactly; evaluate the file before shipping it.")
        return identical

    def _evaluate(self, trainer: pl.Trainer, target: nn.Module, int8: nn.Module) -> dict[str, Any]:
        correct = correct_fake = agree = total = labelled = 0
        device = next((p.device for p in target.parameters()), torch.device("cpu"))
        with eval_mode(target), torch.no_grad():
            for batch in _validation_batches(trainer, self.eval_batches):
                inputs = model_inputs(batch)
                predicted = logits_of(run_model(int8, move_inputs(inputs, "cpu"))).argmax(1)
                fake = logits_of(run_model(target, move_inputs(inputs, device))).argmax(1).cpu()
                agree += int((predicted == fake).sum())
                total += int(predicted.numel())
                labels = batch_labels(batch)
                if labels is not None:
                    correct += int((predicted == labels.cpu()).sum())
                    correct_fake += int((fake == labels.cpu()).sum())
                    labelled += int(labels.numel())
        return {"acc": correct / labelled if labelled else None,
                "fake_quant_acc": correct_fake / labelled if labelled else None,
                "agreement": agree / total if total else None, "samples": total}

    def _log(self, trainer: pl.Trainer) -> None:
        assert self.results is not None
        names = {"acc": "export/acc", "fake_quant_acc": "export/fake_quant_acc", "agreement": "export/agreement",
                 "size_bytes": "export/size_bytes"}
        scalars = {tag: self.results[key] for key, tag in names.items() if self.results.get(key) is not None}
        kernel = self.results.get("verification", {}).get("kernel")
        if kernel:  # int8 output codes that integer arithmetic does not give (0 on an exact engine)
            scalars["export/kernel_wrong_codes"] = kernel["wrong"]
        log_scalars(trainer, scalars)
        if self.results.get("acc") is not None:
            trainer.callback_metrics["export/acc"] = torch.tensor(float(self.results["acc"]))


def _not_exportable(target: nn.Module) -> str | None:
    layers = quantized_layers(target)
    if not layers:
        return (f"{type(target).__name__} has no quantized layers (add QuantizationAwareTraining before Int8Export, "
                "or PostTrainingQuantization with a static mode)")
    for name, layer in layers.items():
        quantizer = layer.input_quantizer
        if not quantizer.enabled or quantizer.calibrating or quantizer.dynamic:
            state = "dynamic" if quantizer.dynamic else "calibrating" if quantizer.calibrating else "disabled"
            return (f"layer {name!r} has no static input scale (its input quantizer is {state}: quantization-aware "
                    "training still calibrating at the end of fit, or dynamic quantization)")
    return None


def _validation_batches(trainer: pl.Trainer, eval_batches: int | None) -> Iterator[Any]:
    """The validation batches: a fresh loader of the data module (every sample, not a DDP shard), limited like
    the validation loop (``limit_val_batches``) and by ``eval_batches``."""
    if eval_batches == 0:
        return
    loader = stage_loader(trainer, "val")
    if loader is None:
        return
    limit = _batch_limit(loader, trainer.limit_val_batches, eval_batches)
    for index, batch in enumerate(loader):
        if index >= limit:
            break
        yield batch


def _batch_limit(loader: Any, limit_val_batches: int | float | None, eval_batches: int | None) -> float:
    try:
        count: float = len(loader)
    except TypeError:
        count = float("inf")
    if isinstance(limit_val_batches, int):
        count = min(count, limit_val_batches)
    elif isinstance(limit_val_batches, float) and count != float("inf"):
        count = int(count * limit_val_batches)
    return count if eval_batches is None else min(count, eval_batches)
