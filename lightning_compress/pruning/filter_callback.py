"""FilterPruning: structured pruning of whole filters (output channels) scored by their Lp norm, soft or hard."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_compress.pruning.batchnorm import batchnorm_after, recalibrate_batchnorm
from lightning_compress.pruning.callback_base import PruningCallback
from lightning_compress.pruning.criteria import check_sparsity, lowest_k_mask
from lightning_compress.pruning.groups import (
    PrunableGroup,
    from_dependency_group,
    group_scores,
    zero_group_channels,
)
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.pruning.structured import check_p, filters_to_prune
from lightning_compress.utils import first_tensor, replace_compression_target

MODES = ("soft", "hard")
GRANULARITIES = ("filter", "channel")


class FilterPruning(PruningCallback):
    """Prune the filters (output channels) of lowest Lp norm, per dependency group, soft or hard.

    Channels tied across layers (residual additions, concatenations, depthwise convolutions) form one group, found
    by tracing one forward pass: they are scored together (the Lp norm of all weights tied to the channel) and kept
    or pruned together, so :func:`lightning_compress.pruning.compact` can remove them. A group is pruned only if
    every producing layer is selected; the final classifier is not pruned by default.

    ``mode="soft"`` is Soft Filter Pruning (He et al., IJCAI 2018): at every scheduled update (by default before
    training and after every epoch) the lowest-scoring ``rate`` of each group's channels are zeroed, in the
    producing weights and biases only, so they keep receiving gradients and may regrow. When training ends the
    final selection is made permanent: pruned channels' BatchNorm scale and shift are zeroed (in eval mode BN would
    otherwise turn a zero filter into the constant ``beta - gamma * mu / sigma``) and BatchNorm statistics are
    re-estimated on ``recalibration_batches`` training batches (averaged across DDP ranks). The four steps are
    select (scores), prune (zero), reconstruct (BN zeroing and re-estimation) and compact
    (:func:`~lightning_compress.pruning.compact`).

    ``mode="hard"``: a pruned channel stays pruned (masks only grow along the schedule); weights, biases and
    BatchNorm channels are zeroed after every optimizer step.

    ``granularity="filter"`` scores producing filters; ``"channel"`` scores the consumers' input channels that read
    each channel (the same group is then removed).

    Args:
        sparsity: fraction of each group's channels pruned, in [0, 1); or a mapping from layer name/regex to a rate
            (first matching pattern wins; a group takes the smallest rate of its layers; unmatched: not pruned).
        mode: ``"soft"`` or ``"hard"``.
        p: the norm scoring filters (1 or 2).
        granularity: ``"filter"`` or ``"channel"``.
        schedule: progress towards the rates (default: the full rate from the start, updated every epoch).
        recalibration_batches: training batches to re-estimate BatchNorm statistics after the final prune.
        compact_on_fit_end: at the end of ``fit`` replace the compression target inside the LightningModule by its
            compacted copy (fewer filters and channels, same outputs); a later ``fit`` (fine-tuning) builds its
            optimizer over the compact network, and this callback then leaves it alone.
        layers: names or regexes of layers to prune.
        types: layer types considered.
        exclude: names or regexes to skip (their whole group is skipped).
        prune_classifier: also prune the last layer.
        log_histograms: per-layer sparsity histogram in TensorBoard.

    Raises:
        ValueError: for a rate outside [0, 1), an unknown mode or granularity, ``p`` not in {1, 2}, a rate that
            would remove every channel of a group (before the first training step), or a pattern matching nothing.
    """

    def __init__(
        self,
        sparsity: float | dict[str, float] = 0.4,
        mode: str = "soft",
        p: int = 2,
        granularity: str = "filter",
        schedule: Schedule | None = None,
        recalibration_batches: int = 20,
        compact_on_fit_end: bool = False,
        layers: str | list[str] | None = None,
        types: list[str] | None = None,
        exclude: str | list[str] | None = None,
        prune_classifier: bool = False,
        log_histograms: bool = True,
    ) -> None:
        rates = sparsity if isinstance(sparsity, dict) else {".*": sparsity}
        for pattern, rate in rates.items():
            check_sparsity(rate, f"sparsity[{pattern!r}]" if isinstance(sparsity, dict) else "sparsity")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
        check_p(p)
        if recalibration_batches < 0:
            raise ValueError(f"recalibration_batches must be >= 0, got {recalibration_batches!r}.")
        super().__init__(0.0, schedule, layers, types or ["Conv1d", "Conv2d", "Linear"], exclude, prune_classifier,
                         log_histograms)
        self.sparsity = sparsity  # type: ignore[assignment]
        self.rates = rates
        self.mode, self.p, self.granularity = mode, p, granularity
        self.recalibration_batches = recalibration_batches
        self.compact_on_fit_end = compact_on_fit_end
        self.compacted = False
        self.compaction: dict[str, Any] = {}
        self.finalized = False
        self.revived_filters = 0
        self.groups: list[PrunableGroup] = []
        self.skipped: dict[str, str] = {}

    # -- resolution -------------------------------------------------------------------------------------------
    def rate_of(self, name: str) -> float:
        """The target rate of layer ``name`` (first matching pattern of ``sparsity``)."""
        for pattern, rate in self.rates.items():
            if name == pattern or re.fullmatch(pattern, name):
                return rate
        return 0.0

    def group_rate(self, group: PrunableGroup) -> float:
        return min(self.rate_of(name) for name in group.producers)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.compacted:
            super().setup(trainer, pl_module, stage)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.compacted:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.compacted:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _prepare(self, batch: Any, pl_module: pl.LightningModule) -> None:
        super()._prepare(batch, pl_module)
        self._example = first_tensor(batch)[:2].detach().clone()
        self._all_modules = dict(self._target.named_modules())
        self.groups, self.skipped = self._resolve_groups(first_tensor(batch).to(pl_module.device))
        if not self.groups:
            raise ValueError(f"FilterPruning found no group of filters it may prune; skipped: {self.skipped}.")
        self._modules = {name: self._all_modules[name] for g in self.groups for name in g.producers}
        self.validate_groups()
        if self.skipped:
            rank_zero_warn(f"FilterPruning leaves these layers unpruned: {self.skipped}")

    def _resolve_groups(self, example: torch.Tensor) -> tuple[list[PrunableGroup], dict[str, str]]:
        from lightning_compress.pruning.dependency import filter_groups

        selected, skipped = set(self._modules), {}
        try:
            traced = filter_groups(self._target, example)
        except Exception as err:  # an exotic model the tracer cannot follow: each layer on its own
            rank_zero_warn(f"FilterPruning could not trace dependency groups ({err}); scoring each layer alone.")
            return self._single_layer_groups(example), {}
        groups = []
        for dependency_group in traced:
            group = from_dependency_group(dependency_group)
            names = list(group.producers)
            if not selected & set(names):
                continue
            if not set(names) <= selected:
                skipped[group.name] = f"tied to unselected layers {sorted(set(names) - selected)}"
            elif dependency_group.blocked:
                skipped[group.name] = "; ".join(dependency_group.blocked)
            elif self.group_rate(group) > 0:
                groups.append(group)
        return groups, skipped

    def _single_layer_groups(self, example: torch.Tensor) -> list[PrunableGroup]:
        bns = batchnorm_after(self._target, example, self._modules)
        groups = []
        for name, module in self._modules.items():
            index = torch.arange(module.weight.shape[0])
            groups.append(PrunableGroup({name: index}, batchnorms={bns[name]: index} if name in bns else {}))
        return groups

    def validate_groups(self) -> None:
        for group in self.groups:
            try:
                filters_to_prune(torch.ones(group.size), self.group_rate(group))
            except ValueError as err:
                raise ValueError(f"Layers {list(group.producers)}: {err}") from err

    def target_at(self, position: int) -> float:
        return self.schedule.progress(position)  # progress; each group scales its own rate

    # -- masks ------------------------------------------------------------------------------------------------
    def compute_masks(self, modules: dict[str, nn.Module], progress: float, position: int) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        for group in self.groups:
            scores = group_scores(group, self._all_modules, self.p, self.granularity)
            k = filters_to_prune(scores, self.group_rate(group) * progress)
            previous = self._group_keep(group)
            if previous is not None and self.mode == "hard":
                scores[~previous] = -1.0  # already pruned channels rank lowest and stay pruned
                k = max(k, int((~previous).sum()))
            keep = lowest_k_mask(scores, k)
            if previous is not None and self.mode == "soft":
                self.revived_filters += int((keep & ~previous).sum())
            masks.update(self._producer_masks(group, keep))
        return masks

    def _group_keep(self, group: PrunableGroup) -> torch.Tensor | None:
        name, index = next(iter(group.producers.items()))
        mask = self.masks.get(name)
        return None if mask is None else mask.cpu()[index.clamp(min=0)]

    def _producer_masks(self, group: PrunableGroup, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        masks = {}
        for name, index in group.producers.items():
            mask = torch.ones(self._all_modules[name].weight.shape[0], dtype=torch.bool)
            valid = index >= 0
            mask[index[valid]] = keep[valid]
            masks[name] = mask
        return masks

    def enforce(self) -> None:
        if not self.masks:
            return
        zero_bn = self.mode == "hard" or self.finalized
        for group in self.groups:
            keep = self._group_keep(group)
            if keep is not None:
                zero_group_channels(group, self._all_modules, keep, batchnorm=zero_bn)

    def after_step(self, trainer: pl.Trainer) -> None:
        if self.mode == "hard" or self.finalized:
            self.enforce()  # soft mode lets zeroed filters regrow between updates

    # -- the final prune ---------------------------------------------------------------------------------------
    def _epoch_end_update(self, trainer: pl.Trainer) -> None:
        super()._epoch_end_update(trainer)
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if (last_epoch or trainer.should_stop) and not self.finalized:
            self.finalize(trainer)

    @override
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

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compact_on_fit_end and self.finalized and not self.compacted:
            self.compact(pl_module)

    def compact(self, pl_module: pl.LightningModule) -> nn.Module:
        """Replace the compression target by its compacted copy; returns the copy."""
        from lightning_compress.measure import count_parameters
        from lightning_compress.pruning.compact import compact

        before = count_parameters(self._target)
        small, plan = compact(self._target, self._example.to(pl_module.device), return_plan=True)
        replace_compression_target(pl_module, small)
        self.compaction = {"parameters_before": before, "parameters_after": count_parameters(small),
                           "channels_removed": plan.num_removable,
                           "skipped": [f"group {g}: {len(p)} channels kept ({why})" for g, p, why in plan.skipped]}
        self.compacted, self.masks, self.groups = True, {}, []
        self._target, self._modules, self._ready = small, {}, False
        return small

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
        for index, batch in enumerate(trainer.train_dataloader):
            if index >= self.recalibration_batches:
                return
            yield first_tensor(batch)

    # -- logging and state ------------------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, float]:
        metrics = super().epoch_metrics()
        metrics["prune/progress"] = metrics.pop("prune/target")
        for name, keep in self.masks.items():
            metrics[f"prune/filters_alive/{name}"] = float(keep.sum())
        metrics["prune/revived_filters"] = float(self.revived_filters)
        self.revived_filters = 0
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "finalized": self.finalized, "revived_filters": self.revived_filters,
                "compacted": self.compacted}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.finalized = state_dict.get("finalized", False)
        self.revived_filters = state_dict.get("revived_filters", 0)
        self.compacted = state_dict.get("compacted", False)
