"""HeadPruning: structured pruning of attention heads and feed-forward neurons of transformers, soft or hard, with
real compaction (smaller Q/K/V/O and FFN layers, the head count updated)."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_compress.graph.heads import UnitGroup, find_unit_groups, mask_units, norm_scores, taylor_scores
from lightning_compress.graph.heads_compact import compact_units
from lightning_compress.graph.layers import check_layer_pattern
from lightning_compress.pruning.callback_base import PruningCallback
from lightning_compress.pruning.head_select import select_units
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.utils import compression_target, replace_compression_target

CRITERIA = ("l1", "l2", "taylor")


def _patterns(value: str | list[str] | None, what: str) -> list[str]:
    found = [] if value is None else [value] if isinstance(value, str) else list(value)
    for pattern in found:
        check_layer_pattern(pattern, what)
    return found


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or re.fullmatch(p, name) for p in patterns)


class HeadPruning(PruningCallback):
    """Prune attention heads and feed-forward (FFN) intermediate neurons of transformers, then remove them.

    Heads and FFN neurons are found by layout (:func:`~lightning_compress.graph.heads.find_unit_groups`: Hugging Face
    BERT/RoBERTa, ViT-style ``q_proj``..``o_proj``, GPT-2 ``Conv1D``, ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer``). Embeddings, LayerNorms, the pooler and the classifier are never touched. A
    pruned head has its Q/K/V rows and biases and its output-projection columns zeroed (a pruned neuron: its rows in
    the first FFN layer and its column in the second), which removes its contribution exactly; with
    ``compact_on_fit_end`` the layers are then sliced (:func:`~lightning_compress.graph.heads_compact.compact_units`).

    Importance: ``"l1"`` / ``"l2"``: the norm of the unit's weights; ``"taylor"``: Michel et al. (NeurIPS 2019)
    ``|dL/d xi|`` of a gate on the unit's output, accumulated over the training steps since the previous update
    (an update before any step keeps every unit). ``mode="soft"`` (He et al., IJCAI 2018) re-selects at every update
    and lets pruned units regrow; ``mode="hard"`` keeps pruned units pruned and re-zeroes them after every step.
    The masks are computed on rank zero and broadcast (identical under DDP); they, the schedule position and the
    Taylor accumulators are in the checkpoint state, and a resumed run goes on from them.

    Logged every epoch: ``prune/heads_alive``, ``prune/ffn_alive`` (fractions of the original units), ``prune/progress``
    and ``prune/sparsity/<group>``.

    Args:
        head_sparsity: fraction of heads pruned, in [0, 1); each layer keeps at least one head.
        ffn_sparsity: fraction of FFN intermediate neurons pruned, in [0, 1).
        criterion: ``"l1"``, ``"l2"`` or ``"taylor"``.
        scope: ``"layer"`` (the same fraction in every layer) or ``"global"`` (one ranking of all layers' units, each
            layer's scores divided by their L2 norm).
        mode: ``"soft"`` or ``"hard"``.
        schedule: progress towards the sparsities (default: all of it from the start, updated every epoch).
        compact_on_fit_end: at the end of ``fit`` remove the pruned units (smaller layers, same outputs); a later
            ``fit`` then leaves the network alone.
        layers: names or regexes of head / FFN groups to prune (group names: the attention module, the first FFN
            layer); default: all.
        exclude: names or regexes of groups or attention modules to leave alone; each must match one.
        log_histograms: per-group sparsity histogram in TensorBoard.

    Raises:
        ValueError: for a sparsity outside [0, 1), an unknown criterion, scope or mode, an invalid pattern; in
            ``setup``, before any training step: an attention module whose layout is not supported (name and reason;
            ``exclude`` it to go on), no group to prune, or a ``layers`` / ``exclude`` pattern that matches nothing.
    """

    def __init__(
        self,
        head_sparsity: float = 0.5,
        ffn_sparsity: float = 0.0,
        criterion: str = "l2",
        scope: str = "layer",
        mode: str = "soft",
        schedule: Schedule | None = None,
        compact_on_fit_end: bool = False,
        layers: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        log_histograms: bool = True,
    ) -> None:
        for name, value in (("head_sparsity", head_sparsity), ("ffn_sparsity", ffn_sparsity)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
        if head_sparsity == 0 and ffn_sparsity == 0:
            raise ValueError("HeadPruning needs head_sparsity > 0 or ffn_sparsity > 0, got both 0.")
        for option, choice, allowed in (("criterion", criterion, CRITERIA), ("scope", scope, ("layer", "global")),
                                        ("mode", mode, ("soft", "hard"))):
            if choice not in allowed:
                raise ValueError(f"{option} must be one of {allowed}, got {choice!r}.")
        super().__init__(0.0, schedule, layers, [], exclude, True, log_histograms)
        self.layer_patterns = _patterns(layers, "layers")
        self.exclude_patterns = _patterns(exclude, "exclude")
        self.head_sparsity, self.ffn_sparsity = float(head_sparsity), float(ffn_sparsity)
        self.criterion, self.scope, self.mode = criterion, scope, mode
        self.compact_on_fit_end = compact_on_fit_end
        self.groups: dict[str, UnitGroup] = {}
        self.importance: dict[str, torch.Tensor] = {}
        self.importance_steps = 0

    # -- resolution -------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._ready = False  # a later fit of the compacted network: nothing left to do
        if stage != "fit" or self.compacted:
            return
        self._target = compression_target(pl_module)
        self.groups = self.resolve_groups(self._target)

    def resolve_groups(self, model: torch.nn.Module) -> dict[str, UnitGroup]:
        """The groups this callback prunes in ``model`` (checked as described under ``Raises``)."""
        found, unsupported = find_unit_groups(model, heads=self.head_sparsity > 0, ffn=self.ffn_sparsity > 0)
        names = [g.name for g in found] + list(unsupported)
        for what, patterns in (("layers", self.layer_patterns), ("exclude", self.exclude_patterns)):
            for pattern in patterns:
                if not any(_matches(n, [pattern]) for n in names):
                    raise ValueError(f"HeadPruning: the {what} pattern {pattern!r} matches no head or FFN group of "
                                     f"{type(model).__name__}; groups: {names}.")
        blocking = {n: why for n, why in unsupported.items() if not _matches(n, self.exclude_patterns)}
        if blocking:
            raise ValueError(f"HeadPruning cannot prune these attention modules of {type(model).__name__}: "
                             f"{blocking}. Pass exclude={sorted(blocking)!r} to leave them unpruned.")
        groups = {g.name: g for g in found if not _matches(g.name, self.exclude_patterns)
                  and (not self.layer_patterns or _matches(g.name, self.layer_patterns))}
        if not groups:
            raise ValueError(f"HeadPruning found no head or FFN group to prune in {type(model).__name__} "
                             f"(layers={self.layer_patterns}, exclude={self.exclude_patterns}).")
        return groups

    def _prepare(self, batch: Any, pl_module: pl.LightningModule) -> None:
        self._ready = True

    def rate(self, group: UnitGroup) -> float:
        return self.head_sparsity if group.kind == "heads" else self.ffn_sparsity

    def target_at(self, position: int) -> float:
        return self.schedule.progress(position)  # progress; each kind scales its own rate

    # -- masks ------------------------------------------------------------------------------------------------
    def scores(self, group: UnitGroup) -> torch.Tensor:
        if self.criterion == "taylor":
            return self.importance.get(group.name, torch.zeros(group.units)).clone()
        return norm_scores(self._target, group, p=1 if self.criterion == "l1" else 2)

    def compute_masks(self, modules: dict[str, Any], progress: float, position: int) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        if self.criterion == "taylor" and self.importance_steps == 0:
            return {name: torch.ones(g.units, dtype=torch.bool) for name, g in self.groups.items()}
        for kind in ("heads", "ffn"):
            chosen = {n: g for n, g in self.groups.items() if g.kind == kind}
            if not chosen:
                continue
            rate = self.rate(next(iter(chosen.values()))) * progress
            previous = {n: self.masks[n] for n in chosen if n in self.masks} if self.mode == "hard" else None
            masks.update(select_units({n: self.scores(g) for n, g in chosen.items()}, rate, self.scope,
                                      previous=previous))
        self.importance = {}
        self.importance_steps = 0
        return masks

    def enforce(self) -> None:
        for name, keep in self.masks.items():
            mask_units(self._target, self.groups[name], keep)

    def after_step(self, trainer: pl.Trainer) -> None:
        if self.mode == "hard":
            self.enforce()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.criterion != "taylor" or self.compacted or not self.groups:
            return
        for name, group in self.groups.items():  # gradients are already averaged across DDP ranks here
            score = taylor_scores(self._target, group)
            self.importance[name] = self.importance.get(name, torch.zeros(group.units)) + score
        self.importance_steps += 1

    # -- the end of fit ---------------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.compact_on_fit_end or self.compacted or not self.masks:
            return
        self.enforce()
        target = compression_target(pl_module)
        compacted = compact_units(target, list(self.groups.values()), self.masks)
        if compacted is not target:
            replace_compression_target(pl_module, compacted)
        self.compacted = True

    # -- logging and state ------------------------------------------------------------------------------------
    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - float(self.masks[n].float().mean()) if n in self.masks else 0.0 for n in self.groups}

    def alive(self, kind: str) -> float:
        total = kept = 0
        for name, group in self.groups.items():
            if group.kind == kind:
                total += group.units
                kept += int(self.masks[name].sum()) if name in self.masks else group.units
        return kept / max(total, 1)

    def global_sparsity(self) -> float:
        total = sum(g.units for g in self.groups.values())
        sparsity = self.layer_sparsity()
        return sum(g.units * sparsity[n] for n, g in self.groups.items()) / max(total, 1)

    def epoch_metrics(self) -> dict[str, float]:
        metrics = super().epoch_metrics()
        metrics["prune/progress"] = metrics.pop("prune/target")
        metrics["prune/heads_alive"] = self.alive("heads")
        metrics["prune/ffn_alive"] = self.alive("ffn")
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["importance"] = {k: v.clone() for k, v in self.importance.items()}
        state["importance_steps"] = self.importance_steps
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.importance = {k: v.clone() for k, v in state_dict.get("importance", {}).items()}
        self.importance_steps = int(state_dict.get("importance_steps", 0))

    def _apply_restored(self, state: dict[str, Any]) -> None:
        if self.compacted:
            return
        for name, keep in self.masks.items():
            group = self.groups.get(name)
            if group is None or group.units != keep.numel():
                raise ValueError(f"HeadPruning: the checkpoint masks group {name!r} ({keep.numel()} units), which "
                                 f"this model lacks or sizes differently; groups: "
                                 f"{ {n: g.units for n, g in self.groups.items()} }.")
        if self.masks:
            self.enforce()
        if self.masks and not any(bool((~m).any()) for m in self.masks.values()):
            rank_zero_warn("HeadPruning resumed with masks that prune nothing.")
