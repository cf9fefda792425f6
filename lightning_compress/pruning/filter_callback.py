"""FilterPruning: structured pruning of whole filters (output channels) scored by their Lp norm, soft or hard."""

from __future__ import annotations

import math
import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_compress.graph.batchnorm import batchnorm_after
from lightning_compress.graph.layers import select_layers
from lightning_compress.graph.tracing import unexecuted_layers
from lightning_compress.pruning.callback_base import PruningCallback
from lightning_compress.pruning.filter_final import FinalPruneSteps, Origins
from lightning_compress.pruning.filter_state import FilterState, check_options
from lightning_compress.pruning.groups import (
    PrunableGroup,
    from_dependency_group,
    group_keep_mask,
    group_scores,
    group_selection,
    producer_masks,
    pruned_channel_masks,
    set_layernorm_statistics,
)
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.pruning.structured import filters_to_prune
from lightning_compress.utils import compression_target, first_tensor
from lightning_compress.utils.load_hook import ModelLoadHook


class FilterPruning(FilterState, FinalPruneSteps, PruningCallback):
    """Prune the filters (output channels) of lowest Lp norm, per dependency group, soft or hard.

    Channels tied across layers (residual additions, concatenations, depthwise convolutions) form one group, found
    by tracing one forward pass: they are scored together (the Lp norm of all weights tied to the channel) and kept
    or pruned together, so :func:`lightning_compress.graph.compact` can remove them. A group is pruned only if
    every producing layer is selected; the final classifier is not pruned by default. A layer that ``forward()``
    never runs (e.g. an auxiliary head called in ``training_step``) is left unpruned, and compaction is refused while
    one exists, since the trace cannot see which channels it reads (unless ``exclude`` names it).

    ``mode="soft"`` is Soft Filter Pruning (He et al., IJCAI 2018): at every scheduled update (by default before
    training and after every epoch) the lowest-scoring ``rate`` of each group's channels are zeroed, in the
    producing weights and biases only, so they keep receiving gradients and may regrow. When training ends the
    final selection is made permanent: pruned channels' BatchNorm scale and shift are zeroed (in eval mode BN would
    otherwise turn a zero filter into the constant ``beta - gamma * mu / sigma``) and BatchNorm statistics are
    re-estimated on ``recalibration_batches`` training batches (averaged across DDP ranks). The four steps are
    select (scores), prune (zero), reconstruct (BN zeroing and re-estimation) and compact
    (:func:`~lightning_compress.graph.compact`).

    ``mode="hard"`` (the default): a pruned channel stays pruned (masks only grow along the schedule); weights,
    biases and BatchNorm channels are zeroed after every optimizer step.

    ``compact_at_schedule_end=True`` (either mode) ends pruning in the middle of ``fit``: at the end of the epoch in
    which the schedule reaches ``end``, the selection is made permanent as above and the network is compacted in
    place; training goes on with the smaller network (e.g. distilling, then quantization-aware training from a later
    epoch), and the checkpoint written after that epoch already holds it. Afterwards the callback leaves the weights
    alone and only logs.

    Logged every epoch: ``prune/sparsity`` (the fraction of the original prunable channels of all groups that are
    pruned or removed), ``prune/sparsity/<layer>`` (the same for each pruned layer's original filters),
    ``prune/filters_alive/<layer>``, ``prune/progress`` (along the schedule), ``prune/revived_filters`` (soft mode:
    pruned filters that grew back into the selection) and, with an in-place compaction, ``prune/compacted`` (0
    before the first one, 1 after); the histogram ``prune/layer_sparsity``. The values refer to the original sizes,
    so they continue unchanged across a compaction.

    ``granularity="filter"`` scores producing filters; ``"channel"`` scores the consumers' input channels that read
    each channel (the same group is then removed).

    Args:
        sparsity: fraction of each group's channels pruned, in [0, 1); or a mapping from layer name/regex to a rate
            (first matching pattern wins; a group takes the smallest rate of its layers; unmatched: not pruned).
        mode: ``"hard"`` (the default) or ``"soft"``. Soft filter pruning collapses under SGD with momentum on
            BatchNorm networks (a zeroed filter's BatchNorm input has zero variance, and what regrows disrupts the
            next epoch: -32 to -33 points on average, -25 to -37 per seed, on the shapes workload at lr 0.02, where
            hard mode is within 1 point of the compact architecture); it is kept for Adam-style optimizers and for
            the paper's algorithm.
        p: the norm scoring filters (1 or 2).
        granularity: ``"filter"`` or ``"channel"``.
        schedule: progress towards the rates. Default: AGP (Zhu & Gupta 2017) from epoch 0 to ``recovery_epochs``
            before the end of the fit, after which the selection is made permanent (the final prune below; soft mode
            stops re-selecting) and the remaining epochs recover.
        recovery_epochs: epochs trained with the final selection at the end of the fit (``None``: a third of
            ``max_epochs``, rounded up). With a ``schedule`` given, the selection is made permanent when it ends
            (without one, soft mode re-selects at every update to the end of ``fit``); either way a warning says
            when the schedule leaves fewer recovery epochs.
        recalibration_batches: training batches to re-estimate BatchNorm statistics after the final prune.
        compact_on_fit_end: at the end of ``fit`` replace the compression target inside the LightningModule by its
            compacted copy (fewer filters and channels, same outputs); a later ``fit`` (fine-tuning) builds its
            optimizer over the compact network, and this callback then leaves it alone. Without a
            ``compression_target`` the LightningModule itself is compacted in place.
        compact_every_epoch: hard mode only: after every epoch shrink the layers in place and slice the optimizer
            state to match, so training itself gets cheaper (a resumed run replays the recorded compactions on the
            fresh model before loading the checkpoint; under DDP the wrapper is rebuilt on every rank).
        compact_at_schedule_end: at the end of the epoch in which the schedule reaches its end, make the selection
            permanent (final prune, BatchNorm zeroing, BatchNorm re-estimation averaged across ranks) and compact the
            network in place, the optimizer state sliced to match (resume and DDP as for ``compact_every_epoch``);
            then only log. Quantization must start after that epoch.
        rounding: how a group's fractional channel count is rounded: ``"nearest"`` (the default), ``"up"`` (at
            least the rate: Torch-Pruning's count, ``n - floor(n * (1 - rate))``, which removes 4 of a grouped
            convolution's 8-channel groups at 0.4) or ``"down"`` (at most the rate).
        layernorm_statistics: what a LayerNorm over pruned channels normalises by: ``"all"`` (the default) keeps
            the pruned channels' constant inputs in its mean and variance (the others' outputs do not change;
            compaction keeps the constants, a LayerNorm a little slower than a plain one), ``"kept"`` takes them
            over the kept channels only (as Torch-Pruning's slicing; training adapts to it, and compaction gives
            plain LayerNorms). See :mod:`~lightning_compress.graph.layernorm_statistics`.
        layers: names or regexes of layers to prune.
        types: layer types considered.
        exclude: names or regexes to skip (their whole group is skipped).
        prune_classifier: also prune the last layer.
        log_histograms: per-layer sparsity histogram in TensorBoard.

    Raises:
        ValueError: for a rate outside [0, 1), a ``sparsity`` key that is not a valid regex, an unknown mode or
            granularity, ``p`` not in {1, 2}, ``recalibration_batches`` not an integer >= 0, ``compact_every_epoch``
            in soft mode or together with ``compact_at_schedule_end``; before the first training step for a rate
            that would remove every channel of a group, a ``sparsity`` pattern matching no selected layer, a
            compaction option while ``forward()`` never runs a layer with parameters that ``exclude`` does not name,
            or a ``QuantizationAwareTraining`` that starts before the compaction at the schedule's end; at a
            compaction in place if the network holds quantized layers.
    """

    def __init__(
        self,
        sparsity: float | dict[str, float] = 0.4,
        mode: str = "hard",
        p: int = 2,
        granularity: str = "filter",
        schedule: Schedule | None = None,
        recalibration_batches: int = 20,
        compact_on_fit_end: bool = False,
        compact_every_epoch: bool = False,
        compact_at_schedule_end: bool = False,
        layers: str | list[str] | None = None,
        types: list[str] | None = None,
        exclude: str | list[str] | None = None,
        prune_classifier: bool = False,
        log_histograms: bool = True,
        recovery_epochs: int | None = None,
        rounding: str = "nearest",
        layernorm_statistics: str = "all",
    ) -> None:
        rates = check_options(sparsity, mode, p, granularity, recalibration_batches, compact_every_epoch,
                              compact_at_schedule_end, rounding, layernorm_statistics)
        super().__init__(0.0, schedule, layers, types or ["Conv1d", "Conv2d", "Linear"], exclude, prune_classifier,
                         log_histograms, recovery_epochs)
        self.sparsity = sparsity  # type: ignore[assignment]
        self.rates = rates
        self.mode, self.p, self.granularity, self.rounding = mode, p, granularity, rounding
        self.layernorm_statistics = layernorm_statistics
        self.recalibration_batches = recalibration_batches
        self.compact_on_fit_end = compact_on_fit_end
        self.compact_every_epoch = compact_every_epoch
        self.compact_at_schedule_end = compact_at_schedule_end
        self.compacted_at: int | None = None  # the epoch at whose end the schedule-end compaction happened
        self.events: list[dict[str, list[int]]] = []
        self.original_sizes: dict[str, int] = {}  # channels of each group before any compaction
        self.original_filters: dict[str, int] = {}  # filters of each pruned layer before any compaction
        self._origins: Origins = {}
        self._load_hook: ModelLoadHook | None = None
        self.compaction: dict[str, Any] = {}
        self.finalized = False
        self.revived_filters = 0
        self.groups: list[PrunableGroup] = []
        self._zero_plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._zero_plan_source: dict[str, torch.Tensor] | None = None
        self._zero_plan_bn = False
        self.skipped: dict[str, str] = {}
        self.unexecuted: list[str] = []  # layers of the target that the traced forward never ran

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
        if self.compacted:
            return
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._check_rate_patterns()
        if not (self.compact_every_epoch or self.compact_at_schedule_end):
            return
        if stage != "fit":  # validate / test / predict from a checkpoint of a compacted network
            self._target = compression_target(pl_module)
        self._replay_before_loading(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap_load_hook()
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        if self.schedule.unit == "step" and math.isfinite(batches):  # before any quantizer attaches (epoch starts)
            self.check_quantization_starts_later(trainer, math.ceil(batches / trainer.accumulate_grad_batches))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap_load_hook()
        if stage == "fit":
            self._hand_back_original_shapes(trainer, pl_module)

    def _prepare(self, batch: Any, pl_module: pl.LightningModule) -> None:
        super()._prepare(batch, pl_module)
        example = first_tensor(batch)[:2].detach().cpu().clone()
        kept = getattr(self, "_example", None)  # a resumed run keeps the checkpoint's: same graph, same state
        if kept is None or (not self.events and tuple(kept.shape[1:]) != tuple(example.shape[1:])):
            # The same example on every rank: compaction plans and their replay must not differ between ranks.
            self._example = pl_module.trainer.strategy.broadcast(example, src=0)
        self._refresh_groups()
        self._refuse_compacting_unexecuted()
        if not self.groups:
            raise ValueError(f"FilterPruning found no group of filters it may prune; skipped: {self.skipped}.")
        if self.compacted_at is None:
            self.validate_groups()
        if self.skipped:
            rank_zero_warn(f"FilterPruning leaves these layers unpruned: {self.skipped}")

    def _refresh_groups(self) -> None:
        """Resolve the dependency groups of the current network (again after an in-place compaction)."""
        self._all_modules = dict(self._target.named_modules())
        self.groups, self.skipped = self._resolve_groups(self._example.to(next(self._target.parameters()).device))
        self._modules = {name: self._all_modules[name] for g in self.groups for name in g.producers}
        for group in self.groups:
            self.original_sizes.setdefault(group.name, group.size)
        for name, module in self._modules.items():
            self.original_filters.setdefault(name, module.weight.shape[0])

    def _resolve_groups(self, example: torch.Tensor) -> tuple[list[PrunableGroup], dict[str, str]]:
        from lightning_compress.graph.dependency import build_graph

        selected, skipped = set(self._modules), {}
        try:
            graph = build_graph(self._target, example)
            traced = graph.groups()
        except Exception as err:  # an exotic model the tracer cannot follow: each layer on its own
            rank_zero_warn(f"FilterPruning could not trace dependency groups ({err}); scoring each layer alone.")
            self.unexecuted = []
            return self._single_layer_groups(example), {}
        self.unexecuted = unexecuted_layers(self._target, graph.trace)
        for name in selected.intersection(self.unexecuted):
            skipped[name] = "forward() never runs it, so the dependency trace cannot see its channels"
        groups = []
        for dependency_group in traced:
            group = from_dependency_group(dependency_group, graph.layernorm_dims)
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

    def _refuse_compacting_unexecuted(self) -> None:
        """Compaction removes channels from what the traced forward reads; a layer it never ran (e.g. an auxiliary
        head of ``training_step``) may read them too and would break: refuse before the first step, unless
        excluded (the user vouches it reads no pruned channel)."""
        if not (self.compact_on_fit_end or self.compact_every_epoch or self.compact_at_schedule_end):
            return
        kept = select_layers(self._target, types=[torch.nn.Module], exclude=self.exclude)
        unexecuted = [name for name in self.unexecuted if name in kept]
        if unexecuted:
            raise ValueError(
                f"FilterPruning cannot compact {type(self._target).__name__}: forward() never runs the layers "
                f"{unexecuted} (called elsewhere, e.g. in training_step, or only in training mode), so the "
                "dependency trace cannot see which channels they read, and removing channels would break them. Call "
                "them from forward() (e.g. return their output too), turn compaction off, or pass "
                f"exclude={unexecuted!r} plus the layers whose outputs they read (excluding a layer keeps its "
                "whole group).")

    def _single_layer_groups(self, example: torch.Tensor) -> list[PrunableGroup]:
        try:
            bns = batchnorm_after(self._target, example, self._modules)
        except Exception:  # not traceable either: no BatchNorm is known to normalise only one layer
            bns = {}
        groups = []
        for name, module in self._modules.items():
            index = torch.arange(module.weight.shape[0])
            groups.append(PrunableGroup({name: index}, batchnorms={bns[name]: index} if name in bns else {}))
        return groups

    def validate_groups(self) -> None:
        for group in self.groups:
            try:
                filters_to_prune(torch.ones(self.original_sizes.get(group.name, group.size)), self.group_rate(group),
                                 self.rounding)
            except ValueError as err:
                raise ValueError(f"Layers {list(group.producers)}: {err}") from err

    def target_at(self, position: int) -> float:
        return self.schedule.progress(position)  # progress; each group scales its own rate

    def _update(self, trainer: pl.Trainer, position: int, force: bool = False) -> None:
        if self.compacted_at is None:  # after the schedule-end compaction the selection is final
            super()._update(trainer, position, force)

    # -- masks ------------------------------------------------------------------------------------------------
    def compute_masks(self, modules: dict[str, Any], progress: float, position: int) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        for group in self.groups:
            scores = group_scores(group, self._all_modules, self.p, self.granularity)
            k = self._to_prune(group, scores, self.group_rate(group) * progress)
            previous = self._group_keep(group)
            if previous is not None and self.mode == "hard":
                scores[~previous] = -1.0  # already pruned channels rank lowest and stay pruned
                k = max(k, int((~previous).sum()))
            keep = group_keep_mask(scores, k, group.segments, self.rounding)
            if previous is not None and self.mode == "soft":
                self.revived_filters += int((keep & ~previous).sum())
            masks.update(producer_masks(group, keep, self._all_modules))
        return masks

    def _to_prune(self, group: PrunableGroup, scores: torch.Tensor, rate: float) -> int:
        """Channels to prune now; after in-place compactions the rate still refers to the original size."""
        original = self.original_sizes.get(group.name, group.size)
        if original == group.size:
            return filters_to_prune(scores, rate, self.rounding)
        target = filters_to_prune(torch.ones(original), rate, self.rounding)
        return min(max(target - (original - group.size), 0), group.size - 1)

    def _group_keep(self, group: PrunableGroup) -> torch.Tensor | None:
        return group_selection(group, self.masks)

    def enforce(self) -> None:
        if not self.masks:
            return
        zero_bn = self.mode == "hard" or self.finalized
        if self._zero_plan_source is not self.masks or self._zero_plan_bn != zero_bn:  # only when masks change
            selections = [(group, keep) for group in self.groups if (keep := self._group_keep(group)) is not None]
            self._zero_plan = [pair for group, keep in selections
                               for pair in pruned_channel_masks(group, self._all_modules, keep, zero_bn)]
            self._zero_plan_source, self._zero_plan_bn = self.masks, zero_bn
            if self.layernorm_statistics == "kept":
                set_layernorm_statistics(selections, self._all_modules)
        with torch.no_grad():
            for tensor, pruned in self._zero_plan:
                tensor.masked_fill_(pruned, 0)

    def after_step(self, trainer: pl.Trainer) -> None:
        if self.mode == "hard" or self.finalized:
            self.enforce()  # soft mode lets zeroed filters regrow between updates

    # -- logging and state ------------------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, float]:
        metrics = super().epoch_metrics()
        metrics["prune/progress"] = metrics.pop("prune/target")
        for name, alive in self.filters_alive().items():
            metrics[f"prune/filters_alive/{name}"] = float(alive)
        metrics["prune/revived_filters"] = float(self.revived_filters)
        self.revived_filters = 0
        if self.compact_at_schedule_end or self.compact_every_epoch:
            metrics["prune/compacted"] = float(self.compacted_at is not None or bool(self.events))
        return metrics
