"""QuantizationAwareTraining and PostTrainingQuantization: when the quantization math runs, what is logged and
checkpointed. The math is in ``functional.py`` / ``calibration.py``; the modules in ``quantizers.py``.

Phases of QAT (Jacob et al. 2018; NVIDIA / TensorRT calibration conventions):

* ``calibrating``: the input quantizers only collect statistics (histograms or running max, never activations);
  the model computes in float.
* ``training``: fake quantization with a straight-through gradient; weight ``amax`` follows the per-channel
  ``max |w|`` at every call (observer on), or LSQ learns the steps (Esser et al. 2019), or PACT the input clipping
  (Choi et al. 2018).
* ``frozen`` (from ``freeze_epoch``): weight ``amax`` fixed, BatchNorm layers of the target in eval mode.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_compress.quantization.calibrate import (
    PTQ_MODES,
    _Calibration,
    _calibration_pass,
    _finish_calibration,
    _set_modes,
    _set_weight_amax,
    _start_calibration,
    _validate_bit_widths,
    attach_all,
    classification_accuracy,
    quantize_model,
    resolve_specs,
)
from lightning_compress.quantization.quantizers import validate_learn
from lightning_compress.utils import compression_target, log_scalars

__all__ = ["PostTrainingQuantization", "QuantizationAwareTraining"]

PHASES = ("calibrating", "training", "frozen")
CALIBRATION_DATA = ("steps", "train", "val")


class QuantizationAwareTraining(Callback):
    """Quantization-aware training of the compression target's Conv1d / Conv2d / Linear layers.

    In ``setup`` (before optimizers exist) each chosen layer becomes a quantized layer in place, so parameter keys
    stay the user's (quantizer buffers are added and re-created on resume). The input activations are calibrated
    over ``calibration_batches`` batches, then training runs with fake quantization (weights per output channel
    by default, inputs per tensor); at ``freeze_epoch`` the weight observers and BatchNorm statistics freeze.
    Phase, calibrator state (histograms), scales and progress are checkpointed in this callback's state and a
    resumed run continues where it stopped. Under DDP the per-batch histogram range and, at the end, the counts /
    running max are all-reduced before any ``amax`` is computed, so every rank holds the same scales.

    A checkpoint of such a run loads into a fresh model of the user's class given a callback configured alike
    (``setup`` re-creates the quantizer buffers before the strict load; ``trainer.test(ckpt_path=...)`` works), or
    without the callback through :func:`~lightning_compress.quantization.quantizers.float_state_dict`. ``fit``
    may be called again with the same callback: it continues from its phase without recalibrating.

    QAT starts from a trained float model (Jacob et al. 2018): the input ranges are calibrated once and then fixed
    (unless learned). On a network trained from scratch the activations outgrow ranges calibrated on its first
    batches and get clipped (in a test here a 4-bit student lost 9-33 points that way); there use ``learn="lsq"``
    or ``"pact"``, or train in float first and add this callback for the fine-tuning.

    Logged every epoch: ``quant/phase`` (0 calibrating, 1 training, 2 frozen), ``quant/amax/<layer>`` (input),
    ``quant/weight_amax/<layer>`` (mean over channels) and ``quant/error/<layer>`` (MSE between the layer's float
    and fake-quantized output on the last training batch of the epoch).

    Args:
        num_bits: bits of weights and inputs, 2 to 16.
        calibration: ``"max"``, ``"percentile"``, ``"mse"``, ``"entropy"`` (``"kl"``) or ``"global"`` (TensorRT /
            NVIDIA conventions; histograms of ``num_bins`` bins).
        amax: the threshold for ``"global"``: a number, or ``{layer pattern: number}`` covering every layer.
        layers: names or regexes of layers inside the compression target; default every Conv1d/Conv2d/Linear.
        exclude: names or regexes to leave in float.
        skip_first_and_last: leave the first and the last chosen layer (definition order) in float.
        bit_widths: mixed precision, ``{layer pattern: bits}`` overriding ``num_bits``.
        per_channel: one weight ``amax`` per output channel.
        unsigned: inputs are non-negative (``[0, 2^b - 1]``); negative calibration data raise.
        calibration_batches: batches to calibrate on (with ``"steps"`` they may span epochs; the phase and the
            histograms so far are checkpointed).
        calibration_data: ``"steps"`` (the first training batches; the model trains in float meanwhile),
            ``"train"`` or ``"val"`` (a no-grad pass over that loader before the first training step).
        learn: ``"none"``, ``"lsq"`` (learned step sizes, Esser et al. 2019) or ``"pact"`` (learned input clipping
            of non-negative inputs, Choi et al. 2018). Under DDP with ``"lsq"`` / ``"pact"`` use a strategy that
            finds unused parameters (the learned steps get no gradient while calibrating).
        freeze_epoch: epoch from which weight ``amax`` and BatchNorm statistics are frozen; ``None`` never.
        percentile: for ``"percentile"``, in ``(0, 100]``.
        num_bins: histogram bins.
        start_bin: first candidate bin of the mse / entropy searches.
        log_error: compute and log ``quant/error/<layer>``.

    Raises:
        ValueError: bits outside 2..16, an unknown method / learn / calibration data, percentile outside
            (0, 100], a global amax <= 0 (in ``__init__``); a pattern matching no layer, an unsupported layer type
            (in ``setup``); NaN / Inf or (unsigned) negative calibration data, naming the layer (at the first
            calibration batch, before any optimizer step).
    """

    def __init__(
        self,
        num_bits: int = 8,
        calibration: str = "max",
        amax: float | dict[str, float] | None = None,
        layers: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        skip_first_and_last: bool = False,
        bit_widths: dict[str, int] | None = None,
        per_channel: bool = True,
        unsigned: bool = False,
        calibration_batches: int = 8,
        calibration_data: str = "steps",
        learn: str = "none",
        freeze_epoch: int | None = None,
        percentile: float = 99.99,
        num_bins: int = 2048,
        start_bin: int = 128,
        log_error: bool = True,
    ) -> None:
        _validate_bit_widths(num_bits, bit_widths)
        self.settings = _Calibration(calibration, amax, percentile, num_bins, start_bin)
        validate_learn(learn)
        if calibration_data not in CALIBRATION_DATA:
            allowed = ", ".join(map(repr, CALIBRATION_DATA))
            raise ValueError(f"calibration_data={calibration_data!r} is not supported; allowed: {allowed}")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} must be a positive integer")
        if freeze_epoch is not None and (not isinstance(freeze_epoch, int) or freeze_epoch < 0):
            raise ValueError(f"freeze_epoch={freeze_epoch!r} must be a non-negative integer or None")
        self.num_bits, self.layers, self.exclude, self.bit_widths = num_bits, layers, exclude, bit_widths
        self.skip_first_and_last, self.per_channel, self.unsigned = skip_first_and_last, per_channel, unsigned
        self.calibration_batches, self.calibration_data = calibration_batches, calibration_data
        self.learn, self.freeze_epoch, self.log_error = learn, freeze_epoch, log_error
        self.phase = "calibrating"
        self.calibrated_batches = 0
        self.calibrators: dict[str, Any] = {}
        self._layers: dict[str, Any] = {}
        self._target: nn.Module | None = None
        self._restored: dict[str, Any] | None = None

    @property
    def quantized_layers(self) -> dict[str, Any]:
        """The quantized layers, by name inside the compression target (after ``setup``)."""
        return dict(self._layers)

    # -- setup and state --------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._target = compression_target(pl_module)
        specs = resolve_specs(
            self._target, layers=self.layers, exclude=self.exclude, num_bits=self.num_bits,
            bit_widths=self.bit_widths, per_channel=self.per_channel, unsigned=self.unsigned, learn=self.learn,
            skip_first_and_last=self.skip_first_and_last,
        )
        self._layers = attach_all(self._target, specs)
        # outside fit (validate / test / predict from a checkpoint) the stored scales are used as they are
        _set_modes(self._layers, "frozen" if stage != "fit" and self.phase == "calibrating" else self.phase,
                   self.learn)

    def _evaluation_modes(self, trainer: pl.Trainer) -> None:
        """Outside fit, before calibration: quantize with the scales a checkpoint brought, float where none."""
        if trainer.state.fn == "fit" or self.phase != "calibrating":
            return
        for layer in self._layers.values():
            layer.input_quantizer.enabled = bool(layer.input_quantizer.current_amax().abs().sum() > 0)
            layer.weight_quantizer.observe = layer.weight_quantizer.learn != "lsq" and not bool(
                layer.weight_quantizer.amax.abs().sum() > 0)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_modes(trainer)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_modes(trainer)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_modes(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "calibrated_batches": self.calibrated_batches,
            "calibrators": {n: c.state_dict() for n, c in self.calibrators.items() if c is not None},
            "amax": {n: m.input_quantizer.amax.detach().cpu().clone() for n, m in self._layers.items()},
            "weight_amax": {n: m.weight_quantizer.amax.detach().cpu().clone() for n, m in self._layers.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied in on_fit_start, after the model weights are loaded

    def _apply_restored(self, state: dict[str, Any]) -> None:
        if state.get("phase") not in PHASES:
            raise ValueError(f"checkpointed phase {state.get('phase')!r} is not one of {PHASES}")
        self.phase, self.calibrated_batches = state["phase"], int(state["calibrated_batches"])
        self.calibrators = {}
        for name in self._layers:
            calibrator = self.settings.calibrator(name, self._layers[name].input_quantizer.unsigned)
            if calibrator is not None and name in state["calibrators"]:
                calibrator.load_state_dict(state["calibrators"][name])
            self.calibrators[name] = calibrator
        with torch.no_grad():
            for name, layer in self._layers.items():
                if name in state["amax"]:
                    layer.input_quantizer.amax.copy_(state["amax"][name])
                    layer.weight_quantizer.amax.copy_(state["weight_amax"][name])

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is not None:
            self._apply_restored(self._restored)
            self._restored = None
        elif self.phase == "calibrating" and not self.calibrators:
            self.calibrators = _start_calibration(self._layers, self.settings)
        if self.phase == "calibrating":  # (re)connect calibrators, e.g. restored mid-calibration
            for name, layer in self._layers.items():
                layer.input_quantizer.calibrator = self.calibrators.get(name)
        _set_modes(self._layers, self.phase, self.learn)

    # -- calibration ----------------------------------------------------------------------------------------
    def _range_reducer(self, trainer: pl.Trainer) -> Any:
        if trainer.world_size <= 1:
            return None
        device = trainer.strategy.root_device
        return lambda value: float(trainer.strategy.reduce(torch.tensor(float(value), device=device),
                                                           reduce_op="max"))

    def _calibrating(self, trainer: pl.Trainer, on: bool) -> None:
        reducer = self._range_reducer(trainer) if on else None
        for layer in self._layers.values():
            layer.input_quantizer.calibrating = on and layer.input_quantizer.calibrator is not None
            layer.input_quantizer.range_reducer = reducer

    def _finish(self, trainer: pl.Trainer) -> None:
        with torch.no_grad():
            _finish_calibration(self._layers, self.calibrators, self.settings, trainer.strategy)
        self.phase = "training"
        _set_modes(self._layers, self.phase, self.learn)
        self._maybe_freeze(trainer)

    def _loader(self, trainer: pl.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        kind = self.calibration_data
        loader = trainer.train_dataloader if kind == "train" else trainer.val_dataloaders
        if loader is None and datamodule is not None:
            loader = datamodule.train_dataloader() if kind == "train" else datamodule.val_dataloader()
        if loader is None:
            raise ValueError(f"calibration_data={kind!r} but the trainer has no {kind} loader")
        return loader[0] if isinstance(loader, (list, tuple)) else loader

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase != "calibrating" or self.calibration_data == "steps":
            return
        if self.settings.method != "global":
            self._calibrating(trainer, True)
            try:
                target = compression_target(pl_module)
                _calibration_pass(target, self._loader(trainer), self.calibration_batches, pl_module.device)
            finally:
                self._calibrating(trainer, False)
        self._finish(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.phase == "calibrating":
            if self.settings.method == "global":
                self._finish(trainer)
            else:
                self._calibrating(trainer, True)
        elif self.phase == "frozen":
            self._freeze_batchnorm()
        if self.phase != "calibrating" and self.log_error and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            for layer in self._layers.values():
                layer.measure_error = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for layer in self._layers.values():
            layer.measure_error = False
        if self.phase == "calibrating":
            self._calibrating(trainer, False)
            self.calibrated_batches += 1
            if self.calibrated_batches >= self.calibration_batches:
                self._finish(trainer)

    # -- freezing ------------------------------------------------------------------------------------------
    def _freeze_batchnorm(self) -> None:
        for module in self._target.modules():  # type: ignore[union-attr]
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def _maybe_freeze(self, trainer: pl.Trainer) -> None:
        frozen_now = self.freeze_epoch is not None and trainer.current_epoch >= self.freeze_epoch
        if self.phase == "training" and frozen_now:
            with torch.no_grad():
                _set_weight_amax(self._layers)
            self.phase = "frozen"
            _set_modes(self._layers, self.phase, self.learn)
        if self.phase == "frozen":
            self._freeze_batchnorm()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_freeze(trainer)

    # -- logging -------------------------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, float]:
        """Public override point: the scalars logged at the end of every training epoch."""
        metrics = {"quant/phase": float(PHASES.index(self.phase))}
        for name, layer in self._layers.items():
            metrics[f"quant/amax/{name}"] = float(layer.input_quantizer.current_amax())
            metrics[f"quant/weight_amax/{name}"] = float(layer.weight_quantizer.current_amax(layer.weight).mean())
            if layer.last_error is not None:
                metrics[f"quant/error/{name}"] = float(layer.last_error)
        return metrics

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in self.epoch_metrics().items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase == "frozen":  # leave BatchNorm as Lightning expects it; the next batch start freezes it again
            for module in self._target.modules():  # type: ignore[union-attr]
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        if self.phase != "calibrating":  # buffers hold the thresholds in use (export, float-free inspection)
            with torch.no_grad():
                for layer in self._layers.values():
                    layer.input_quantizer.sync_amax()
                    layer.weight_quantizer.sync_amax(layer.weight)


# ------------------------------------------------------------------------------------------------- PTQ


class PostTrainingQuantization(Callback):
    """Post-training quantization of the compression target, at the end of ``fit`` or through
    ``trainer.validate``: each of ``modes`` yields a fake-quantized copy (the trained model is untouched) whose
    accuracy on the validation data is logged as ``ptq/<mode>/acc`` (and the float one as ``ptq/fp32/acc``).

    The copies are kept in :attr:`models` (e.g. for ``export_int8``) and the accuracies in :attr:`results`. Static
    calibration uses the validation loader of the datamodule (the full split on every rank, so all ranks agree) or
    the data given to :meth:`set_calibration_data`.

    Args:
        modes: one of ``"weight_only"``, ``"static"``, ``"dynamic"`` or a list of them.
        num_bits: 2 to 16.
        calibration: static calibration method (see :func:`quantize_model`).
        amax: threshold(s) for ``"global"``.
        layers: layer names or regexes inside the compression target.
        exclude: names or regexes left float.
        bit_widths: ``{pattern: bits}`` overriding ``num_bits``.
        per_channel: per-output-channel weight ``amax``.
        calibration_batches: at most this many calibration batches (``None``: all).
        percentile: for ``"percentile"``.
        num_bins: histogram bins.

    Raises:
        ValueError: an unknown mode or any invalid setting (in ``__init__``).
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
    ) -> None:
        self.modes = [modes] if isinstance(modes, str) else list(modes)
        for mode in self.modes:
            if mode not in PTQ_MODES:
                raise ValueError(f"Unknown mode {mode!r}; allowed: {', '.join(map(repr, PTQ_MODES))}")
        _validate_bit_widths(num_bits, bit_widths)
        _Calibration(calibration, amax, percentile, num_bins)
        self.options: dict[str, Any] = {
            "num_bits": num_bits, "calibration": calibration, "amax": amax, "layers": layers, "exclude": exclude,
            "bit_widths": bit_widths, "per_channel": per_channel, "calibration_batches": calibration_batches,
            "percentile": percentile, "num_bins": num_bins,
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
        datamodule = getattr(trainer, "datamodule", None)
        loader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        if loader is None:
            raise ValueError("PostTrainingQuantization needs validation data (a datamodule or val_dataloaders)")
        return loader[0] if isinstance(loader, (list, tuple)) else loader

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Quantize the compression target in every mode, evaluate, log; returns :attr:`results`."""
        target = compression_target(pl_module)
        loader = self._val_loader(trainer)
        data = self._calibration_data if self._calibration_data is not None else loader
        self.results = {"fp32": self.evaluate(target, loader, pl_module.device)}
        for mode in self.modes:
            self.models[mode] = quantize_model(target, mode, data if mode == "static" else None, **self.options)
            self.results[mode] = self.evaluate(self.models[mode], loader, pl_module.device)
        log_scalars(trainer, {f"ptq/{mode}/acc": acc for mode, acc in self.results.items()})
        return self.results

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.run(trainer, pl_module)

