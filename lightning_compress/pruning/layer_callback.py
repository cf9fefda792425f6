"""LayerPruning: structured pruning at layer granularity, removing whole residual blocks."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_compress.graph.blocks import block_scores, removable_blocks, remove_blocks, zero_block
from lightning_compress.pruning.callback_base import PruningCallback
from lightning_compress.pruning.criteria import check_sparsity, lowest_k_mask, num_pruned
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.pruning.structured import check_p, filters_to_prune
from lightning_compress.utils import compression_target, first_tensor, replace_compression_target

MODES = ("soft", "hard")


class LayerPruning(PruningCallback):
    """Remove the residual blocks of smallest weight norm: the layer granularity of structured pruning.

    Candidates are the innermost submodules that turn into the identity when all their parameters are zero (a
    block ``relu(x + branch(x))`` whose input comes out of a ReLU), verified on the first training batch; a
    pruned block has all its parameters zeroed, so the masked model computes exactly what the model without the
    block computes, and ``compact_on_fit_end`` replaces it by ``nn.Identity``. Blocks are ranked by the root mean
    ``|w|^p`` of their parameters. A separate class from :class:`FilterPruning` because its unit is a block, not a
    channel; run both for channel and depth pruning together.

    Args:
        sparsity: fraction of the removable blocks to remove, in [0, 1).
        mode: ``"soft"`` (zeroed blocks keep training and may come back until the end) or ``"hard"``.
        p: norm of the block scores (1 or 2).
        schedule: progress towards ``sparsity``.
        layers: names or regexes of candidate blocks (default: every removable block).
        exclude: names or regexes of blocks to keep.
        compact_on_fit_end: replace the removed blocks by ``nn.Identity`` when ``fit`` ends (in a copy of the
            compression target; without one, in the LightningModule itself).
        log_histograms: unused here (kept for a uniform interface).

    Raises:
        ValueError: for a sparsity outside [0, 1), an unknown mode, ``p`` not in {1, 2}; before the first training
            step, for a model without a removable block, a rate that would remove every block, or a checkpoint
            with masks for blocks the model lacks.
    """

    def __init__(
        self,
        sparsity: float = 0.25,
        mode: str = "hard",
        p: int = 2,
        schedule: Schedule | None = None,
        layers: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        compact_on_fit_end: bool = False,
        log_histograms: bool = False,
    ) -> None:
        check_sparsity(sparsity)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        check_p(p)
        super().__init__(sparsity, schedule, layers, [], exclude, True, log_histograms)
        self.mode, self.p, self.compact_on_fit_end = mode, p, compact_on_fit_end

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.compacted:
            self._target, self._ready = compression_target(pl_module), False

    def _prepare(self, batch: Any, pl_module: pl.LightningModule) -> None:
        blocks = removable_blocks(self._target, first_tensor(batch).to(pl_module.device), self.layers)
        excluded = [self.exclude] if isinstance(self.exclude, str) else list(self.exclude or [])
        blocks = [b for b in blocks if not _matches_any(b, excluded)]
        if not blocks:
            raise ValueError(f"LayerPruning found no removable block in {type(self._target).__name__} "
                             f"(layers={self.layers!r}, exclude={self.exclude!r}): a block must turn into the "
                             "identity when its parameters are zero, as a residual block with an identity shortcut.")
        _check_block_rate(self.sparsity, blocks)
        if self.masks and set(self.masks) != set(blocks):  # restored: checked here, the blocks are known only now
            raise ValueError(f"The checkpoint has masks for the blocks {sorted(self.masks)}, but this model's "
                             f"removable blocks are {blocks}.")
        self._modules = {name: self._target.get_submodule(name) for name in blocks}
        self._ready = True

    def _apply_restored(self, state: dict[str, Any]) -> None:
        """The blocks are found on the first training batch: restored masks are checked in :meth:`_prepare`."""

    def compute_masks(self, modules: dict[str, Any], sparsity: float, position: int) -> dict[str, torch.Tensor]:
        names = list(modules)
        scores = block_scores(self._target, names, self.p)
        k = filters_to_prune(scores, sparsity)
        if self.mode == "hard" and self.masks:
            previous = torch.tensor([bool(self.masks[n]) for n in names])
            scores[~previous] = -1.0
            k = max(k, int((~previous).sum()))
        keep = lowest_k_mask(scores, k)
        return {name: keep[i : i + 1] for i, name in enumerate(names)}

    def enforce(self) -> None:
        for name, keep in self.masks.items():
            if not bool(keep):
                zero_block(self._modules[name])

    def after_step(self, trainer: pl.Trainer) -> None:
        if self.mode == "hard":
            self.enforce()

    def removed(self) -> list[str]:
        """Names of the blocks pruned now."""
        return [name for name, keep in self.masks.items() if not bool(keep)]

    def epoch_metrics(self) -> dict[str, float]:
        metrics = {"prune/target": self.current_sparsity, "prune/blocks_alive": float(len(self.masks) -
                                                                                        len(self.removed()))}
        metrics["prune/sparsity"] = len(self.removed()) / max(len(self.masks), 1)
        metrics.update({f"prune/block_removed/{name}": float(not bool(k)) for name, k in self.masks.items()})
        return metrics

    def log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in self.epoch_metrics().items():
            pl_module.log(key, value, on_step=False, on_epoch=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compact_on_fit_end and self._ready and not self.compacted:
            self.enforce()
            if self._target is pl_module:  # no compression_target: the LightningModule itself, in place
                remove_blocks(pl_module, self.removed(), inplace=True)
            else:
                replace_compression_target(pl_module, remove_blocks(self._target, self.removed()))
            self.compacted, self._ready = True, False


def _check_block_rate(sparsity: float, blocks: list[str]) -> None:
    """Refuse a rate that would remove every removable block."""
    k = num_pruned(sparsity, len(blocks))
    if k >= len(blocks):
        raise ValueError(
            f"LayerPruning(sparsity={sparsity!r}) would remove every removable block (round({sparsity!r} * "
            f"{len(blocks)}) = {k} of {len(blocks)}: {blocks}); allowed: sparsity < "
            f"{(len(blocks) - 0.5) / len(blocks):.4g} for this model.")


def _matches_any(name: str, patterns: list[str]) -> bool:
    return any(name == p or re.fullmatch(p, name) for p in patterns)
