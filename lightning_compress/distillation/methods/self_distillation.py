"""Self-distillation: exit heads at named stages of one network, taught by its deepest output (Zhang et al. 2019)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_compress.distillation import losses
from lightning_compress.distillation.base import DistillationBase
from lightning_compress.distillation.checks import check_nonnegative, check_temperature
from lightning_compress.distillation.taps import FeatureTaps, check_layer_names, eval_mode
from lightning_compress.utils.optim import LRSchedulerChoice, OptimizerChoice

_HEAD_PREFIX = "heads."


class ExitHead(nn.Module):
    """A shallow classifier on an intermediate map: an optional bottleneck (1x1 convolution or linear, BN, ReLU)
    to ``feature_channels``, global average pooling, and a linear classifier.

    ``forward`` returns ``(logits, pooled_features)``.

    >>> logits, features = ExitHead(4, 8, 10)(torch.zeros(2, 4, 6, 6))
    >>> tuple(logits.shape), tuple(features.shape)
    ((2, 10), (2, 8))
    """

    def __init__(self, in_channels: int, feature_channels: int, num_classes: int, rank: int = 4) -> None:
        super().__init__()
        self.proj: nn.Module = nn.Identity()
        if in_channels != feature_channels:
            if rank == 2:
                layer: nn.Module = nn.Linear(in_channels, feature_channels, bias=False)
                norm: nn.Module = nn.BatchNorm1d(feature_channels)
            elif rank in (3, 4, 5):
                layer = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 3](in_channels, feature_channels, 1, bias=False)
                norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[rank - 3](feature_channels)
            else:
                raise ValueError(f"rank must be 2, 3, 4 or 5, got {rank!r}.")
            self.proj = nn.Sequential(layer, norm, nn.ReLU())
        self.fc = nn.Linear(feature_channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = _pool(self.proj(x))
        return self.fc(features), features


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


class SelfDistillationModule(DistillationBase):
    """Be Your Own Teacher (Zhang et al. 2019): exit heads attached at ``exit_layers`` of ``backbone`` (forward
    hooks), the backbone's own output being the deepest exit that teaches them, see
    :func:`~.losses.be_your_own_teacher_loss` (``alpha = 0.1``, ``T = 3``, ``lambda = 1e-6`` by default).

    A separate class rather than a :class:`DistillationModule` option: the teacher is the trained network itself.
    With ``feature_layer`` (e.g. the last stage) each head's bottleneck maps its stage to that layer's channel
    count and the feature term pulls the pooled head features towards the pooled ``feature_layer`` output; without
    it the heads pool their stage directly and the feature term is off.

    Logged every epoch: ``distill/hard``, ``distill/soft``, ``distill/feature`` (unweighted sums over exits, see
    :func:`~.losses.be_your_own_teacher_terms`), ``distill/total``, ``train/acc``, ``val/acc`` and ``val/loss``
    (the backbone's output) and ``val/acc/<layer>`` per exit head. ``compression_target`` is the backbone without
    the heads; ``forward`` is the backbone.

    Args:
        backbone: the network (its output is the deepest exit).
        exit_layers: qualified names of the stages that get an exit head, shallow to deep.
        feature_layer: layer whose pooled output is the deepest feature, or ``None``.
        alpha: weight of the KL term in ``[0, 1]``.
        temperature: softmax temperature ``> 0``.
        feature_weight: ``lambda >= 0``.
        optimizer: see :class:`~.base.DistillationBase`.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        lr_scheduler: see :class:`~lightning_compress.distillation.base.DistillationBase`.
        input_shape: input shape without batch; with it the heads are built at construction (needed to load a
            checkpoint outside a Trainer), else in ``setup`` from one training batch.

    Raises:
        ValueError: for no exit layers, unknown layer names, or the arguments of the loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        exit_layers: list[str],
        feature_layer: str | None = None,
        alpha: float = 0.1,
        temperature: float = 3.0,
        feature_weight: float = 1e-6,
        optimizer: OptimizerChoice = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_scheduler: LRSchedulerChoice | None = "none",
        input_shape: list[int] | None = None,
    ) -> None:
        super().__init__(optimizer, lr, weight_decay, momentum, lr_scheduler, input_shape)
        self.save_hyperparameters(ignore=["backbone", *self.recipe_callables()])
        if not exit_layers:
            raise ValueError(f"exit_layers must name at least one stage of the backbone, got {exit_layers!r}.")
        check_layer_names(backbone, list(exit_layers) + ([feature_layer] if feature_layer else []), "backbone")
        check_temperature(temperature)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}.")
        check_nonnegative(feature_weight, "feature_weight")
        self.exit_layers = list(exit_layers)
        self.feature_layer = feature_layer
        self.alpha, self.temperature, self.feature_weight = alpha, temperature, feature_weight
        self.backbone = backbone
        self.heads = nn.ModuleList()
        self._taps: FeatureTaps | None = None
        if self.input_shape is not None:
            self._build_heads(self.example_input())

    @property
    def tapped_layers(self) -> list[str]:
        return self.exit_layers + ([self.feature_layer] if self.feature_layer else [])

    def _build_heads(self, example_input: Any) -> None:
        with FeatureTaps(self.backbone, self.tapped_layers) as taps, eval_mode(self.backbone), torch.no_grad():
            num_classes = self.logits(self.backbone, example_input).shape[1]
            outputs = {name: taps[name] for name in self.tapped_layers}
        feature_channels = outputs[self.feature_layer].shape[1] if self.feature_layer else None
        for name in self.exit_layers:
            stage = outputs[name]
            self.heads.append(ExitHead(stage.shape[1], feature_channels or stage.shape[1], num_classes, stage.dim()))

    @property
    def compression_target(self) -> nn.Module:
        return self.backbone

    def forward(self, x: Any) -> torch.Tensor:
        return self.logits(self.backbone, x)

    @override
    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.backbone, self.heads]

    @override
    def setup(self, stage: str) -> None:
        if len(self.heads) == 0:
            self._build_heads(self.example_input())
        if self._taps is None:
            self._taps = FeatureTaps(self.backbone, self.tapped_layers)

    @override
    def teardown(self, stage: str) -> None:
        if self._taps is not None:
            self._taps.remove()
        self._taps = None

    def exits(self, inputs: Any) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Logits of every exit (deepest last) and, with ``feature_layer``, their features."""
        assert self._taps is not None, "call setup() first"
        final = self.logits(self.backbone, inputs)
        outputs = [head(self._taps[name]) for head, name in zip(self.heads, self.exit_layers, strict=True)]
        features = None
        if self.feature_layer is not None:
            features = [feature for _, feature in outputs] + [_pool(self._taps[self.feature_layer])]
        self._taps.clear()
        return [logits for logits, _ in outputs] + [final], features

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = self.split_batch(batch)
        logits, features = self.exits(inputs)
        terms = losses.be_your_own_teacher_terms(logits, targets, features, self.temperature)
        weights = {"hard": 1.0 - self.alpha, "soft": self.alpha, "feature": self.feature_weight}
        total = torch.stack([weights[name] * value for name, value in terms.items()]).sum()
        batch_size = len(targets)
        for name, value in terms.items():
            self.log_epoch(f"distill/{name}", value.detach(), batch_size)
        self.log_epoch("distill/total", total.detach(), batch_size)
        self.log_epoch("train/acc", self.accuracy(logits[-1].detach(), targets), batch_size)
        return total

    def _evaluate(self, batch: Any, stage: str) -> None:
        inputs, targets = self.split_batch(batch)
        logits, _ = self.exits(inputs)
        batch_size = len(targets)
        for name, exit_logits in zip(self.exit_layers, logits, strict=False):
            self.log_epoch(f"{stage}/acc/{name}", self.accuracy(exit_logits, targets), batch_size)
        self.log_epoch(f"{stage}/acc", self.accuracy(logits[-1], targets), batch_size)
        self.log_epoch(f"{stage}/loss", losses.hard_target_loss(logits[-1], targets), batch_size)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if len(self.heads) == 0:
            self._heads_from_state(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _heads_from_state(self, state: Mapping[str, Any]) -> None:
        for index in range(len(self.exit_layers)):
            fc = state[f"{_HEAD_PREFIX}{index}.fc.weight"]
            proj = state.get(f"{_HEAD_PREFIX}{index}.proj.0.weight")
            in_channels = fc.shape[1] if proj is None else proj.shape[1]
            rank = 4 if proj is None else (2 if proj.dim() == 2 else proj.dim())
            self.heads.append(ExitHead(in_channels, fc.shape[1], fc.shape[0], rank))
