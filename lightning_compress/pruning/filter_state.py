"""FilterPruning's options, what it checkpoints, how a resumed run (or a test from a checkpoint) gets the compacted
network back, and the sparsities it logs: a mixin of :class:`~lightning_compress.FilterPruning`."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_compress.graph.layernorm_statistics import check_layernorm_statistics
from lightning_compress.graph.layers import check_layer_pattern
from lightning_compress.pruning.callback_base import PruningCallback
from lightning_compress.pruning.criteria import check_sparsity
from lightning_compress.pruning.structured import check_p
from lightning_compress.utils.load_hook import ModelLoadHook
from lightning_compress.utils.rounding import check_rounding

__all__ = ["GRANULARITIES", "MODES", "FilterState", "check_options"]

MODES = ("soft", "hard")
GRANULARITIES = ("filter", "channel")


def check_options(sparsity: float | dict[str, float], mode: str, p: int, granularity: str,
                  recalibration_batches: int, compact_every_epoch: bool, compact_at_schedule_end: bool,
                  rounding: str = "nearest", layernorm_statistics: str = "all") -> dict[str, float]:
    """Validate FilterPruning's constructor arguments; return the rates by layer pattern."""
    rates = sparsity if isinstance(sparsity, dict) else {".*": sparsity}
    for pattern, rate in rates.items():
        check_sparsity(rate, f"sparsity[{pattern!r}]" if isinstance(sparsity, dict) else "sparsity")
        check_layer_pattern(pattern, "sparsity key")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    check_p(p)
    check_rounding(rounding)
    check_layernorm_statistics(layernorm_statistics)
    if compact_every_epoch and mode != "hard":
        raise ValueError(f"compact_every_epoch needs mode='hard' (soft-pruned filters may regrow), got {mode!r}.")
    if compact_every_epoch and compact_at_schedule_end:
        raise ValueError("compact_every_epoch=True and compact_at_schedule_end=True: choose one (every epoch, or "
                         "once when the schedule ends).")
    if isinstance(recalibration_batches, bool) or not isinstance(recalibration_batches, int) \
            or recalibration_batches < 0:
        raise ValueError(f"recalibration_batches must be an integer >= 0, got {recalibration_batches!r}.")
    return rates


