"""The last steps of filter pruning: the final prune (BatchNorm reconstruct) and compaction, at the end of ``fit``,
in place when the schedule ends, or (hard mode) in place after every epoch.

An in-place compaction during ``fit`` changes parameter shapes, and everything holding the old ones must follow:

* the optimizer: its state is sliced to the surviving entries
  (:func:`~lightning_compress.pruning.optimizer_state.slice_optimizer_state`);
* DistributedDataParallel: rebuilt over the new parameters on every rank (:func:`~lightning_compress.utils.rewrap_ddp`);
* a resumed run: every compaction is recorded (``events``) and replayed on the fresh model in the LightningModule's
  ``on_load_checkpoint``, which Lightning calls right before its strict load
  (:class:`~lightning_compress.utils.load_hook.ModelLoadHook`);
* the main process of a fork or spawn launcher (``ddp_notebook``, ``ddp_spawn``), which takes rank zero's weights
  back with a load that cannot change shapes: rank zero hands the network back in its original shapes, the removed
  channels zero (:func:`to_original_shapes`), an equivalent network that
  :func:`~lightning_compress.graph.compact` shrinks again.

A mixin of :class:`~lightning_compress.pruning.filter_callback.FilterPruning`, kept apart to keep files short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_compress.graph.batchnorm import recalibrate_batchnorm
from lightning_compress.graph.compact import CompactionPlan, compact, replay_compactions
from lightning_compress.pruning.optimizer_state import slice_optimizer_state
from lightning_compress.utils import first_tensor, replace_compression_target, rewrap_ddp

#: ``state_dict`` key inside the compression target -> (original shape, per leading dimension the original
#: positions of the entries kept now)
Origins = dict[str, tuple[torch.Size, tuple[torch.Tensor, ...]]]

def record_origins(origins: Origins, plan: CompactionPlan, modules: dict[str, nn.Module]) -> None:
    """Compose the slicing of one in-place compaction (``plan.replacements``) into ``origins``; BatchNorm running
    statistics follow their layer's scale (or, without one, the channels the plan removed). Biases the compaction
    created (folded constants) have no origin."""
    for replacement in plan.replacements:
        if replacement.old is None:
            continue
        prefix = f"{replacement.module}." if replacement.module else ""
        names = [replacement.name]
        if replacement.name == "weight" and isinstance(modules.get(replacement.module), _BatchNorm):
            names += ["running_mean", "running_var"]
        for name in names:
            shape = replacement.old.shape if name in ("weight", "bias") else replacement.old.shape[:1]
            _compose(origins, prefix + name, shape, tuple(i.cpu() for i in replacement.index))
    for name, removed in plan.outputs_removed.items():  # BatchNorm without a scale: its statistics only
        module = modules.get(name)
        if isinstance(module, _BatchNorm) and module.weight is None and module.running_mean is not None:
            before, dropped = module.num_features + len(removed), set(removed)
            keep = torch.tensor([i for i in range(before) if i not in dropped], dtype=torch.long)
            for stat in ("running_mean", "running_var"):
                _compose(origins, f"{name}.{stat}" if name else stat, torch.Size([before]), (keep,))


def _compose(origins: Origins, key: str, shape: torch.Size, index: tuple[torch.Tensor, ...]) -> None:
    """Compose one more slicing ``index`` of a tensor of ``shape`` into ``origins[key]``."""
    original, before = origins.get(key, (shape, ()))
    composed = []
    for dim in range(max(len(before), len(index))):
        was = before[dim] if dim < len(before) else torch.arange(shape[dim])
        now = index[dim] if dim < len(index) else torch.arange(len(was))
        composed.append(was[now])
    origins[key] = (original, tuple(composed))


def to_original_shapes(state_dict: dict[str, Any], origins: Origins, prefix: str = "") -> None:
    """Put every compacted tensor of ``state_dict`` (keys ``prefix + key``) back into its original shape, in
    place: kept entries where they were, removed ones zero (a running variance one).

    >>> origins = {"weight": (torch.Size([3, 2]), (torch.tensor([0, 2]), torch.tensor([0, 1])))}
    >>> state = {"weight": torch.ones(2, 2)}
    >>> to_original_shapes(state, origins); state["weight"].tolist()
    [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    """
    for key, (shape, index) in origins.items():
        value = state_dict.get(prefix + key)
        if not isinstance(value, torch.Tensor) or value.shape == shape:
            continue
        full = value.new_full(shape, 1 if key.endswith("running_var") else 0)
        grids = torch.meshgrid(*(i.to(value.device) for i in index), indexing="ij")
        full[grids] = value
        state_dict[prefix + key] = full


class FinalPruneSteps:
    """Final prune, BatchNorm re-estimation and compaction (see FilterPruning for the arguments)."""

    # Provided by FilterPruning / PruningCallback.
    finalized: bool
    compacted: bool
    compacted_at: int | None
    compact_on_fit_end: bool
    compact_every_epoch: bool
    compact_at_schedule_end: bool
    fix_at_schedule_end: bool
    recalibration_batches: int
    layernorm_statistics: str
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
    _origins: Origins

    if TYPE_CHECKING:  # provided by FilterPruning / PruningCallback; stubs here would shadow them

        def _update(self, trainer: pl.Trainer, position: int, force: bool = False) -> None: ...
        def enforce(self) -> None: ...
        def _refresh_groups(self) -> None: ...
        def log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None: ...

    # -- when -------------------------------------------------------------------------------------------------
    def schedule_ended(self, trainer: pl.Trainer) -> bool:
        """Whether the schedule has reached its end by the end of the current epoch (or step, for ``unit="step"``)."""
        position = trainer.current_epoch + 1 if self.schedule.unit == "epoch" else trainer.global_step
        return bool(position >= self.schedule.end)

    def _compaction_due(self, trainer: pl.Trainer) -> bool:
        return self.compact_at_schedule_end and self.compacted_at is None and self.schedule_ended(trainer)

    def _epoch_end_update(self, trainer: pl.Trainer) -> None:
        super()._epoch_end_update(trainer)  # type: ignore[misc]
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        fix = self.fix_at_schedule_end and self.schedule_ended(trainer)  # the recovery epochs follow
        if (last_epoch or trainer.should_stop or fix or self._compaction_due(trainer)) and not self.finalized:
            self.finalize(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # type: ignore[misc]
        if self._ready and self.finalized and self._compaction_due(trainer):
            # Resumed from a checkpoint whose selection is final but whose compaction is still due (a fit that stopped
            # before the schedule's end, or a checkpoint saved before the epoch's end): compact before this step.
            self.compact_at_end_of_schedule(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)  # type: ignore[misc]  # the epoch-end update first
        done = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._ready and done:
            # The epoch's compaction too: validation measures the compact network, and a checkpoint saved at
            # validation end (val_check_interval < 1, check_val_every_n_epoch > 1) holds it.
            self._epoch_end_compaction(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._ready:
            return
        self._epoch_end_update(trainer)
        self._epoch_end_compaction(trainer)  # nothing left to do if the epoch-end validation did it
        self.log_epoch(trainer, pl_module)  # after the compaction: the checkpoint that follows holds it

    def _epoch_end_compaction(self, trainer: pl.Trainer) -> None:
        if self.finalized and self._compaction_due(trainer):
            self.compact_at_end_of_schedule(trainer)
        elif self.compact_every_epoch and any(not bool(m.all()) for m in self.masks.values()):
            self.compact_in_place(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ready and not self.finalized:
            self.finalize(trainer)
        if self._ready and self.compact_at_schedule_end and self.compacted_at is None and not self.compact_on_fit_end:
            rank_zero_warn(f"FilterPruning(compact_at_schedule_end=True): fit stopped before the schedule's end "
                           f"({self.schedule.unit} {self.schedule.end}); the selection was made permanent, but the "
                           "network was not compacted (compact_on_fit_end=True compacts it at the end of fit).")

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
        if self.compact_on_fit_end and self.finalized and not self.compacted and self.compacted_at is None:
            self.compact(pl_module)

    def compact(self, pl_module: pl.LightningModule) -> nn.Module:
        """Replace the compression target by its compacted copy; returns the copy. Without a ``compression_target``
        the LightningModule itself is compacted in place (as the in-place options do) and returned."""
        from lightning_compress.measure import count_parameters

        before = count_parameters(self._target)
        in_place = self._target is pl_module
        small, plan = cast(tuple[nn.Module, Any], compact(self._target, self._example.to(pl_module.device),
                                                          inplace=in_place, return_plan=True))
        if not in_place:
            replace_compression_target(pl_module, small)
        record_origins(self._origins, plan, dict(small.named_modules()))
        self.compaction = {"parameters_before": before, "parameters_after": count_parameters(small),
                           "channels_removed": plan.num_removable,
                           "skipped": [f"group {g}: {len(p)} channels kept ({why})" for g, p, why in plan.skipped]}
        self.compacted, self.masks, self.groups = True, {}, []
        self._target, self._modules, self._ready = small, {}, False
        return small

    def compact_at_end_of_schedule(self, trainer: pl.Trainer) -> None:
        """The schedule has ended and the selection is final: compact in place; from now on only log."""
        plan = self.compact_in_place(trainer)
        self.compacted_at = trainer.current_epoch
        if plan.skipped:
            rank_zero_warn("FilterPruning could not remove some pruned channels; they stay in the network, no longer "
                           f"masked: {self.compaction['skipped']}")

    def compact_in_place(self, trainer: pl.Trainer) -> CompactionPlan:
        """Make the pruning physical during training: shrink the layers in place, slice the optimizer state, rebuild
        the DDP wrapper, and record what was removed (replayed on a fresh model when a run resumes)."""
        from lightning_compress.measure import count_parameters

        self._refuse_quantized(f"at the end of epoch {trainer.current_epoch}")
        before = count_parameters(self._target)
        removed = {name: (~mask).nonzero().flatten().tolist() for name, mask in self.masks.items()
                   if not bool(mask.all())}
        device = next(self._target.parameters()).device
        _, plan = cast(tuple[nn.Module, CompactionPlan],
                       compact(self._target, self._example.to(device), inplace=True, return_plan=True))
        record_origins(self._origins, plan, dict(self._target.named_modules()))
        for optimizer in trainer.optimizers:
            slice_optimizer_state(optimizer, plan.replacements)
        rewrap_ddp(trainer)  # on every rank, at the same point: the decisions above are identical across ranks
        self.events.append(removed)
        self.compaction = {
            "parameters_before": self.compaction.get("parameters_before", before),
            "parameters_after": count_parameters(self._target),
            "channels_removed": self.compaction.get("channels_removed", 0) + plan.num_removable,
            "skipped": [f"group {g}: {len(p)} channels kept ({why})" for g, p, why in plan.skipped],
        }
        self.masks = {}
        self._refresh_groups()
        return plan

    def replay_compactions(self, events: list[dict[str, list[int]]], example: torch.Tensor) -> None:
        """Shrink a fresh model the way the interrupted run did, so that its checkpoint loads (strictly)."""
        self._refuse_quantized("when a run resumes")
        for plan in replay_compactions(self._target, events, example, self.layernorm_statistics):
            record_origins(self._origins, plan, dict(self._target.named_modules()))

    def _refuse_quantized(self, when: str) -> None:
        from lightning_compress.quantization.quantizers import is_quantized

        quantized = [name for name, module in self._target.named_modules() if is_quantized(module)]
        if quantized:
            raise ValueError(
                f"FilterPruning cannot compact the network in place {when}: it holds quantized layers {quantized}. "
                "Start quantization after the compaction, e.g. QuantizationAwareTraining(start_epoch=...) later than "
                "the epoch at which the pruning schedule ends.")

    def _hand_back_original_shapes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under a fork or spawn launcher the main process loads rank zero's weights into its own, uncompacted
        network with a load that cannot change shapes: hand them back in the original shapes."""
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        if not self._origins or not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            return
        names = [name for name, module in pl_module.named_modules() if module is self._target]
        if not names:
            return
        target = f"{names[0]}." if names[0] else ""
        origins = dict(self._origins)

        def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
            to_original_shapes(state_dict, origins, prefix + target)

        pl_module.register_state_dict_post_hook(hook)
        rank_zero_warn("FilterPruning compacted the network, but this launcher (fork or spawn) loads the weights back "
                       "into the main process's network, which keeps its shapes: the main process gets the trained "
                       "network in its original shapes with the removed channels zero (the same outputs; "
                       "lightning_compress.graph.compact(network, example) shrinks it again). strategy='ddp' "
                       "keeps the compact network in the main process.")

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
