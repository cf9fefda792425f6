"""A LightningModule that trains any backbone as a classifier."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.utils.optim import (
    LRSchedulerChoice,
    OptimizerChoice,
    build_optimizers,
    check_optimizer_settings,
)


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of ``backbone`` with accuracy logged as ``train/acc``, ``val/acc`` and ``test/acc``.

    ``compression_target`` is the backbone, so compression callbacks resolve layer names inside the user's network
    (``stage1.0.conv1``, not ``backbone.stage1.0.conv1``).

    Args:
        backbone: any network mapping a batch of inputs to ``(B, num_classes)`` logits.
        num_classes: number of classes.
        optimizer: a callable (parameters -> optimizer, e.g. ``functools.partial(torch.optim.SGD, lr=0.05)``; in
            YAML a ``class_path`` block), or ``"adam"``, ``"adamw"`` or ``"sgd"`` (with Nesterov momentum).
        lr: learning rate of a named optimizer.
        weight_decay: weight decay of a named optimizer.
        momentum: momentum of a named SGD.
        lr_scheduler: a callable (optimizer -> scheduler, stepped every epoch), ``"cosine"`` (annealed to 0 over
            ``trainer.max_epochs``), ``"step"``, ``"none"`` or ``None``.
        step_size: epochs between decays for ``"step"``.
        gamma: decay factor for ``"step"``.

    Raises:
        ValueError: for an unknown optimizer or scheduler, a non-positive learning rate or class count.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerChoice = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_scheduler: LRSchedulerChoice | None = "cosine",
        step_size: int = 10,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        check_optimizer_settings(optimizer, lr, weight_decay, lr_scheduler, momentum)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes!r}.")
        self.optimizer_recipe, self.lr_scheduler_recipe = optimizer, lr_scheduler
        # a callable recipe is an attribute, not a hyperparameter (hparams.yaml holds plain values)
        recipe = {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
        self.save_hyperparameters(ignore=["backbone", *(name for name, value in recipe.items() if callable(value))])
        self.backbone = backbone
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @property
    def compression_target(self) -> nn.Module:
        return self.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def _shared_step(self, batch: Any, stage: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, targets)
        accuracy(logits, targets)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(inputs).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        hp = dict(self.hparams)
        return build_optimizers(self.parameters(), self.optimizer_recipe, hp["lr"], hp["weight_decay"], hp["momentum"],
                                self.lr_scheduler_recipe, self.trainer.max_epochs, hp["step_size"], hp["gamma"])
