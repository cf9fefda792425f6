"""What every distillation LightningModule shares: batch splitting, the optimizer, epoch logging, example inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress.utils.data import batch_labels, first_training_batch
from lightning_compress.utils.optim import (
    LRSchedulerChoice,
    OptimizerChoice,
    build_optimizers,
    check_optimizer_settings,
)
from lightning_compress.utils.outputs import LABEL_KEYS, logits_of, model_inputs, run_model


class DistillationBase(pl.LightningModule):
    """Base of :class:`DistillationModule`, :class:`MutualLearningModule` and :class:`SelfDistillationModule`.

    Override points: :meth:`split_batch` (how a batch gives inputs and labels) and :meth:`trainable_modules`
    (what the optimizer trains).

    The training recipe: pass your own as LightningCLI does, ``optimizer`` a callable from parameters to an
    optimizer (``functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)``; in YAML ``optimizer: {class_path:
    torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9}}``) and ``lr_scheduler`` one from the optimizer to a
    scheduler (stepped every epoch; ``ReduceLROnPlateau`` watches ``val/loss``), the same blocks your own
    LightningCLI module takes; or the short names below with ``lr``, ``weight_decay`` and ``momentum``
    (:mod:`lightning_compress.utils.optim`). The student alone is only a fair reference under the same recipe.

    Args:
        optimizer: a callable (parameters -> optimizer), or ``"adam"``, ``"adamw"`` or ``"sgd"`` (Nesterov momentum
            when ``momentum > 0``).
        lr: learning rate of a named optimizer.
        weight_decay: weight decay of a named optimizer.
        momentum: SGD momentum of a named optimizer.
        lr_scheduler: a callable (optimizer -> scheduler), ``"cosine"`` (annealed over ``trainer.max_epochs``),
            ``"step"`` (x0.1 every 10 epochs), ``"none"`` or ``None``.
        input_shape: shape of one input without the batch dimension (e.g. ``[1, 8, 8]``); lets the module build
            shape-dependent parts at construction. Without it they are built in ``setup`` from one training batch.

    Raises:
        ValueError: for an unknown optimizer or scheduler, or a non-positive learning rate.
    """

    def __init__(
        self,
        optimizer: OptimizerChoice = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_scheduler: LRSchedulerChoice | None = "none",
        input_shape: list[int] | None = None,
    ) -> None:
        super().__init__()
        check_optimizer_settings(optimizer, lr, weight_decay, lr_scheduler, momentum)
        if input_shape is not None and (not input_shape or any(int(d) < 1 for d in input_shape)):
            raise ValueError(f"input_shape must list positive sizes without the batch dimension, got {input_shape!r}.")
        self.optimizer_recipe = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.lr_scheduler_recipe = lr_scheduler
        self.input_shape = None if input_shape is None else [int(d) for d in input_shape]

    # ------------------------------------------------------------------ override points

    #: How the logits are found in a network's output (:func:`~lightning_compress.utils.outputs.logits_of`): ``None``
    #: for the documented rule (a tensor, the ``logits`` entry of a ``ModelOutput`` or dictionary, else the first
    #: tensor), or an attribute or key name.
    logits_key: str | None = None

    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """Return ``(inputs, targets)`` of a batch: a list or tuple ``(inputs, targets, ...)``, or a dictionary
        (e.g. a tokenized Hugging Face batch) whose labels sit under one of
        :data:`~lightning_compress.utils.outputs.LABEL_KEYS` and whose other entries are the inputs, given to the
        networks as keyword arguments (:func:`~lightning_compress.utils.outputs.run_model`). Override for other
        layouts."""
        if isinstance(batch, Mapping):
            targets = batch_labels(batch)
            if targets is not None:
                return model_inputs(batch), targets
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            layout = f"a dict with keys {list(batch)} and none of the label keys {list(LABEL_KEYS)}" if isinstance(
                batch, Mapping) else (
                f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""))
            raise TypeError(
                f"{type(self).__name__} expects batches (inputs, targets, ...) or dicts with labels, got {layout}; "
                "override split_batch(batch) to return (inputs, targets) for this layout."
            )
        return batch[0], batch[1]

    def logits(self, network: nn.Module, inputs: Any, **options: Any) -> torch.Tensor:
        """``network``'s logits on ``inputs`` (:func:`~lightning_compress.utils.outputs.run_model` and
        :func:`~lightning_compress.utils.outputs.logits_of` with :attr:`logits_key`)."""
        return logits_of(run_model(network, inputs, **options), self.logits_key)

    def trainable_modules(self) -> Iterable[nn.Module]:
        """Modules whose parameters the optimizer trains (override point)."""
        raise NotImplementedError

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The predicted class of each input (``forward``'s logits at ``T = 1``): a batch may be ``(inputs, ...)``
        as in training or the inputs alone."""
        return logits_of(self(model_inputs(batch)), self.logits_key).argmax(dim=1)

    # ------------------------------------------------------------------ shared machinery

    def recipe_callables(self) -> list[str]:
        """The recipe arguments given as callables: left out of ``save_hyperparameters`` (hparams keep plain
        values; a resumed run rebuilds the module from its config)."""
        return [name for name, value in (("optimizer", self.optimizer_recipe),
                                         ("lr_scheduler", self.lr_scheduler_recipe)) if callable(value)]

    def configure_optimizers(self) -> Any:
        params = [p for module in self.trainable_modules() for p in module.parameters()]
        return build_optimizers(params, self.optimizer_recipe, self.lr, self.weight_decay, self.momentum,
                                self.lr_scheduler_recipe, self.trainer.max_epochs)

    def log_epoch(self, name: str, value: torch.Tensor | float, batch_size: int) -> None:
        """Log ``value`` as an epoch mean (weighted by batch size, reduced across processes)."""
        self.log(name, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)

    def frozen_networks(self) -> Iterable[nn.Module]:
        """Networks that only teach (teachers, an old model): kept in eval mode whatever ``train()`` is asked
        (override point; none here)."""
        return ()

    def train(self, mode: bool = True) -> DistillationBase:
        """Set the trained networks' mode; :meth:`frozen_networks` stay in eval mode (BatchNorm statistics would
        otherwise drift, e.g. when Lightning switches back from validation)."""
        super().train(mode)
        for network in self.frozen_networks():
            network.eval()
        return self

    def on_train_epoch_start(self) -> None:
        for network in self.frozen_networks():
            network.eval()

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
        inputs, _ = self.split_batch(first_training_batch(trainer))
        return inputs
