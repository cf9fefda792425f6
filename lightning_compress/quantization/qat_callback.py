"""QuantizationAwareTraining: when the quantization math runs during ``fit`` (calibrating, training with fake
quantization, frozen; Jacob et al. 2018, TensorRT's calibration), what is logged; its checkpoint state and resume are
in :mod:`~lightning_compress.quantization.qat_resume`. ``PostTrainingQuantization`` (``ptq_callback.py``) is
re-exported here.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.quantization.ptq import (
    _Calibration,
    _calibration_pass,
    _finish_calibration,
    _set_modes,
    _set_weight_amax,
    _start_calibration,
    _validate_bit_widths,
    attach_all,
    resolve_specs,
)
from lightning_compress.quantization.ptq_callback import PostTrainingQuantization
from lightning_compress.quantization.qat_ranges import (
    AVERAGING_CONSTANT,
    RangeTracker,
    connect_trackers,
    looks_untrained,
    signs_from_data,
    start_tracking,
    validate_ranges,
)
from lightning_compress.quantization.qat_resume import PHASES, QATResume
from lightning_compress.quantization.qat_start import add_to_optimizers, learned_parameters, validate_start_epoch
from lightning_compress.quantization.quantizers import QuantSpec, is_quantized
from lightning_compress.quantization.spec import validate_learn, validate_options
from lightning_compress.quantization.uncalled import UNCALLED_REASON, uncalled_layers
from lightning_compress.utils import compression_target, rewrap_ddp
from lightning_compress.utils.data import stage_loader
from lightning_compress.utils.load_hook import ModelLoadHook

__all__ = ["PostTrainingQuantization", "QuantizationAwareTraining"]

CALIBRATION_DATA = ("steps", "train", "val")


class QuantizationAwareTraining(QATResume):
    """Quantization-aware training of the compression target's Conv1d / Conv2d / Linear layers.

    In ``setup`` (before optimizers exist; at ``start_epoch`` if given, see below) each chosen layer becomes a
    quantized layer in place, so parameter keys stay the user's (quantizer buffers are added and re-created on
    resume). The input activations are calibrated over ``calibration_batches`` batches, then training runs with
    fake quantization (weights per output channel by default, inputs per tensor); at ``freeze_epoch`` the weight
    observers, tracked input ranges and BatchNorm statistics freeze. Phase, calibrator state (histograms), tracked
    ranges, scales and progress are checkpointed and a resumed run continues where it stopped. Under DDP per-batch
    ranges and final counts / maxima are all-reduced before any ``amax`` is computed: every rank has the same scales.

    A checkpoint of such a run loads into a fresh model of the user's class given a callback configured alike
    (``setup`` re-creates the quantizer buffers before the strict load; ``trainer.test(ckpt_path=...)`` works), or
    without the callback through :func:`~lightning_compress.quantization.quantizers.float_state_dict`. ``fit``
    may be called again with the same callback: it continues from its phase without recalibrating. Under a
    launcher that starts worker processes (``ddp_spawn``, ``ddp_notebook``) the main process's module gets only
    the float weights back (Lightning loads the workers' state non-strictly into a module never quantized there):
    load a checkpoint with ``trainer.test(ckpt_path=...)`` (one process) for the quantized model.

    Input ranges (``ranges``, :mod:`~lightning_compress.quantization.qat_ranges`): calibrated once and then
    ``"fixed"`` (fine-tuning a trained network, Jacob et al. 2018), or ``"track"``: from the calibrated start they
    follow a moving average of every training batch's min / max (torch.ao / TF-MOT) until ``freeze_epoch``, as a
    network trained from scratch needs (its activations outgrow ranges calibrated on its first batches); inputs
    calibration saw non-negative become unsigned. ``"auto"``: track if attached to an untrained network (weights
    within PyTorch's default initialisation) at the start of a fit, else fixed.

    ``start_epoch > 0`` starts all this in the middle of ``fit``, e.g. after a student was distilled and pruned
    (and compacted in place, see ``FilterPruning(compact_every_epoch=True)``) in the same run: ``setup`` only
    checks the layer patterns; at the start of epoch ``start_epoch`` the compression target is resolved again
    (its layers may have shrunk by then), the quantizers are attached and calibration begins (``"steps"``: over
    the following batches; ``"train"`` / ``"val"``: a pass right there; ``"global"``: at once). With
    ``learn="lsq"`` / ``"pact"`` the learned parameters join every optimizer as a new last parameter group whose
    hyper-parameters (learning rate, weight decay, ...) are copied from the optimizer's first group (a scheduler's
    per-group lists are extended alike). Under DDP the ``DistributedDataParallel`` wrapper is rebuilt on every rank
    after attaching. A checkpoint saved after the start records ``attached``; resuming from it (or testing it in a
    fresh model) attaches the quantizers in the LightningModule's ``on_load_checkpoint``, after the module's own
    hook (and after ``FilterPruning`` replayed its compactions), right before Lightning's strict load, and the
    learned parameters are moved to their own group again before the optimizer state is loaded. Quantized layers
    must not be compacted afterwards: finish pruning before ``start_epoch``.

    Logged every epoch: ``quant/phase`` (-1 before ``start_epoch``, then nothing else; 0 calibrating, 1 training, 2
    frozen), ``quant/amax/<layer>``, ``quant/weight_amax/<layer>`` (mean) and ``quant/error/<layer>`` (output MSE).

    Args:
        num_bits: bits of weights and inputs, 2 to 16.
        calibration: ``"max"``, ``"percentile"``, ``"mse"``, ``"entropy"`` (``"kl"``) or ``"global"`` (TensorRT /
            NVIDIA conventions; histograms of ``num_bins`` bins).
        amax: the threshold for ``"global"``: a number, or ``{layer pattern: number}`` covering every layer.
        layers: names or regexes of layers inside the compression target; default every Conv1d/Conv2d/Linear.
        exclude: names or regexes to leave in float.
        skip_first_and_last: leave the first and last chosen layer (definition order) in float (needs 3 or more).
        bit_widths: mixed precision, ``{layer pattern: bits}`` overriding ``num_bits``.
        per_channel: one weight ``amax`` per output channel.
        unsigned: inputs are non-negative (``[0, 2^b - 1]``); negative calibration data raise. ``"auto"``: inputs
            whose calibration data were non-negative (after a ReLU) become unsigned, the others stay signed.
        calibration_batches: batches to calibrate on (with ``"steps"`` they may span epochs; checkpointed).
        calibration_data: ``"steps"`` (the first training batches; the model trains in float meanwhile),
            ``"train"`` or ``"val"`` (a no-grad pass over that loader before the first training step).
        learn: ``"none"``, ``"lsq"`` (learned step sizes, Esser et al. 2019) or ``"pact"`` (learned input clipping
            of non-negative inputs, Choi et al. 2018). Under DDP with ``"lsq"`` / ``"pact"`` use a strategy that
            finds unused parameters (the learned steps get no gradient while calibrating).
        freeze_epoch: epoch from which weight ``amax``, tracked ranges and BatchNorm statistics freeze (not before
            ``start_epoch``); ``None`` never.
        percentile: for ``"percentile"``, in ``(0, 100]``.
        num_bins: histogram bins.
        start_bin: first candidate bin of the mse / entropy searches.
        log_error: compute and log ``quant/error/<layer>``.
        start_epoch: the epoch at whose start the quantizers are attached (0: in ``setup``, before training).
        reduce_range: inputs one bit narrower (``[-63, 63]`` / ``[0, 127]`` at 8 bits, as torch.ao's x86
            default), so that ``export_int8`` / ``Int8Export`` run the model exactly under the fast ``x86``
            kernels on every x86 CPU; without it signed inputs export exactly under ``x86`` only with VNNI
            (:mod:`~lightning_compress.export.engines`).
        ranges: ``"auto"``, ``"track"`` (moving average of every batch's min / max until ``freeze_epoch``; not
            with ``learn``) or ``"fixed"`` (calibrated once); see above. The choice is checkpointed.
        averaging_constant: weight of a batch in the tracked range (torch.ao's 0.01), in ``(0, 1]``.

    Raises:
        ValueError: bits outside 2..16, an unknown method / learn / calibration data, percentile outside
            (0, 100], a global amax that is not finite and positive, a negative ``start_bin``, a negative or
            non-integer ``start_epoch`` or ``freeze_epoch``, ``freeze_epoch`` before ``start_epoch``, a flag that
            is not a bool (in ``__init__``); a pattern matching no layer, an unsupported layer type, a global
            ``{pattern: amax}`` missing a layer, ``skip_first_and_last`` with fewer than 3 chosen layers (in
            ``setup``, before anything is attached); NaN / Inf or (unsigned) negative calibration data, naming the
            layer (at the first calibration batch, before any optimizer step).
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
        unsigned: bool | str = False,
        calibration_batches: int = 8,
        calibration_data: str = "steps",
        learn: str = "none",
        freeze_epoch: int | None = None,
        percentile: float = 99.99,
        num_bins: int = 2048,
        start_bin: int = 128,
        log_error: bool = True,
        start_epoch: int = 0,
        reduce_range: bool = False,
        ranges: str = "auto",
        averaging_constant: float = AVERAGING_CONSTANT,
    ) -> None:
        _validate_bit_widths(num_bits, bit_widths, reduce_range)
        self.settings = _Calibration(calibration, amax, percentile, num_bins, start_bin)
        validate_learn(learn)
        validate_ranges(ranges, averaging_constant, learn)
        if calibration_data not in CALIBRATION_DATA:
            allowed = ", ".join(map(repr, CALIBRATION_DATA))
            raise ValueError(f"calibration_data={calibration_data!r} is not supported; allowed: {allowed}")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} must be a positive integer")
        if freeze_epoch is not None and (isinstance(freeze_epoch, bool) or not isinstance(freeze_epoch, int)
                                         or freeze_epoch < 0):
            raise ValueError(f"freeze_epoch={freeze_epoch!r} must be a non-negative integer or None")
        validate_start_epoch(start_epoch, freeze_epoch)
        validate_options(unsigned, per_channel=per_channel, skip_first_and_last=skip_first_and_last,
                         log_error=log_error)
        self.num_bits, self.layers, self.exclude, self.bit_widths = num_bits, layers, exclude, bit_widths
        self.skip_first_and_last, self.per_channel, self.unsigned = skip_first_and_last, per_channel, unsigned
        self.calibration_batches, self.calibration_data = calibration_batches, calibration_data
        self.learn, self.freeze_epoch, self.log_error = learn, freeze_epoch, log_error
        self.start_epoch, self.reduce_range = start_epoch, reduce_range
        self.ranges, self.averaging_constant = ranges, averaging_constant
        #: ``"track"`` or ``"fixed"`` once chosen (checkpointed), with the trackers of the input ranges
        self.ranges_in_use: str | None = None
        self.trackers: dict[str, RangeTracker] = {}
        #: whether the quantizers are attached to the compression target (from ``start_epoch`` on)
        self.attached, self.phase, self.calibrated_batches, self._untrained = False, "calibrating", 0, False
        self.calibrators: dict[str, Any] = {}
        self._layers: dict[str, Any] = {}  # the quantized layers by name (``quantized_layers``)
        self.specs: dict[str, QuantSpec] = {}  # how each layer is quantized (checkpointed: load_compressed reads it)
        self._target: nn.Module | None = None
        self._restored: dict[str, Any] | None = None
        self._load_hook: ModelLoadHook | None = None

    @property
    def quantized_layers(self) -> dict[str, Any]:
        """The quantized layers by name in the compression target (after ``setup``; none before ``start_epoch``)."""
        return dict(self._layers)

    # -- setup and state --------------------------------------------------------------------------------
    def _specs(self, target: nn.Module) -> dict[str, QuantSpec]:
        return resolve_specs(
            target, layers=self.layers, exclude=self.exclude, num_bits=self.num_bits,
            bit_widths=self.bit_widths, per_channel=self.per_channel, unsigned=self.unsigned, learn=self.learn,
            skip_first_and_last=self.skip_first_and_last, reduce_range=self.reduce_range,
        )

    def _attach(self, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the compression target (again: it may have been compacted) and attach the quantizers."""
        self._target = compression_target(pl_module)
        self.specs = self._specs(self._target)
        self._layers = attach_all(self._target, self.specs)
        self.attached = True
        # outside fit (validate / test / predict from a checkpoint) the stored scales are used as they are
        _set_modes(self._layers, "frozen" if stage != "fit" and self.phase == "calibrating" else self.phase,
                   self.learn)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._target = compression_target(pl_module)
        specs = self._specs(self._target)  # fails on a bad pattern before the first step, whatever start_epoch
        self.settings.check_covers(specs)  # a global {pattern: amax} must name every layer, before anything attaches
        modules = dict(self._target.named_modules())
        in_memory = stage != "fit" and any(is_quantized(modules[name]) for name in specs)  # e.g. test after fit
        if stage == "fit":  # e.g. a FilterPruning compaction before start_epoch: refuse before attaching anything
            for callback in trainer.callbacks:  # type: ignore[attr-defined]
                check = getattr(callback, "check_quantization_starts_later", None)
                if callable(check):
                    check(trainer)
            last = trainer.max_epochs
            if self.start_epoch > 0 and not self.attached and last is not None and 0 <= last <= self.start_epoch:
                rank_zero_warn(f"QuantizationAwareTraining(start_epoch={self.start_epoch}) starts after the last "
                               f"epoch (max_epochs={last}): this fit will not quantize the network.")
        # start_epoch > 0: attached at that epoch, or (resume, test from a checkpoint) by the hook installed below
        if self.start_epoch == 0 or self.attached or in_memory:
            self._attach(pl_module, stage)
            self._untrained = stage == "fit" and self.ranges_in_use is None and looks_untrained(self._layers)
        else:
            self._layers = {}
        if self.start_epoch > 0:
            self._remove_load_hook()
            self._load_hook = ModelLoadHook(pl_module, after=lambda checkpoint: self._on_module_load(pl_module, stage,
                                                                                           checkpoint))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()
        if self._restored is not None:
            self._apply_restored(self._restored)
            self._restored = None
        elif self.attached and self.phase == "calibrating" and not self.calibrators:
            self.calibrators = _start_calibration(self._layers, self.settings)
        if not self.attached:
            return
        self.ranges_in_use = self.ranges_in_use or self._choose_ranges(trainer, self._untrained)
        if self.phase == "calibrating":  # (re)connect calibrators, e.g. restored mid-calibration
            for name, layer in self._layers.items():
                layer.input_quantizer.calibrator = self.calibrators.get(name)
        _set_modes(self._layers, self.phase, self.learn)
        if self.start_epoch > 0:  # optimizers exist now; their checkpointed state is loaded right after this hook
            self._learned_into_optimizers(trainer)

    def _learned_into_optimizers(self, trainer: pl.Trainer) -> None:
        configs = getattr(trainer, "lr_scheduler_configs", [])
        add_to_optimizers(trainer.optimizers, learned_parameters(self._layers), [c.scheduler for c in configs])

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At ``start_epoch``: attach to the (possibly compacted) network, start calibrating, train the new
        parameters, let DDP know them."""
        self.phase, self.calibrated_batches = "calibrating", 0
        self._attach(pl_module, "fit")
        self.ranges_in_use = self._choose_ranges(trainer, False)  # the network trained in float until now
        self.calibrators = _start_calibration(self._layers, self.settings)
        _set_modes(self._layers, self.phase, self.learn)
        self._learned_into_optimizers(trainer)
        rewrap_ddp(trainer)  # every rank, at the same epoch
        if self.calibration_data != "steps" or self.settings.method == "global":
            self._calibrate_now(trainer, pl_module)

    # -- calibration ----------------------------------------------------------------------------------------
    def _calibrating(self, trainer: pl.Trainer, on: bool) -> None:
        reducer = self._range_reducer(trainer) if on else None
        for layer in self._layers.values():
            layer.input_quantizer.calibrating = on and layer.input_quantizer.calibrator is not None
            layer.input_quantizer.range_reducer = reducer

    def _finish(self, trainer: pl.Trainer) -> None:
        with torch.no_grad():
            if self.ranges_in_use == "track":  # non-negative inputs (after a ReLU) become unsigned, as in torch.ao
                signs_from_data(self._layers)
            _finish_calibration(self._layers, self.calibrators, self.settings, trainer.strategy)
        self.phase = "training"
        _set_modes(self._layers, self.phase, self.learn)
        if self.ranges_in_use == "track":
            self.trackers = start_tracking(self._layers, self.averaging_constant, self._range_reducer(trainer, "min"))
        self._maybe_freeze(trainer)

    def _loader(self, trainer: pl.Trainer) -> Any:
        kind = self.calibration_data
        loader = stage_loader(trainer, kind, prefer_trainer=True)
        if loader is None:
            raise ValueError(f"calibration_data={kind!r} but the trainer has no {kind} loader")
        return loader

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()
        if not self.attached or self.phase != "calibrating" or self.calibration_data == "steps":
            return
        self._calibrate_now(trainer, pl_module)

    def _calibrate_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate on ``calibration_data`` ("train" / "val") in one pass, or with the global amax; then train."""
        if self.settings.method != "global":
            self._calibrating(trainer, True)
            try:
                target = compression_target(pl_module)
                _calibration_pass(target, self._loader(trainer), self.calibration_batches, pl_module.device)
            finally:
                self._calibrating(trainer, False)
            if uncalled := uncalled_layers(self._layers):  # read through their weights: fake quantization never runs
                rank_zero_warn(f"QuantizationAwareTraining: {uncalled} stay float in effect: {UNCALLED_REASON}.")
        self._finish(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.attached:
            return
        if self.phase == "calibrating":
            if self.settings.method == "global":
                self._finish(trainer)
            else:
                self._calibrating(trainer, True)
        elif self.phase == "frozen":
            self._freeze_batchnorm()
        if self.phase == "training" and self.trackers:
            connect_trackers(self._layers, self.trackers, self._bounds_reducer(trainer))
        if self.phase != "calibrating" and self.log_error and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            for layer in self._layers.values():
                layer.measure_error = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for layer in self._layers.values():
            layer.measure_error = False
        connect_trackers(self._layers, {})  # only training steps move the ranges
        if self.attached and self.phase == "calibrating":
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
        if not self.attached:
            return
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
        if not self.attached and trainer.current_epoch >= self.start_epoch:
            self._start(trainer, pl_module)
        self._maybe_freeze(trainer)

    # -- logging -------------------------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, float]:
        """Public override point: the scalars logged at the end of every training epoch (before ``start_epoch``
        only ``quant/phase`` = -1)."""
        if not self.attached:
            return {"quant/phase": -1.0}
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
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()
