"""What QuantizationAwareTraining checkpoints and how a resumed run, or a test from a checkpoint, gets its quantized
network back: the callback state (phase, calibrator histograms, scales, input signs, tracked ranges), the quantizers
attached right before Lightning's strict model load, and the phase a model evaluates in outside ``fit``; the choices
every DDP rank must make alike (reduced ranges, tracked or fixed), and the thresholds written back at the end."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_compress.quantization.ptq import _Calibration, _set_modes
from lightning_compress.quantization.qat_ranges import RangeTracker, choose_ranges
from lightning_compress.quantization.quantizers import _detach
from lightning_compress.utils.load_hook import ModelLoadHook

__all__ = ["PHASES", "QATResume"]

PHASES = ("calibrating", "training", "frozen")


def _restore_signs(layers: dict[str, Any], state: dict[str, Any]) -> None:
    """The input signs chosen at calibration (``reduce_range``), as the checkpoint recorded them."""
    for name, unsigned in state.get("unsigned", {}).items():
        if name in layers:
            layers[name].input_quantizer.unsigned = bool(unsigned)


class QATResume(Callback):
    """Checkpoint state and resume of :class:`~lightning_compress.QuantizationAwareTraining` (a mixin)."""

    attached: bool
    phase: str
    calibrated_batches: int
    calibrators: dict[str, Any]
    learn: str
    settings: _Calibration
    ranges_in_use: str | None
    trackers: dict[str, RangeTracker]
    _layers: dict[str, Any]
    _target: nn.Module | None
    ranges: str
    specs: dict[str, Any]
    _restored: dict[str, Any] | None
    _load_hook: ModelLoadHook | None

    def _attach(self, pl_module: pl.LightningModule, stage: str) -> None:
        raise NotImplementedError

    def _on_module_load(self, pl_module: pl.LightningModule, stage: str, checkpoint: dict[str, Any]) -> None:
        """Right before Lightning's strict model load: quantize the network as it was when the checkpoint was saved."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return
        if state.get("attached", True):
            self._attach(pl_module, stage)
        elif self._layers:  # quantized in memory, but the checkpoint is from before start_epoch: back to float
            for layer in self._layers.values():
                _detach(layer)
            self._layers, self.attached = {}, False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_hook()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_load_hook()  # e.g. a failed checkpoint load: no later hook of this callback runs

    def _remove_load_hook(self) -> None:
        """The module's own ``on_load_checkpoint`` again; under another callback's wrapper, retried at later hooks
        (``on_train_start``, ``on_fit_end``) once that callback unwrapped its own."""
        if self._load_hook is not None and self._load_hook.remove():
            self._load_hook = None

    def _evaluation_modes(self, trainer: pl.Trainer) -> None:
        """Outside fit, compute as fit computed in the phase the checkpoint (or this callback) is in. Before
        calibration ended: the scales a checkpoint brought (its ``amax`` buffers), float where there are none, as
        ``fit`` computes while it calibrates (an uninitialised LSQ step or PACT alpha is not a scale)."""
        if trainer.state.fn == "fit":
            return
        if self._restored is not None:  # validate / test / predict from a checkpoint: its phase
            if self._restored.get("phase") in PHASES:
                self.phase = self._restored["phase"]
            _restore_signs(self._layers, self._restored)
            self._restored = None
        if self.phase != "calibrating":
            _set_modes(self._layers, self.phase, self.learn)
            return
        for layer in self._layers.values():
            for quantizer in (layer.input_quantizer, layer.weight_quantizer):
                quantizer.enabled = bool(quantizer.amax.abs().sum() > 0)
                quantizer.observe = False

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()  # a checkpoint, if any, is loaded by now
        self._evaluation_modes(trainer)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()  # a checkpoint, if any, is loaded by now
        self._evaluation_modes(trainer)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()  # a checkpoint, if any, is loaded by now
        self._evaluation_modes(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "attached": self.attached,
            "phase": self.phase,
            "calibrated_batches": self.calibrated_batches,
            "calibrators": {n: c.state_dict() for n, c in self.calibrators.items() if c is not None},
            "amax": {n: m.input_quantizer.amax.detach().cpu().clone() for n, m in self._layers.items()},
            "weight_amax": {n: m.weight_quantizer.amax.detach().cpu().clone() for n, m in self._layers.items()},
            "unsigned": {n: m.input_quantizer.unsigned for n, m in self._layers.items()},
            "min_seen": {n: m.input_quantizer.min_seen for n, m in self._layers.items()},
            "specs": {n: dataclasses.asdict(spec) for n, spec in self.specs.items() if n in self._layers},
            "ranges": self.ranges_in_use,
            "trackers": {n: t.state_dict() for n, t in self.trackers.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied in on_fit_start, after the model weights are loaded

    def _apply_restored(self, state: dict[str, Any]) -> None:
        if state.get("phase") not in PHASES:
            raise ValueError(f"checkpointed phase {state.get('phase')!r} is not one of {PHASES}")
        self.phase, self.calibrated_batches = state["phase"], int(state["calibrated_batches"])
        self.calibrators = {}
        self.ranges_in_use = state.get("ranges", "fixed")  # a checkpoint from before tracking existed: fixed
        self.trackers = {n: RangeTracker.from_state(t) for n, t in state.get("trackers", {}).items()}
        if not state.get("attached", True):  # saved before start_epoch: nothing started yet
            return
        for name in self._layers:
            calibrator = self.settings.calibrator(name, self._layers[name].input_quantizer.unsigned)
            if calibrator is not None and name in state["calibrators"]:
                calibrator.load_state_dict(state["calibrators"][name])
            self.calibrators[name] = calibrator
        _restore_signs(self._layers, state)
        for name, low in state.get("min_seen", {}).items():
            if name in self._layers:
                self._layers[name].input_quantizer.min_seen = float(low)
        with torch.no_grad():
            for name, layer in self._layers.items():
                if name in state["amax"]:
                    layer.input_quantizer.amax.copy_(state["amax"][name])
                    layer.weight_quantizer.amax.copy_(state["weight_amax"][name])

    # -- decisions every rank makes alike, and the end of training ----------------------------------------
    def _range_reducer(self, trainer: pl.Trainer, op: str = "max") -> Any:
        if trainer.world_size <= 1:
            return None
        device = trainer.strategy.root_device
        return lambda value: float(trainer.strategy.reduce(torch.tensor(float(value), dtype=torch.float64,
                                                                        device=device), reduce_op=op))

    def _choose_ranges(self, trainer: pl.Trainer, untrained: bool) -> str:
        """``"track"`` or ``"fixed"``, the same on every rank (an untrained network only if it is so on all)."""
        if self.ranges == "auto" and trainer.world_size > 1:
            flag = torch.tensor(float(untrained), device=trainer.strategy.root_device)
            untrained = bool(float(trainer.strategy.reduce(flag, reduce_op="min")) > 0.5)
        return choose_ranges(self.ranges, learn=self.learn, method=self.settings.method, untrained=untrained)

    def _bounds_reducer(self, trainer: pl.Trainer) -> Any:
        if trainer.world_size <= 1:
            return None
        device = trainer.strategy.root_device
        return lambda bounds: trainer.strategy.reduce(bounds.to(device), reduce_op="max")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.attached:
            return
        if self.phase == "frozen":  # leave BatchNorm as Lightning expects it; the next batch start freezes it again
            for module in self._target.modules():  # type: ignore[union-attr]
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        if self.phase != "calibrating":  # buffers hold the thresholds in use (export, float-free inspection)
            with torch.no_grad():
                for layer in self._layers.values():
                    layer.input_quantizer.sync_amax()
                    layer.weight_quantizer.sync_amax(layer.weight)
