"""Lifelong distillation: Learning without Forgetting (Li & Hoiem, "Learning without Forgetting", ECCV 2016).

A network trained on an old task (shared backbone ``theta_s`` plus old-task head ``theta_o``) learns a new task
(new head ``theta_n``) from the new task's data only. Before training, the old network's outputs ``Y_o`` on the new
images are the targets of a distillation term that keeps the old head's answers where they were:

    L = new_weight * CE(new_head(x), y_new) + old_weight * L_old(old_head(x), Y_o)

with ``L_old`` the paper's temperature-scaled cross-entropy (:func:`lwf_loss`, ``T = 2``, ``old_weight = 1``). Here
``Y_o`` comes from a frozen copy of the old network run on every batch (identical to recording it once when the
data are not augmented, and correct when they are).

Heads are given as three modules: ``backbone`` (input -> features), ``old_head`` and ``new_head`` (features ->
logits); :func:`split_head` cuts a trained classifier into the first two (``ResidualCNN``'s ``fc``).
:class:`TwoHeadNetwork` holds them and answers the class-incremental view: its output is the old task's logits
followed by the new task's, so old classes are output slice ``[:num_old]`` and new ones ``[num_old:]``.

:class:`~lightning_compress.distillation.methods.task_split.TaskSplitDataModule` splits a data set with integer labels
(by default the digits) into tasks by class.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_compress.distillation.base import DistillationBase
from lightning_compress.distillation.checks import check_count, check_logits, check_nonnegative, check_temperature
from lightning_compress.distillation.methods.task_split import TaskSplitDataModule
from lightning_compress.distillation.taps import eval_mode
from lightning_compress.utils.optim import LRSchedulerChoice, OptimizerChoice

__all__ = ["LwFModule", "TaskSplitDataModule", "TwoHeadNetwork", "lwf_loss", "split_head"]

_OLD_PREFIX = "old_model."


# ---------------------------------------------------------------------------------------------------- the loss


def lwf_loss(old_head_logits: torch.Tensor, recorded_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """The old-task term of Learning without Forgetting (Li & Hoiem 2016, eq. 2): the cross-entropy between the
    recorded outputs of the old network and the current old head, both softened at temperature ``T``:

    ``L_old = -mean_batch sum_i y'_i log yhat'_i`` with ``y' = softmax(recorded / T)`` (the paper's
    ``y^(1/T) / sum_j y_j^(1/T)`` on probabilities) and ``yhat' = softmax(old_head_logits / T)``.

    As in the paper there is no ``T^2`` factor (Hinton's KD has one, see
    :func:`~.losses.soft_target_loss`), and it is a cross-entropy, not a KL divergence: the two differ by the
    entropy of the recorded targets, a constant that leaves the gradient unchanged (so the loss is not 0 at a
    perfect match, but ``H(y')``). The recorded logits are targets: compute them under ``no_grad``.

    Args:
        old_head_logits: ``(B, C_old)`` logits of the old head being trained.
        recorded_logits: ``(B, C_old)`` logits of the frozen old network on the same inputs.
        temperature: ``T > 0`` (the paper uses 2).

    Raises:
        ValueError: for ``temperature <= 0`` or logits of different shapes.

    >>> lwf_loss(torch.zeros(1, 2), torch.zeros(1, 2))  # log 2: the entropy of a uniform target
    tensor(0.6931)
    """
    check_temperature(temperature)
    check_logits(old_head_logits, recorded_logits)
    targets = F.softmax(recorded_logits / temperature, dim=1)
    return -(targets * F.log_softmax(old_head_logits / temperature, dim=1)).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------------- networks


def split_head(model: nn.Module, head: str = "fc") -> tuple[nn.Module, nn.Module]:
    """``(backbone, head)`` copies of a trained classifier: the submodule named ``head`` and the model with that
    submodule replaced by ``nn.Identity`` (so it outputs the head's input features). ``model`` is not changed.

    Args:
        model: a classifier whose last layer is the submodule ``head`` (``ResidualCNN``: ``"fc"``, ``PlainCNN`` and
            ``MLP``: ``"classifier"``).
        head: qualified name of the head.

    Raises:
        ValueError: for an unknown ``head`` name.

    >>> backbone, head = split_head(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), head="2")
    >>> backbone(torch.zeros(1, 4)).shape, head
    (torch.Size([1, 3]), Linear(in_features=3, out_features=2, bias=True))
    """
    names = dict(model.named_modules())
    if not head or head not in names:
        available = sorted(n for n in names if n)
        raise ValueError(f"Unknown head {head!r}; submodules of {type(model).__name__}: {available}.")
    backbone = copy.deepcopy(model)
    parent_name, _, child = head.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    setattr(parent, child, nn.Identity())
    return backbone, copy.deepcopy(names[head])


class TwoHeadNetwork(nn.Module):
    """A shared ``backbone`` with an ``old_head`` and a ``new_head``.

    ``forward`` returns ``torch.cat([old_head(f), new_head(f)], dim=1)`` for ``f = backbone(x)`` (old classes first:
    the class-incremental view, and one tensor for compression callbacks and multiply-add counts); :meth:`heads`
    returns the two logits separately.

    >>> net = TwoHeadNetwork(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(3, 5))
    >>> net(torch.zeros(1, 4)).shape, [t.shape[1] for t in net.heads(torch.zeros(1, 4))]
    (torch.Size([1, 7]), [2, 5])
    """

    def __init__(self, backbone: nn.Module, old_head: nn.Module, new_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.old_head = old_head
        self.new_head = new_head

    def heads(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return self.old_head(features), self.new_head(features)

    def forward(self, x: Any) -> torch.Tensor:
        return torch.cat(self.heads(x), dim=1)


# ---------------------------------------------------------------------------------------------------- the module


class LwFModule(DistillationBase):
    """Learning without Forgetting (Li & Hoiem, ECCV 2016): train a new task's head and the shared backbone on the
    new task's data while distilling the old network's old-task outputs on that same data.

    ``loss = new_weight * CE(new logits, labels) + old_weight * lwf_loss(old-head logits, old network logits, T)``
    (:func:`lwf_loss`; the paper: ``old_weight = 1``, ``T = 2``). The old network (a frozen copy of ``backbone`` +
    ``old_head`` taken at construction) stays in eval mode, ``requires_grad`` False, runs under ``torch.no_grad``
    and is left out of checkpoints (restored from the given modules when loading). With ``old_weight = 0`` this is
    the paper's *fine-tuning* baseline (backbone and new head trained on the new task, old head untouched).

    ``warmup_epochs = N > 0`` reproduces the paper's warm-up: for the first ``N`` epochs only the new head trains
    (backbone in eval mode under ``no_grad``, old head unused), then everything trains jointly.

    Labels of the new task must lie in ``[0, num_new_classes)`` (:class:`TaskSplitDataModule` remaps them).
    Evaluation: validation / test loader 0 holds new-task data, scored on the new head (``val/acc``,
    ``val/loss``); an optional loader 1 holds old-task data, scored on the old head (``val/acc_old``): a
    :class:`TaskSplitDataModule` with ``old_classes`` returns exactly these two loaders. Training logs
    ``distill/new``, ``distill/old``, ``distill/total`` and ``train/acc`` every epoch.

    ``compression_target`` is the :class:`TwoHeadNetwork` being trained (backbone and both heads).

    Loading: ``LwFModule.load_from_checkpoint(path, backbone=..., old_head=..., new_head=...)`` with the *task-1*
    backbone and old head (the old network is copied from them; the trained weights come from the checkpoint).

    Override points: :meth:`split_batch`, :meth:`compute_terms`.

    Args:
        backbone: the shared network of the old model (input -> features); trained.
        old_head: the old task's head (features -> old logits); trained under the LwF term.
        new_head: the new task's head (features -> new logits), e.g. a fresh ``nn.Linear``.
        old_weight: weight of the old-task distillation term (``lambda_o`` in the paper).
        new_weight: weight of the new-task cross-entropy.
        temperature: softmax temperature of the old-task term.
        warmup_epochs: epochs that train the new head alone first.
        optimizer: see :class:`~.base.DistillationBase`.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        lr_scheduler: see :class:`~lightning_compress.distillation.base.DistillationBase`.
        input_shape: input shape without batch (checks the heads at construction).

    Raises:
        ValueError: for negative weights, both weights zero, ``temperature <= 0``, negative ``warmup_epochs``, a
            head given twice or a head that is the backbone, and (with ``input_shape``, else in ``setup``) heads
            that do not accept the backbone's features.

    >>> module = LwFModule(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(3, 5), input_shape=[4])
    >>> module.old_model.training, next(module.old_model.parameters()).requires_grad
    (False, False)
    """

    def __init__(
        self,
        backbone: nn.Module,
        old_head: nn.Module,
        new_head: nn.Module,
        old_weight: float = 1.0,
        new_weight: float = 1.0,
        temperature: float = 2.0,
        warmup_epochs: int = 0,
        optimizer: OptimizerChoice = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_scheduler: LRSchedulerChoice | None = "none",
        input_shape: list[int] | None = None,
    ) -> None:
        super().__init__(optimizer, lr, weight_decay, momentum, lr_scheduler, input_shape)
        self.save_hyperparameters(ignore=["backbone", "old_head", "new_head", *self.recipe_callables()])
        for name, value in (("old_weight", old_weight), ("new_weight", new_weight)):
            check_nonnegative(value, name)
        if not (old_weight > 0 or new_weight > 0):
            raise ValueError(f"old_weight and new_weight must not both be zero, got {old_weight!r}, {new_weight!r}.")
        check_temperature(temperature)
        check_count(warmup_epochs, "warmup_epochs")
        if old_head is new_head or backbone is old_head or backbone is new_head:
            raise ValueError("backbone, old_head and new_head must be three different modules (one was given twice).")
        self.old_weight, self.new_weight = float(old_weight), float(new_weight)
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.network = TwoHeadNetwork(backbone, old_head, new_head)
        self.old_model = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(old_head)).requires_grad_(False).eval()
        self._checked = False
        if self.input_shape is not None:
            self._check_heads(self.example_input())

    # ------------------------------------------------------------------ checks, properties and modes

    def _check_heads(self, example_input: Any) -> None:
        with eval_mode(self.network, self.old_model), torch.no_grad():
            features = self.network.backbone(example_input)
            for name in ("old_head", "new_head"):
                try:
                    logits = getattr(self.network, name)(features)
                except RuntimeError as err:
                    raise ValueError(f"{name} does not accept the backbone's features of shape "
                                     f"{tuple(features.shape)}: {err}") from None
                if logits.dim() != 2:
                    raise ValueError(f"{name} must give (batch, classes) logits, got shape {tuple(logits.shape)}.")
        self._checked = True

    @property
    def compression_target(self) -> nn.Module:
        """What pruning and quantization callbacks compress: the trained two-head network."""
        return self.network

    @override
    def frozen_networks(self) -> Iterable[nn.Module]:
        return [self.old_model]

    def forward(self, x: Any) -> torch.Tensor:
        """New-task logits."""
        return self.network.heads(x)[1]

    @override
    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.network]

    @property
    def in_warmup(self) -> bool:
        return self.current_epoch < self.warmup_epochs

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._checked:
            self._check_heads(self.example_input())

    # ------------------------------------------------------------------ steps

    def compute_terms(self, inputs: Any, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Unweighted ``new`` and ``old`` terms and the new-task logits (override point)."""
        if self.in_warmup:
            with eval_mode(self.network.backbone), torch.no_grad():
                features = self.network.backbone(inputs)
            new_logits = self.network.new_head(features)
            return {"new": F.cross_entropy(new_logits, targets)}, new_logits
        old_logits, new_logits = self.network.heads(inputs)
        terms: dict[str, torch.Tensor] = {}
        if self.new_weight > 0:
            terms["new"] = F.cross_entropy(new_logits, targets)
        if self.old_weight > 0:
            with torch.no_grad():
                recorded = self.logits(self.old_model, inputs)
            terms["old"] = lwf_loss(old_logits, recorded, self.temperature)
        return terms, new_logits

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = self.split_batch(batch)
        terms, new_logits = self.compute_terms(inputs, targets)
        weights = {"new": self.new_weight if not self.in_warmup else 1.0, "old": self.old_weight}
        total = torch.stack([weights[name] * value for name, value in terms.items()]).sum()
        batch_size = len(targets)
        for name, value in terms.items():
            self.log_epoch(f"distill/{name}", value.detach(), batch_size)
        self.log_epoch("distill/total", total.detach(), batch_size)
        self.log_epoch("train/acc", self.accuracy(new_logits.detach(), targets), batch_size)
        return total

    def _evaluate(self, batch: Any, stage: str, dataloader_idx: int) -> None:
        inputs, targets = self.split_batch(batch)
        old_logits, new_logits = self.network.heads(inputs)
        logits, suffix = (new_logits, "") if dataloader_idx == 0 else (old_logits, "_old")
        options: dict[str, Any] = {"on_step": False, "on_epoch": True, "sync_dist": True,
                                   "batch_size": len(targets), "add_dataloader_idx": False}
        self.log(f"{stage}/loss{suffix}", F.cross_entropy(logits, targets), **options)
        self.log(f"{stage}/acc{suffix}", self.accuracy(logits, targets), **options)

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", dataloader_idx)

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_OLD_PREFIX)]:
            del state[key]

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint's state; the old network's weights come from this module's (they are not saved)."""
        state = dict(state_dict)
        for key, value in self.old_model.state_dict(prefix=_OLD_PREFIX).items():
            state.setdefault(key, value)
        return super().load_state_dict(state, strict=strict, assign=assign)
