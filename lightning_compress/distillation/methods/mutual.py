"""Online distillation: Deep Mutual Learning of several peers trained together (Zhang et al. 2018)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_compress.distillation import losses
from lightning_compress.distillation.base import DistillationBase
from lightning_compress.distillation.checks import check_temperature
from lightning_compress.distillation.taps import eval_mode
from lightning_compress.utils.optim import LRSchedulerChoice, OptimizerChoice


class MutualLearningModule(DistillationBase):
    """Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu 2018): ``K >= 2`` peers, each trained with
    cross-entropy plus the mean KL to the other peers' (detached) predictions, see
    :func:`~.losses.mutual_learning_loss`.

    A separate class rather than a :class:`DistillationModule` option: there is no frozen teacher, and every peer
    trains. The peers are updated together by one optimizer on the sum of their losses (each loss reaches only its
    own peer, so this equals simultaneous per-peer steps; the paper alternates them).

    Logged every epoch: ``distill/peer<k>`` (peer ``k``'s loss), ``distill/total``, ``train/acc/peer<k>``,
    ``val/acc/peer<k>``, ``val/acc`` and ``val/loss`` (peer 0, which also answers ``forward``) and
    ``distill/agreement`` (fraction of validation samples on which every peer predicts the same class).
    ``compression_target`` is the ``ModuleList`` of peers.

    Args:
        peers: two or more distinct networks with the same number of classes.
        temperature: softmax temperature of the KL terms (paper: 1).
        optimizer: see :class:`~.base.DistillationBase`.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        lr_scheduler: see :class:`~lightning_compress.distillation.base.DistillationBase`.
        input_shape: input shape without batch, to check class counts at construction.

    Raises:
        ValueError: for fewer than 2 peers, one object given twice, ``temperature <= 0``, or peers with different
            numbers of classes (at construction with ``input_shape``, else in ``setup``).

    >>> module = MutualLearningModule([nn.Linear(4, 3), nn.Linear(4, 3)], input_shape=[4])
    >>> len(module.compression_target)
    2
    """

    def __init__(
        self,
        peers: list[nn.Module],
        temperature: float = 1.0,
        optimizer: OptimizerChoice = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_scheduler: LRSchedulerChoice | None = "none",
        input_shape: list[int] | None = None,
    ) -> None:
        super().__init__(optimizer, lr, weight_decay, momentum, lr_scheduler, input_shape)
        self.save_hyperparameters(ignore=["peers", *self.recipe_callables()])
        peers = list(peers)
        if len(peers) < 2:
            raise ValueError(f"Mutual learning needs at least 2 peers, got {len(peers)}.")
        if len({id(peer) for peer in peers}) != len(peers):
            raise ValueError("The same network object is given twice as a peer; give distinct networks.")
        check_temperature(temperature)
        self.temperature = temperature
        self.peers = nn.ModuleList(peers)
        self._checked = False
        if self.input_shape is not None:
            self._check_classes(self.example_input())

    def _check_classes(self, example_input: Any) -> None:
        with eval_mode(self.peers), torch.no_grad():
            shapes = [tuple(self.logits(peer, example_input).shape[1:]) for peer in self.peers]
        if len(set(shapes)) != 1:
            raise ValueError(f"Peers must predict the same number of classes, got output shapes {shapes}.")
        self._checked = True

    @property
    def compression_target(self) -> nn.Module:
        return self.peers

    def forward(self, x: Any) -> torch.Tensor:
        return self.logits(self.peers[0], x)

    @override
    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.peers]

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._checked:
            self._check_classes(self.example_input())

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = self.split_batch(batch)
        logits = [self.logits(peer, inputs) for peer in self.peers]
        peer_losses = losses.mutual_learning_loss(logits, targets, self.temperature)
        total = peer_losses.sum()
        batch_size = len(targets)
        for k, (loss, peer_logits) in enumerate(zip(peer_losses, logits, strict=True)):
            self.log_epoch(f"distill/peer{k}", loss.detach(), batch_size)
            self.log_epoch(f"train/acc/peer{k}", self.accuracy(peer_logits.detach(), targets), batch_size)
        self.log_epoch("distill/total", total.detach(), batch_size)
        return total

    def _evaluate(self, batch: Any, stage: str) -> None:
        inputs, targets = self.split_batch(batch)
        logits = [self.logits(peer, inputs) for peer in self.peers]
        batch_size = len(targets)
        for k, peer_logits in enumerate(logits):
            self.log_epoch(f"{stage}/acc/peer{k}", self.accuracy(peer_logits, targets), batch_size)
        self.log_epoch(f"{stage}/acc", self.accuracy(logits[0], targets), batch_size)
        self.log_epoch(f"{stage}/loss", losses.hard_target_loss(logits[0], targets), batch_size)
        predictions = torch.stack([peer_logits.argmax(1) for peer_logits in logits])
        agreement = (predictions == predictions[0]).all(dim=0).float().mean()
        self.log_epoch("distill/agreement" if stage == "val" else f"{stage}/agreement", agreement, batch_size)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")