class FilterState(PruningCallback):
    """Checkpoint state, resume replay and sparsity bookkeeping of :class:`~lightning_compress.FilterPruning`."""

    recovers = True
    finalized: bool
    revived_filters: int
    rates: dict[str, float]
    mode: str
    layernorm_statistics: str
    compact_at_schedule_end: bool
    events: list[dict[str, list[int]]]
    original_sizes: dict[str, int]
    original_filters: dict[str, int]
    compacted_at: int | None
    groups: list[Any]
    _load_hook: ModelLoadHook | None
    _example: torch.Tensor

    if TYPE_CHECKING:  # provided by FilterPruning / FinalPruneSteps

        def replay_compactions(self, events: list[dict[str, list[int]]], example: torch.Tensor) -> None: ...
        def _group_keep(self, group: Any) -> torch.Tensor | None: ...

    def resolve_schedule(self, trainer: pl.Trainer) -> None:
        super().resolve_schedule(trainer)
        if self.mode == "soft" and not self.fix_at_schedule_end and not self.compact_at_schedule_end:
            rank_zero_warn("FilterPruning(mode='soft') with a schedule and no recovery_epochs re-selects filters at "
                           "every update up to the end of fit, so no epoch trains with the final selection (a "
                           "zeroed filter regrows within an epoch, with Adam). Pass recovery_epochs=N to make the "
                           "selection permanent when the schedule ends, or leave schedule unset for the default.")

    def check_quantization_starts_later(self, trainer: pl.Trainer, steps_per_epoch: int | None = None) -> None:
        """Quantizers attached before the schedule-end compaction would be compacted with the layers: refuse. Called
        by ``QuantizationAwareTraining.setup`` before it attaches anything, whichever callback comes first. With a
        schedule in steps the compaction epoch is known once the trainer knows its ``steps_per_epoch``; before that
        only a start at epoch 0 is known to come first."""
        from lightning_compress.quantization.qat_callback import QuantizationAwareTraining

        self.resolve_schedule(trainer)  # the default schedule, if QuantizationAwareTraining's setup runs first
        if not self.compact_at_schedule_end or self.compacted_at is not None or self._ends_before_compaction(trainer):
            return
        epoch = self._compaction_epoch(steps_per_epoch)
        if trainer.max_epochs is not None and epoch is not None and 0 <= trainer.max_epochs <= epoch:
            return  # fit ends first: no compaction in this fit
        end = f"{self.schedule.end}" if self.schedule.unit == "epoch" else f"step {self.schedule.end}"
        when = f"the end of epoch {epoch}" if epoch is not None else "the end of the epoch that reaches it"
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            start = getattr(callback, "start_epoch", 0)
            if not isinstance(callback, QuantizationAwareTraining) or not isinstance(start, int):
                continue
            if start <= (epoch if epoch is not None else 0):
                raise ValueError(
                    f"QuantizationAwareTraining(start_epoch={start}) attaches quantizers before FilterPruning("
                    f"compact_at_schedule_end=True) compacts the network at {when} (its schedule ends at {end}); "
                    "quantization must start after the compaction: start_epoch >= "
                    f"{'the epoch after it' if epoch is None else epoch + 1}.")

    def _ends_before_compaction(self, trainer: pl.Trainer) -> bool:
        max_steps = trainer.max_steps
        return self.schedule.unit == "step" and max_steps is not None and 0 <= max_steps < self.schedule.end

    def _compaction_epoch(self, steps_per_epoch: int | None) -> int | None:
        """The epoch at whose end the schedule-end compaction happens (``None``: steps per epoch not known yet)."""
        if self.schedule.unit == "epoch":
            return max(self.schedule.end - 1, 0)
        if steps_per_epoch is None:
            return None
        return max(math.ceil(self.schedule.end / steps_per_epoch) - 1, 0)

    def _check_rate_patterns(self) -> None:
        """Every pattern of a ``sparsity`` mapping must name at least one selected layer."""
        if not isinstance(self.sparsity, dict):
            return
        for pattern in self.rates:
            if not any(name == pattern or re.fullmatch(pattern, name) for name in self._modules):
                raise ValueError(f"FilterPruning: the sparsity pattern {pattern!r} matches no selected layer; "
                                 f"selected: {sorted(self._modules)}.")

    def _replay_before_loading(self, pl_module: pl.LightningModule) -> None:
        """Lightning calls the module's ``on_load_checkpoint`` right before its strict ``load_state_dict``: shrink
        the fresh network there, as the interrupted run did, so that the checkpoint's smaller tensors fit. (Callbacks
        that wrap the hook later, e.g. to attach quantizers, run theirs after the original: after this replay.)"""
        self._unwrap_load_hook()

        def replay(checkpoint: dict[str, Any]) -> None:
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state and state.get("events") and not self._shapes_match(pl_module, checkpoint):
                self.replay_compactions(state["events"], state["example"])

        self._load_hook = ModelLoadHook(pl_module, before=replay)

    def _shapes_match(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> bool:
        """Whether the network already has the checkpoint's shapes (e.g. compacted in this process by ``fit``)."""
        prefix = next((f"{name}." if name else "" for name, module in pl_module.named_modules()
                       if module is self._target), "")
        saved = checkpoint.get("state_dict", {})
        return all(tuple(saved[prefix + key].shape) == tuple(value.shape)
                   for key, value in self._target.state_dict().items() if prefix + key in saved)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._unwrap_load_hook()  # a checkpoint, if any, is loaded by now
        super().on_validation_start(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap_load_hook()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap_load_hook()  # e.g. a failed checkpoint load: no later hook of this callback runs

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap_load_hook()

    def _unwrap_load_hook(self) -> None:
        if self._load_hook is not None and self._load_hook.remove():
            self._load_hook = None  # else wrapped by another callback: a pass-through now, unwrapped later if possible

    def filters_alive(self) -> dict[str, int]:
        """Filters of each pruned layer that are neither removed nor masked."""
        alive = {}
        for name, module in self._modules.items():
            rows, mask = module.weight.shape[0], self.masks.get(name)
            alive[name] = rows - (int((~mask).sum()) if mask is not None and mask.numel() == rows else 0)
        return alive

    def layer_sparsity(self) -> dict[str, float]:
        """Per pruned layer, the fraction of its original filters that are pruned or removed."""
        return {name: 1.0 - alive / max(self.original_filters.get(name, self._modules[name].weight.shape[0]), 1)
                for name, alive in self.filters_alive().items()}

    def global_sparsity(self) -> float:
        """The fraction of the original channels of all groups that are pruned or removed."""
        original = removed = 0
        for group in self.groups:
            keep = self._group_keep(group)
            size = self.original_sizes.get(group.name, group.size)
            original += size
            removed += size - (group.size if keep is None else int(keep.sum()))
        return removed / max(original, 1)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "finalized": self.finalized, "revived_filters": self.revived_filters,
                 "events": self.events, "original_sizes": self.original_sizes,
                 "original_filters": self.original_filters, "compacted_at": self.compacted_at,
                 "layernorm_statistics": self.layernorm_statistics}
        if getattr(self, "_example", None) is not None:
            state["example"] = self._example
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.finalized = state_dict.get("finalized", False)
        self.revived_filters = state_dict.get("revived_filters", 0)
        self.events = list(state_dict.get("events", []))
        self.original_sizes = dict(state_dict.get("original_sizes", {}))
        self.original_filters = dict(state_dict.get("original_filters", {}))
        self.compacted_at = state_dict.get("compacted_at")
        saved = state_dict.get("layernorm_statistics", "all")
        if self.events and saved != self.layernorm_statistics:
            raise ValueError(f"The checkpoint was compacted with FilterPruning(layernorm_statistics={saved!r}), this "
                             f"callback has {self.layernorm_statistics!r}: pass {saved!r} to resume it.")
        if "example" in state_dict:
            self._example = state_dict["example"]
