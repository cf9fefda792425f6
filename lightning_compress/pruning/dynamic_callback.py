"""DynamicChannelPruning: Feature Boosting and Suppression (Gao et al., ICLR 2019) inside the Lightning Trainer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_compress.graph.layers import select_layers
from lightning_compress.pruning.dynamic import GATE_POSITIONS, GATES_ATTRIBUTE, FeatureBoostingGates
from lightning_compress.utils import compression_target, first_tensor

GATED_TYPES = ("Conv1d", "Conv2d")


def _gateable(module: nn.Module) -> bool:
    return getattr(module, "groups", 1) == 1 and getattr(module, "padding_mode", "zeros") == "zeros"


class DynamicChannelPruning(Callback):
    """Train per-sample channel gates (Feature Boosting and Suppression, Gao et al., ICLR 2019) in chosen layers.

    In ``setup`` (before the optimizers exist, so the predictors are trained, and before a checkpoint is loaded,
    so a run resumes) a :class:`~lightning_compress.pruning.dynamic.FeatureBoostingGates` is attached to the
    compression target: its predictors are extra parameters under ``dynamic_gates.``; every user key stays. Each
    gated convolution keeps the ``ceil(keep_ratio * C)`` channels of highest predicted saliency per sample,
    multiplied by their saliency, after the BatchNorm that follows it and normalises nothing else
    (``gate_after="batchnorm"``, found by tracing the first forward) or on the convolution output (``"conv"``).

    The sparsity regulariser ``regularization * sum_l ||g_l(x)||_1`` enters the loss by wrapping the
    LightningModule's ``training_step`` for the duration of ``fit`` (restored in ``teardown``): the returned loss
    (a tensor, or the ``"loss"`` of a dictionary) gets the term added, so gradient accumulation, AMP scaling and
    clipping treat it like the user's own loss. Manual optimisation is refused (add
    ``gates.regularization_loss()`` yourself there).

    The gates stay after ``fit`` (they are the trained dynamic model): ``callback.gates.sparse(True)`` runs the
    gated layers sparsely at inference, with the same outputs (a layer whose convolution output something besides
    its BatchNorm reads runs densely: ``callback.gates.dense_layers``); :meth:`remove` strips them.

    Logged every epoch: ``dynamic/keep_ratio`` (fraction of non-zero gates), ``dynamic/saliency_l1``,
    ``dynamic/executed_macs`` (multiply-adds per input of sparse execution, counted) and
    ``dynamic/sparsity/<layer>``.

    Args:
        keep_ratio: fraction of each gated layer's output channels kept per sample, in (0, 1].
        layers: names or regexes of the convolutions to gate (inside the compression target); default: every
            ungrouped, zero-padded ``Conv1d``/``Conv2d``.
        exclude: names or regexes to leave alone.
        regularization: weight of the L1 penalty on the saliencies (the paper's lambda), >= 0.
        gate_after: ``"batchnorm"`` or ``"conv"``: which output the gate multiplies.

    Raises:
        ValueError: for a value outside its range, or (in ``setup``) a pattern matching nothing, a named layer that
            cannot be gated, or manual optimisation with a non-zero regularisation.
    """

    def __init__(self, keep_ratio: float = 0.5, layers: str | list[str] | None = None,
                 exclude: str | list[str] | None = None, regularization: float = 1e-8,
                 gate_after: str = "batchnorm") -> None:
        if not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio!r}.")
        if not isinstance(regularization, (int, float)) or regularization < 0:
            raise ValueError(f"regularization must be a number >= 0, got {regularization!r}.")
        if gate_after not in GATE_POSITIONS:
            raise ValueError(f"gate_after must be one of {GATE_POSITIONS}, got {gate_after!r}.")
        self.keep_ratio = float(keep_ratio)
        self.layers = layers
        self.exclude = exclude
        self.regularization = float(regularization)
        self.gate_after = gate_after
        self.gates: FeatureBoostingGates | None = None
        self._wrapped: pl.LightningModule | None = None
        self._example: torch.Tensor | None = None

    # -- installation -----------------------------------------------------------------------------------------
    def _resolve(self, target: nn.Module) -> dict[str, nn.Module]:
        selected = select_layers(target, self.layers, types=GATED_TYPES, exclude=self.exclude)
        if self.layers is not None:
            bad = [name for name, module in selected.items() if not _gateable(module)]
            if bad:
                raise ValueError(f"DynamicChannelPruning cannot gate {bad}: grouped or non-zero-padded "
                                 "convolutions are not supported; exclude them.")
        selected = {name: module for name, module in selected.items() if _gateable(module)}
        if not selected:
            raise ValueError(f"DynamicChannelPruning found nothing to gate in {type(target).__name__}: no ungrouped "
                             f"{list(GATED_TYPES)} matches layers={self.layers!r} after exclude={self.exclude!r}.")
        return selected

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = compression_target(pl_module)
        existing = getattr(target, GATES_ATTRIBUTE, None)
        if isinstance(existing, FeatureBoostingGates):
            if existing.keep_ratio != self.keep_ratio:
                raise ValueError(f"{type(target).__name__} already carries FBS gates with keep_ratio="
                                 f"{existing.keep_ratio!r}, not {self.keep_ratio!r}; remove them first.")
            self.gates = existing  # a second fit, or validate/test after fit: keep the trained gates
        elif stage == "fit":
            if existing is not None:
                raise ValueError(f"{type(target).__name__} already has an attribute {GATES_ATTRIBUTE!r}.")
            self.gates = FeatureBoostingGates(self._resolve(target), self.keep_ratio, self.gate_after).attach(target)
        if stage == "fit" and self.gates is not None:
            if self.regularization > 0 and not pl_module.automatic_optimization:
                raise ValueError("DynamicChannelPruning adds its regulariser to the loss of training_step, which "
                                 "needs automatic optimisation; set regularization=0 and add "
                                 "gates.regularization_loss() to your loss.")
            self._wrap_training_step(pl_module)

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        gates, weight = self.gates, self.regularization
        assert gates is not None
        original = pl_module.training_step
        gates.collect_regularizer = weight > 0

        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            term = gates.regularization_loss()
            if term is None or weight == 0:
                return output
            if isinstance(output, torch.Tensor):
                return output + weight * term
            if isinstance(output, Mapping) and "loss" in output:
                return {**output, "loss": output["loss"] + weight * term}
            return output

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None
        if self.gates is not None:
            self.gates.collect_regularizer = False
            self.gates.regularization_loss()

    def remove(self) -> None:
        """Strip the gates from the model (its state_dict then holds only the user's keys)."""
        if self.gates is not None:
            self.gates.remove()
            self.gates = None

    # -- hooks ------------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gates is not None:
            self.gates.reset_statistics()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._example is None:
            self._example = first_tensor(batch).detach()[:8].clone()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gates is None:
            return
        metrics = {f"dynamic/{key}": value for key, value in self.gates.statistics().items()}
        if self._example is not None:
            metrics["dynamic/executed_macs"] = float(self.gates.executed_macs(self._example.to(pl_module.device)))
        for key, value in metrics.items():
            pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=False)
