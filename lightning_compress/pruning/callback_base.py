"""What every pruning callback shares: layer resolution, the schedule, masks in checkpoint state, logging.

The model's parameters always hold the pruned values (zeros at pruned positions), so its ``state_dict`` keeps the
user's keys and loads into a fresh model without the callback. Masks (boolean) and any extra state live in the
callback's ``state_dict`` and are re-applied when a run resumes.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_compress.graph.layers import select_layers
from lightning_compress.pruning.schedules import (
    AGP,
    Constant,
    Schedule,
    check_recovery_epochs,
    recovery_schedule,
    sparsity_at,
)
from lightning_compress.utils import compression_target, execution_order, log_histogram
from lightning_compress.utils.data import explain_forward_failure
from lightning_compress.utils.outputs import model_inputs, move_inputs


class PruningCallback(Callback):
    """Base class of the pruning callbacks (public override points: :meth:`compute_masks`, :meth:`enforce`).

    Args:
        sparsity: the target sparsity; the schedule says how far along the way to it training is.
        schedule: progress towards ``sparsity`` over epochs or steps; default: the full target from the start.
        layers: names or regexes of the layers to prune (inside the compression target); default: all of ``types``.
        types: allowed layer types.
        exclude: names or regexes to leave alone.
        prune_classifier: also prune the last layer in execution order (found by tracing one forward).
        log_histograms: write the per-layer sparsity histogram to TensorBoard every epoch.
        recovery_epochs: for subclasses that recover (``recovers = True``): without a ``schedule``, the default one
            is AGP from epoch 0 to ``max_epochs - recovery_epochs`` (``None``: a third of the fit), and the masks are
            fixed when it ends so the last epochs recover; with a ``schedule``, the masks are fixed at its end and a
            warning says when fewer than ``recovery_epochs`` epochs remain after it.
    """

    #: Whether ``schedule=None`` means the recovering default (:func:`~.schedules.recovery_schedule`).
    recovers = False

    def __init__(
        self,
        sparsity: float,
        schedule: Schedule | None,
        layers: str | list[str] | None,
        types: list[str],
        exclude: str | list[str] | None,
        prune_classifier: bool,
        log_histograms: bool,
        recovery_epochs: int | None = None,
    ) -> None:
        self.sparsity = sparsity
        self.schedule = schedule if schedule is not None else Constant(start=0)
        if not isinstance(self.schedule, Schedule):
            raise ValueError(f"schedule must be a lightning_compress.pruning.schedules.Schedule, got {schedule!r}.")
        check_recovery_epochs(recovery_epochs)
        self.user_schedule = schedule
        self.recovery_epochs = recovery_epochs
        #: fix the masks once the schedule ends (the recovery epochs follow)
        self.fix_at_schedule_end = self.recovers and (schedule is None or recovery_epochs is not None)
        self.resolved_end: int | None = None  # end of the default schedule, resolved from max_epochs at fit start
        self.layers = layers
        self.types = list(types)
        self.exclude = exclude
        self.prune_classifier = prune_classifier
        self.log_histograms = log_histograms
        self.masks: dict[str, torch.Tensor] = {}
        self.position: int | None = None  # schedule position of the last mask update
        self.current_sparsity = 0.0
        self.compacted = False  # set once the network was replaced by its compact copy: nothing left to do
        self._modules: dict[str, Any] = {}
        self._ready = False
        self._restored: dict[str, Any] | None = None
        self._pruned_cache: dict[str, torch.Tensor] = {}
        self._pruned_source: dict[str, torch.Tensor] | None = None

    # -- resolution -------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        target = compression_target(pl_module)
        self._modules = select_layers(target, self.layers, types=self.types, exclude=self.exclude)
        if not self._modules:
            raise ValueError(
                f"{type(self).__name__} found nothing to prune in {type(target).__name__}: no layer of type "
                f"{self.types} matches layers={self.layers!r} after exclude={self.exclude!r}."
            )
        self._target = target
        self._ready = False
        self.resolve_schedule(trainer)

    def resolve_schedule(self, trainer: pl.Trainer) -> None:
        """The default schedule from ``trainer.max_epochs`` (kept once resolved: a resumed run keeps its own),
        and a warning when a given schedule leaves no recovery epoch."""
        if not self.recovers:
            return
        max_epochs = trainer.max_epochs
        known = max_epochs is not None and max_epochs >= 1
        if self.user_schedule is None:
            if self.resolved_end is not None:
                return
            if not known:
                rank_zero_warn(f"{type(self).__name__}: the fit has no max_epochs, so the default schedule cannot "
                               "leave recovery epochs; pruning to the full target from the start (pass a schedule).")
                self.fix_at_schedule_end = False
                return
            self.schedule = recovery_schedule(int(max_epochs), self.recovery_epochs)  # type: ignore[arg-type]
            self.resolved_end = self.schedule.end
            return
        if not known or self.schedule.unit != "epoch":
            return
        left = int(max_epochs) - self.schedule.end  # type: ignore[arg-type]
        wanted = 1 if self.recovery_epochs is None else self.recovery_epochs
        if left < wanted:
            rank_zero_warn(
                f"{type(self).__name__}: the schedule ends at epoch {self.schedule.end} of max_epochs={max_epochs}, "
                f"leaving {max(left, 0)} recovery epoch(s) with fixed masks (wanted {wanted}); the last pruning "
                "step then costs accuracy no epoch recovers. End the schedule earlier, or leave schedule unset for "
                "the default, which ends recovery_epochs before the fit does.")

    def _prepare(self, batch: Any, pl_module: pl.LightningModule) -> None:
        """On the first training batch: drop the final classifier (traced), validate, restore or initialise."""
        if not self.prune_classifier:  # the network's last layer, whether or not the patterns chose it
            candidates = select_layers(self._target, None, types=self.types)
            with explain_forward_failure(self._target, batch, type(self).__name__):
                order = execution_order(self._target, move_inputs(model_inputs(batch), pl_module.device),
                                        list(candidates))
            if order and order[-1] in self._modules:
                self._modules.pop(order[-1])
        if not self._modules:
            raise ValueError(
                f"{type(self).__name__} found nothing to prune: the only selected layer is the final classifier "
                "(set prune_classifier=True to prune it)."
            )
        self.validate_layers(self._modules)
        self._ready = True

    def validate_layers(self, modules: dict[str, Any]) -> None:
        """Public override point: check the resolved layers before the first training step."""

    # -- the schedule -----------------------------------------------------------------------------------------
    def target_at(self, position: int) -> float:
        return sparsity_at(self.schedule, self.sparsity, position)

    def _update(self, trainer: pl.Trainer, position: int, force: bool = False) -> None:
        if not force and position == self.position:
            return
        if not force and self.masks_fixed():
            return
        if not force and self.position is not None and not self.should_update(position):
            return
        self.current_sparsity = self.target_at(position)
        masks = self.compute_masks(self._modules, self.current_sparsity, position)
        # Every rank ends with rank zero's masks, whatever drift the floating point had.
        self.masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        self.position = position
        self.enforce()

    def masks_fixed(self) -> bool:
        """Whether the masks are final: the schedule has ended and the recovery epochs train with them."""
        return self.fix_at_schedule_end and self.position is not None and self.position >= self.schedule.end

    def should_update(self, position: int) -> bool:
        """Whether the masks are recomputed at ``position`` (schedule positions from ``start`` every ``frequency``)."""
        schedule = self.schedule
        if position < schedule.start:
            return False
        on_frequency = (position - schedule.start) % schedule.frequency == 0
        reaches_end = position >= schedule.end and (self.position is None or self.position < schedule.end)
        return on_frequency or reaches_end

    def compute_masks(self, modules: dict[str, Any], sparsity: float, position: int) -> dict[str, torch.Tensor]:
        """Public override point: boolean keep-masks (by layer name) for the scheduled ``sparsity``."""
        raise NotImplementedError

    def enforce(self) -> None:
        """Public override point: zero the pruned entries of every masked layer (after each optimizer step)."""
        with torch.no_grad():
            for name, pruned in self._pruned_entries().items():
                self._modules[name].weight.masked_fill_(pruned, 0)

    def _pruned_entries(self) -> dict[str, torch.Tensor]:
        """``~mask`` on the weight's device, shaped to broadcast; rebuilt only when the masks change (this runs after
        every optimizer step)."""
        if self._pruned_source is not self.masks:
            cache = {}
            for name, mask in self.masks.items():
                weight = self._modules[name].weight
                pruned = ~mask.to(weight.device)
                cache[name] = pruned.view_as(weight) if mask.shape == weight.shape else pruned.view(
                    -1, *([1] * (weight.dim() - 1)))
            self._pruned_cache, self._pruned_source = cache, self.masks
        return self._pruned_cache

    # -- hooks ------------------------------------------------------------------------------------------------
    def _epoch_position(self, trainer: pl.Trainer) -> int:
        return trainer.current_epoch

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is not None:
            self._apply_restored(self._restored)
            self._restored = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._ready and not self.compacted:
            self._prepare(batch, pl_module)
            if self.masks:
                self.enforce()
            position = trainer.current_epoch if self.schedule.unit == "epoch" else trainer.global_step
            self._update(trainer, position)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.compacted:
            return
        self.after_step(trainer)
        if self.schedule.unit == "step":
            self._update(trainer, trainer.global_step)

    def after_step(self, trainer: pl.Trainer) -> None:
        """Public override point: runs after every optimizer step (default: re-zero the pruned entries)."""
        self.enforce()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation inside fit runs before on_train_epoch_end: update first so it measures the pruned model.
        epoch_done = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._ready and epoch_done:
            self._epoch_end_update(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ready:
            self._epoch_end_update(trainer)
            self.log_epoch(trainer, pl_module)

    def _epoch_end_update(self, trainer: pl.Trainer) -> None:
        if self.schedule.unit == "epoch":
            self._update(trainer, trainer.current_epoch + 1)

    # -- logging ----------------------------------------------------------------------------------------------
    def layer_sparsity(self) -> dict[str, float]:
        result = {}
        for name, module in self._modules.items():
            weight = module.weight.detach()
            result[name] = 1.0 - float(torch.count_nonzero(weight)) / weight.numel()
        return result

    def global_sparsity(self) -> float:
        total = sum(m.weight.numel() for m in self._modules.values())
        zeros = sum(m.weight.numel() - int(torch.count_nonzero(m.weight.detach())) for m in self._modules.values())
        return zeros / max(total, 1)

    def epoch_metrics(self) -> dict[str, float]:
        """Public override point: the scalars logged every epoch (``prune/...``)."""
        metrics = {"prune/sparsity": self.global_sparsity(), "prune/target": self.current_sparsity}
        metrics.update({f"prune/sparsity/{name}": value for name, value in self.layer_sparsity().items()})
        return metrics

    def log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in self.epoch_metrics().items():
            pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=False)
        if self.log_histograms:
            values = torch.tensor(list(self.layer_sparsity().values()))
            log_histogram(trainer, "prune/layer_sparsity", values, step=trainer.current_epoch)

    # -- checkpoint state -------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.clone() for k, v in self.masks.items()},
            "position": self.position,
            "current_sparsity": self.current_sparsity,
            "compacted": self.compacted,
            "resolved_end": self.resolved_end,
            "fix_at_schedule_end": self.fix_at_schedule_end,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_fit_start, once the model holds the checkpoint's weights.
        self._restored = state_dict
        self.masks = {k: v.bool() for k, v in state_dict["masks"].items()}
        self.position = state_dict["position"]
        self.current_sparsity = state_dict["current_sparsity"]
        self.compacted = state_dict.get("compacted", False)
        self.fix_at_schedule_end = state_dict.get("fix_at_schedule_end", self.fix_at_schedule_end)
        self.resolved_end = state_dict.get("resolved_end")
        if self.user_schedule is None and self.resolved_end is not None:  # the run's own default schedule
            self.schedule = AGP(start=0, end=self.resolved_end) if self.resolved_end > 0 else Constant(start=0)

    def _apply_restored(self, state: dict[str, Any]) -> None:
        unknown = set(self.masks) - set(self._modules)
        if unknown:
            raise ValueError(f"The checkpoint has masks for layers this model lacks: {sorted(unknown)}.")
