"""What every distillation LightningModule shares: batch splitting, the optimizer, epoch logging, example inputs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULERS = ("cosine", "none")


class DistillationBase(pl.LightningModule):
    """Base of :class:`DistillationModule`, :class:`MutualLearningModule` and :class:`SelfDistillationModule`.

    Override points: :meth:`split_batch` (how a batch gives inputs and labels) and :meth:`trainable_modules`
    (what the optimizer trains).

    Args:
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (Nesterov momentum when ``momentum > 0``).
        lr: learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        lr_scheduler: ``"cosine"`` (annealed over ``trainer.max_epochs``) or ``"none"``.
        input_shape: shape of one input without the batch dimension (e.g. ``[1, 8, 8]``); lets the module build
            shape-dependent parts at construction. Without it they are built in ``setup`` from one training batch.

    Raises:
        ValueError: for an unknown optimizer or scheduler, or a non-positive learning rate.
    """

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_scheduler: str = "none",
        input_shape: list[int] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        if lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {lr_scheduler!r}.")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}.")
        if input_shape is not None and (not input_shape or any(int(d) < 1 for d in input_shape)):
            raise ValueError(f"input_shape must list positive sizes without the batch dimension, got {input_shape!r}.")
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.lr_scheduler_name = lr_scheduler
        self.input_shape = None if input_shape is None else [int(d) for d in input_shape]

    # ------------------------------------------------------------------ override points

    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """Return ``(inputs, targets)`` of a batch; override for other batch layouts."""
        inputs, targets = batch[0], batch[1]
        return inputs, targets

    def trainable_modules(self) -> Iterable[nn.Module]:
        """Modules whose parameters the optimizer trains (override point)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared machinery

    def configure_optimizers(self) -> Any:
        params = [p for module in self.trainable_modules() for p in module.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0,
                                        weight_decay=self.weight_decay)
        else:
            optimizer_class = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
            optimizer = optimizer_class(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_scheduler_name == "none":
            return optimizer
        epochs = max(1, int(self.trainer.max_epochs or 1))
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)}

    def log_epoch(self, name: str, value: torch.Tensor | float, batch_size: int) -> None:
        """Log ``value`` as an epoch mean (weighted by batch size, reduced across processes)."""
        self.log(name, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)

    @staticmethod
    def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=1) == targets).float().mean()

    def example_input(self) -> Any:
        """One example input: zeros of ``(2, *input_shape)``, ``example_input_array``, or one training batch."""
        if self.input_shape is not None:
            return torch.zeros(2, *self.input_shape)
        if self.example_input_array is not None:
            return self.example_input_array
        trainer = self._trainer
        if trainer is None:
            raise ValueError("input_shape is needed to build the module outside a Trainer.")
        datamodule = getattr(trainer, "datamodule", None)
        loader = datamodule.train_dataloader() if datamodule is not None else trainer.fit_loop._data_source.dataloader()
        inputs, _ = self.split_batch(next(iter(loader)))
        return inputs
