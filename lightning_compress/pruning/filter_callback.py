"""FilterPruning: structured pruning of whole filters (output channels) scored by their Lp norm, soft or hard."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_compress.pruning.batchnorm import batchnorm_after, recalibrate_batchnorm, zero_batchnorm_channels
from lightning_compress.pruning.callback_base import PruningCallback
from lightning_compress.pruning.criteria import check_sparsity
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.pruning.structured import check_p, filter_mask, filter_norms, filters_to_prune
from lightning_compress.utils import first_tensor

MODES = ("soft", "hard")


class FilterPruning(PruningCallback):
    """Prune the filters (output channels) of lowest Lp norm in each chosen convolution or linear layer.

    ``mode="soft"`` is Soft Filter Pruning (He et al., IJCAI 2018): at every scheduled update (by default before
    training and after every epoch) the lowest-norm ``rate`` of each layer's filters are zeroed, weight and bias only,
    so they keep receiving gradients and may regrow; when training ends the final selection is made permanent:
    pruned channels' BatchNorm scale and shift are zeroed (eval-mode BN would otherwise turn a zero filter into the
    constant ``beta - gamma * mu / sigma``) and BatchNorm statistics are re-estimated on ``recalibration_batches``
    training batches. The four steps are select (norms), prune (zero), reconstruct (BN zeroing and re-estimation) and
    compact (:func:`lightning_compress.pruning.compact` builds the smaller dense model).

    ``mode="hard"``: a pruned filter stays pruned (masks only grow along the schedule); weight, bias and BatchNorm
    channel are zeroed after every optimizer step.

    Args:
        sparsity: fraction of filters pruned per layer, in [0, 1); or a mapping from layer name/regex to a rate
            (the first matching pattern wins; unmatched layers are not pruned).
        mode: ``"soft"`` or ``"hard"``.
        p: the norm scoring filters (1 or 2).
        schedule: progress towards the rates (default: full rate from the start, updated every epoch).
        recalibration_batches: training batches used to re-estimate BatchNorm statistics after the final prune
            (0 keeps the statistics).
        layers: names or regexes of layers to prune.
        types: layer types considered.
        exclude: names or regexes to skip.
        prune_classifier: also prune the last layer (its filters are the classes: rarely wanted).
        log_histograms: per-layer sparsity histogram in TensorBoard.

    Raises:
        ValueError: for a rate outside [0, 1), an unknown mode, ``p`` not in {1, 2}, a rate that would remove every
            filter of a layer (before the first training step), or a pattern matching nothing.
    """

    def __init__(
        self,
        sparsity: float | dict[str, float] = 0.4,
        mode: str = "soft",
        p: int = 2,
        schedule: Schedule | None = None,
        recalibration_batches: int = 20,
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
        check_p(p)
        if recalibration_batches < 0:
            raise ValueError(f"recalibration_batches must be >= 0, got {recalibration_batches!r}.")
        super().__init__(1.0 if isinstance(sparsity, dict) else sparsity, schedule, layers,
                         types or ["Conv1d", "Conv2d", "Linear"], exclude, prune_classifier, log_histograms)
        self.sparsity = sparsity  # type: ignore[assignment]
        self.rates = rates
        self.mode, self.p = mode, p
        self.recalibration_batches = recalibration_batches
        self.finalized = False
        self.revived_filters = 0
        self._batchnorms: dict[str, str] = {}

    # -- resolution -------------------------------------------------------------------------------------------
    def rate_of(self, name: str) -> float:
        """The target rate of layer ``name`` (first matching pattern of ``sparsity``)."""
        for pattern, rate in self.rates.items():
            if name == pattern or re.fullmatch(pattern, name):
                return rate
        return 0.0

    def _prepare(self, batch: Any, pl_module: pl.LightningModule) -> None:
        super()._prepare(batch, pl_module)
        self._batchnorms = batchnorm_after(self._target, first_tensor(batch).to(pl_module.device), self._modules)

    def validate_layers(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            # Raises, naming the rate, when it would remove every filter of the layer.
            try:
                filters_to_prune(torch.ones(module.weight.shape[0]), self.rate_of(name))
            except ValueError as err:
                raise ValueError(f"Layer {name!r}: {err}") from err

    def target_at(self, position: int) -> float:
        return self.schedule.progress(position)  # progress; each layer scales its own rate

    # -- masks ------------------------------------------------------------------------------------------------
    def compute_masks(self, modules: dict[str, nn.Module], progress: float, position: int) -> dict[str, torch.Tensor]:
        masks = {}
        for name, module in modules.items():
            keep = filter_mask(module.weight.detach(), self.rate_of(name) * progress, self.p)
            previous = self.masks.get(name)
            if previous is not None:
                if self.mode == "hard":
                    keep = self._grow_hard(module, previous.to(keep.device), self.rate_of(name) * progress)
                else:
                    self.revived_filters += int((keep.cpu() & ~previous).sum())
            masks[name] = keep
        return masks

    def _grow_hard(self, module: nn.Module, previous: torch.Tensor, rate: float) -> torch.Tensor:
        """Hard mode: keep every earlier pruned filter pruned; prune more of the survivors to reach ``rate``."""
        scores = filter_norms(module.weight.detach(), self.p).clone()
        scores[~previous] = -1.0  # already pruned filters rank lowest
        k = max(filters_to_prune(scores, rate), int((~previous).sum()))
        order = torch.sort(scores, stable=True).indices
        keep = torch.ones_like(previous)
        keep[order[:k]] = False
        return keep

    def enforce(self) -> None:
        with torch.no_grad():
            for name, keep in self.masks.items():
                module = self._modules[name]
                keep = keep.to(module.weight.device)
                module.weight.mul_(keep.view(-1, *([1] * (module.weight.dim() - 1))))
                if module.bias is not None:
                    module.bias.mul_(keep)
                if self.mode == "hard" or self.finalized:
                    self._zero_batchnorm(name, keep)

    def _zero_batchnorm(self, name: str, keep: torch.Tensor) -> None:
        bn_name = self._batchnorms.get(name)
        if bn_name is not None:
            zero_batchnorm_channels(self._target.get_submodule(bn_name), keep)

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
        self._update(trainer, self.schedule.end, force=True)
        self.finalized = True
        self.enforce()
        if self.recalibration_batches and self._batchnorms:
            recalibrate_batchnorm(self._target, self._training_inputs(trainer), trainer.lightning_module.device)
            self._average_batchnorm_statistics(trainer)
            self.enforce()

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
        loader = trainer.train_dataloader
        for index, batch in enumerate(loader):
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
        return {**super().state_dict(), "finalized": self.finalized, "revived_filters": self.revived_filters}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.finalized = state_dict.get("finalized", False)
        self.revived_filters = state_dict.get("revived_filters", 0)
