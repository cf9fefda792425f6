"""FilterPruning: structured pruning of whole filters (output channels) scored by their Lp norm, soft or hard."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_compress.pruning.batchnorm import batchnorm_after
from lightning_compress.pruning.callback_base import PruningCallback
from lightning_compress.pruning.criteria import check_sparsity, lowest_k_mask
from lightning_compress.pruning.filter_final import FinalPruneSteps
from lightning_compress.pruning.groups import (
    PrunableGroup,
    from_dependency_group,
    group_scores,
    pruned_channel_masks,
)
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.pruning.structured import check_p, filters_to_prune
from lightning_compress.utils import first_tensor

MODES = ("soft", "hard")
GRANULARITIES = ("filter", "channel")


class FilterPruning(FinalPruneSteps, PruningCallback):
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
        compact_every_epoch: hard mode only: after every epoch shrink the layers in place and slice the optimizer
            state to match, so training itself gets cheaper (single process; a resumed run replays the recorded
            compactions on the fresh model before loading the checkpoint).
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
        compact_every_epoch: bool = False,
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
        if compact_every_epoch and mode != "hard":
            raise ValueError(f"compact_every_epoch needs mode='hard' (soft-pruned filters may regrow), got {mode!r}.")
        if recalibration_batches < 0:
            raise ValueError(f"recalibration_batches must be >= 0, got {recalibration_batches!r}.")
        super().__init__(0.0, schedule, layers, types or ["Conv1d", "Conv2d", "Linear"], exclude, prune_classifier,
                         log_histograms)
        self.sparsity = sparsity  # type: ignore[assignment]
        self.rates = rates
        self.mode, self.p, self.granularity = mode, p, granularity
        self.recalibration_batches = recalibration_batches
        self.compact_on_fit_end = compact_on_fit_end
        self.compact_every_epoch = compact_every_epoch
        self.events: list[dict[str, list[int]]] = []
        self.original_sizes: dict[str, int] = {}
        self.compaction: dict[str, Any] = {}
        self.finalized = False
        self.revived_filters = 0
        self.groups: list[PrunableGroup] = []
        self._zero_plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._zero_plan_source: dict[str, torch.Tensor] | None = None
        self._zero_plan_bn = False
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
        if self.compacted:
            return
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.compact_every_epoch:
            if trainer.world_size > 1:
                raise ValueError("compact_every_epoch replaces parameters during training, which DDP cannot follow; "
                                 f"got world_size={trainer.world_size}. Use compact_on_fit_end under DDP.")
            self._replay_before_loading(pl_module)

    def _replay_before_loading(self, pl_module: pl.LightningModule) -> None:
        """Lightning calls the module's ``on_load_checkpoint`` right before its strict ``load_state_dict``: shrink
        the fresh network there, as the interrupted run did, so that the checkpoint's smaller tensors fit."""
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state and state.get("events"):
                self.replay_compactions(state["events"], state["example"])
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        self._patched_module: pl.LightningModule | None = pl_module

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        patched = getattr(self, "_patched_module", None)
        if patched is not None:
            del patched.on_load_checkpoint  # the class's own hook again
            self._patched_module = None
        super().on_fit_start(trainer, pl_module)

    def _prepare(self, batch: Any, pl_module: pl.LightningModule) -> None:
        super()._prepare(batch, pl_module)
        if not hasattr(self, "_example") or not self.events:
            self._example = first_tensor(batch)[:2].detach().clone()
        self._refresh_groups()
        if not self.groups:
            raise ValueError(f"FilterPruning found no group of filters it may prune; skipped: {self.skipped}.")
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
    def compute_masks(self, modules: dict[str, Any], progress: float, position: int) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        for group in self.groups:
            scores = group_scores(group, self._all_modules, self.p, self.granularity)
            k = self._to_prune(group, scores, self.group_rate(group) * progress)
            previous = self._group_keep(group)
            if previous is not None and self.mode == "hard":
                scores[~previous] = -1.0  # already pruned channels rank lowest and stay pruned
                k = max(k, int((~previous).sum()))
            keep = lowest_k_mask(scores, k)
            if previous is not None and self.mode == "soft":
                self.revived_filters += int((keep & ~previous).sum())
            masks.update(self._producer_masks(group, keep))
        return masks

    def _to_prune(self, group: PrunableGroup, scores: torch.Tensor, rate: float) -> int:
        """Channels to prune now; after in-place compactions the rate still refers to the original size."""
        original = self.original_sizes.get(group.name, group.size)
        if original == group.size:
            return filters_to_prune(scores, rate)
        target = filters_to_prune(torch.ones(original), rate)
        return min(max(target - (original - group.size), 0), group.size - 1)

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
        if self._zero_plan_source is not self.masks or self._zero_plan_bn != zero_bn:  # only when masks change
            self._zero_plan = [pair for group in self.groups if (keep := self._group_keep(group)) is not None
                               for pair in pruned_channel_masks(group, self._all_modules, keep, zero_bn)]
            self._zero_plan_source, self._zero_plan_bn = self.masks, zero_bn
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
        for name, keep in self.masks.items():
            metrics[f"prune/filters_alive/{name}"] = float(keep.sum())
        metrics["prune/revived_filters"] = float(self.revived_filters)
        self.revived_filters = 0
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "finalized": self.finalized, "revived_filters": self.revived_filters,
                 "events": self.events, "original_sizes": self.original_sizes}
        if self.events:
            state["example"] = self._example
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.finalized = state_dict.get("finalized", False)
        self.revived_filters = state_dict.get("revived_filters", 0)
        self.events = list(state_dict.get("events", []))
        self.original_sizes = dict(state_dict.get("original_sizes", {}))
        if "example" in state_dict:
            self._example = state_dict["example"]
