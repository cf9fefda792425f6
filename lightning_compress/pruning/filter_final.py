"""The last steps of filter pruning: the final prune (BatchNorm reconstruct), and compaction, at the end of ``fit``
or, in hard mode, after every epoch with the optimizer state sliced to match.

A mixin of :class:`~lightning_compress.pruning.filter_callback.FilterPruning`, kept apart to keep files short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_compress.pruning.batchnorm import recalibrate_batchnorm
from lightning_compress.pruning.compact import compact
from lightning_compress.pruning.optimizer_state import slice_optimizer_state
from lightning_compress.utils import first_tensor, replace_compression_target


class FinalPruneSteps:
    """Final prune, BatchNorm re-estimation and compaction (see FilterPruning for the arguments)."""

    # Provided by FilterPruning / PruningCallback.
    finalized: bool
    compacted: bool
    compact_on_fit_end: bool
    compact_every_epoch: bool
    recalibration_batches: int
    compaction: dict[str, Any]
    events: list[dict[str, list[int]]]
    masks: dict[str, torch.Tensor]
    groups: list[Any]
    position: int | None
    schedule: Any
    _target: nn.Module
    _modules: dict[str, Any]
    _ready: bool
    _example: torch.Tensor

    if TYPE_CHECKING:  # provided by FilterPruning / PruningCallback; stubs here would shadow them

        def _update(self, trainer: pl.Trainer, position: int, force: bool = False) -> None: ...
        def enforce(self) -> None: ...
        def _refresh_groups(self) -> None: ...

    def _epoch_end_update(self, trainer: pl.Trainer) -> None:
        super()._epoch_end_update(trainer)  # type: ignore[misc]
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if (last_epoch or trainer.should_stop) and not self.finalized:
            self.finalize(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # type: ignore[misc]
        if self.compact_every_epoch and self._ready and any(not bool(m.all()) for m in self.masks.values()):
            self.compact_in_place(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ready and not self.finalized:
            self.finalize(trainer)

    def finalize(self, trainer: pl.Trainer) -> None:
        """Make the current selection permanent: zero filters and their BatchNorm channels, re-estimate BN."""
        self._update(trainer, max(self.schedule.end, self.position or 0), force=True)
        self.finalized = True
        self.enforce()
        if self.recalibration_batches and any(g.batchnorms for g in self.groups):
            recalibrate_batchnorm(self._target, self._training_inputs(trainer), trainer.lightning_module.device)
            self._average_batchnorm_statistics(trainer)
            self.enforce()

    # -- compaction ---------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compact_on_fit_end and self.finalized and not self.compacted:
            self.compact(pl_module)

    def compact(self, pl_module: pl.LightningModule) -> nn.Module:
        """Replace the compression target by its compacted copy; returns the copy."""
        from lightning_compress.measure import count_parameters

        before = count_parameters(self._target)
        small, plan = cast(tuple[nn.Module, Any],
                           compact(self._target, self._example.to(pl_module.device), return_plan=True))
        replace_compression_target(pl_module, small)
        self.compaction = {"parameters_before": before, "parameters_after": count_parameters(small),
                           "channels_removed": plan.num_removable,
                           "skipped": [f"group {g}: {len(p)} channels kept ({why})" for g, p, why in plan.skipped]}
        self.compacted, self.masks, self.groups = True, {}, []
        self._target, self._modules, self._ready = small, {}, False
        return small

    def compact_in_place(self, trainer: pl.Trainer) -> None:
        """Hard pruning made physical during training: shrink the layers in place, slice the optimizer state, and
        record what was removed (replayed on a fresh model when a run resumes)."""
        removed = {name: (~mask).nonzero().flatten().tolist() for name, mask in self.masks.items()
                   if not bool(mask.all())}
        _, plan = cast(tuple[nn.Module, Any], compact(self._target, self._example, inplace=True, return_plan=True))
        for optimizer in trainer.optimizers:
            slice_optimizer_state(optimizer, plan.replacements)
        self.events.append(removed)
        self.masks = {}
        self._refresh_groups()

    def replay_compactions(self, events: list[dict[str, list[int]]], example: torch.Tensor) -> None:
        """Shrink a fresh model the way the interrupted run did, so that its checkpoint loads (strictly)."""
        modules = dict(self._target.named_modules())
        for removed in events:
            with torch.no_grad():
                for name, rows in removed.items():
                    modules[name].weight[rows] = 0
                    if modules[name].bias is not None:
                        modules[name].bias[rows] = 0
            compact(self._target, example, inplace=True)
            modules = dict(self._target.named_modules())

    # -- BatchNorm statistics --------------------------------------------------------------------------------
    def _average_batchnorm_statistics(self, trainer: pl.Trainer) -> None:
        """Each rank re-estimated statistics on its own shard: average them so every rank holds the same model."""
        if trainer.world_size == 1:
            return
        for module in self._target.modules():
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                for name in ("running_mean", "running_var"):
                    buffer = getattr(module, name)
                    buffer.copy_(trainer.strategy.reduce(buffer.clone(), reduce_op="mean"))

    def _training_inputs(self, trainer: pl.Trainer) -> Any:
        for index, batch in enumerate(trainer.train_dataloader or []):
            if index >= self.recalibration_batches:
                return
            yield first_tensor(batch)
