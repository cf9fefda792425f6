"""Offline distillation: a student trained from one or several frozen teachers, with any mix of knowledge."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.distillation import losses
from lightning_compress.distillation.base import DistillationBase
from lightning_compress.distillation.checkpoints import TEACHER_ADVICE, load_network_weights
from lightning_compress.distillation.checks import check_temperature, check_weights
from lightning_compress.distillation.taps import (
    FeatureTaps,
    check_layer_pairs,
    eval_mode,
    inspect_layer_pairs,
)
from lightning_compress.distillation.terms import (
    FEATURE_TERMS,
    RESPONSE_TERMS,
    SPATIAL_TERMS,
    check_feature_layers,
    check_spatial,
    feature_terms,
    unbalanced_terms,
    validate_term_weights,
)
from lightning_compress.utils.optim import LRSchedulerChoice, OptimizerChoice

_TEACHER_PREFIX = "teachers."
_REGRESSOR_PREFIX = "regressors."


class DistillationModule(DistillationBase):
    """Train ``student`` from frozen ``teacher`` (Hinton et al. 2015) plus optional feature and relation knowledge.

    ``loss = sum_term weight_term * term`` over ``soft`` (:func:`~.losses.soft_target_loss`, or the weighted average
    of several teachers' probabilities), ``hard`` (cross-entropy at T = 1) and, on the layers named in
    ``student_layers`` / ``teacher_layers`` (paired one to one, forward hooks): ``hint`` (FitNets, with a
    :class:`~.losses.HintRegressor` built when widths differ, trained and saved with the student), ``attention``,
    ``fsp`` (over consecutive tapped layers: pairs (l0, l1), (l1, l2), ...), ``similarity`` (SP), ``rkd_distance``,
    ``rkd_angle`` and ``pairwise`` (Structured KD). Feature losses use the first teacher. A term with weight 0 is
    not computed. Each term is logged every epoch as ``distill/<term>``, the total as ``distill/total``, with
    ``train/acc``, ``val/acc``, ``val/loss``, ``distill/agreement`` (fraction of validation samples on which the
    student predicts the teacher's class) and ``val/teacher_acc`` (the first validation epoch only).

    The teachers stay frozen: ``requires_grad`` False, eval mode through training, validation, sanity checks and
    resume (:meth:`train` re-asserts it), run under ``torch.no_grad`` (not ``inference_mode``, whose tensors break
    feature losses in backward); their weights are left out of checkpoints unless ``keep_teacher_in_checkpoint``.
    The student predicts at T = 1. ``compression_target`` is the student. (Lightning's warning "Found N module(s) in
    eval mode at the start of training" counts the teachers' modules: expected.)

    Loading: ``DistillationModule.load_from_checkpoint(path, student=..., teacher=...)`` restores the module (the
    teacher's weights come from the given teacher unless the checkpoint kept them);
    :meth:`student_from_checkpoint` gives the trained student network alone.

    Two-stage methods (FitNets, FSP): with ``feature_stage_epochs = N > 0`` the first ``N`` epochs train on the
    feature terms only, the remaining ones on ``soft`` and ``hard`` only, with the optimizer state (Adam's moments)
    cleared when the task stage starts (under DDP the regressors are then unused:
    use ``strategy="ddp_find_unused_parameters_true"``).

    Override points: :meth:`split_batch`, :meth:`check_term_weights`, :meth:`check_and_build`,
    :meth:`teacher_forward`, :meth:`active_terms`, :meth:`compute_terms`, :meth:`combine`, :meth:`trainable_modules`.

    Args:
        student: the network to train.
        teacher: a trained network, or a list of them.
        soft_weight: weight of the soft-target term.
        hard_weight: weight of the hard-target (label) term.
        temperature: softmax temperature of the soft term, ``> 0``.
        teacher_weights: weight per teacher for the averaged probabilities (default equal).
        student_layers: qualified names of tapped student layers.
        teacher_layers: qualified names of the teacher layers paired with them.
        hint_weight: weight of the FitNets hint term.
        attention_weight: weight of attention transfer (the authors use 1000).
        fsp_weight: weight of the FSP term.
        similarity_weight: weight of the similarity-preserving term.
        rkd_distance_weight: weight of the RKD distance term.
        rkd_angle_weight: weight of the RKD angle term.
        pairwise_weight: weight of the Structured KD pair-wise term.
        feature_stage_epochs: epochs of the feature-only first stage (0: one stage with every term).
        keep_teacher_in_checkpoint: also write the teachers' weights into checkpoints.
        teacher_checkpoint: path (or one path per teacher) of a checkpoint with the trained teacher's weights,
            loaded at construction with :func:`~.checkpoints.load_network_weights` (e.g. a ``ClassifierModule``
            checkpoint); how a YAML config gives a pretrained teacher.
        optimizer, lr, weight_decay, momentum, lr_scheduler: the training recipe, see
            :class:`~.base.DistillationBase` (your own optimizer and schedule as callables, or short names).
        input_shape: input shape without batch, to check layers and build regressors at construction.

    Raises:
        ValueError: for ``temperature <= 0``, negative weights, all weights zero, the student also a teacher, layer
            lists of different lengths, unknown layer names, feature weights without layers, a negative stage
            length; and before the first training step for teacher and student with different numbers of classes
            or a layer pair that cannot be matched.

    >>> student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    >>> module = DistillationModule(student, teacher, temperature=2.0)
    >>> module.compression_target is student, module.teacher.training, module.teacher.weight.requires_grad
    (True, False, False)
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | list[nn.Module],
        soft_weight: float = 0.9,
        hard_weight: float = 0.1,
        temperature: float = 4.0,
        teacher_weights: list[float] | None = None,
        student_layers: list[str] | None = None,
        teacher_layers: list[str] | None = None,
        hint_weight: float = 0.0,
        attention_weight: float = 0.0,
        fsp_weight: float = 0.0,
        similarity_weight: float = 0.0,
        rkd_distance_weight: float = 0.0,
        rkd_angle_weight: float = 0.0,
        pairwise_weight: float = 0.0,
        feature_stage_epochs: int = 0,
        keep_teacher_in_checkpoint: bool = False,
        teacher_checkpoint: str | list[str] | None = None,
        optimizer: OptimizerChoice = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_scheduler: LRSchedulerChoice | None = "none",
        input_shape: list[int] | None = None,
    ) -> None:
        super().__init__(optimizer, lr, weight_decay, momentum, lr_scheduler, input_shape)
        self.save_hyperparameters(ignore=["student", "teacher", *self.recipe_callables()])
        teachers = list(teacher) if isinstance(teacher, (list, tuple, nn.ModuleList)) else [teacher]
        if not teachers:
            raise ValueError("teacher must be a network or a non-empty list of networks, got an empty list.")
        if any(t is student for t in teachers):
            raise ValueError(
                "The student is also given as a teacher (the same object); offline distillation needs a separate, "
                "trained teacher (use copy.deepcopy for born-again training, or MutualLearningModule for peers)."
            )
        if teacher_checkpoint is not None:
            paths = [teacher_checkpoint] if isinstance(teacher_checkpoint, str) else list(teacher_checkpoint)
            if len(paths) != len(teachers):
                raise ValueError(f"teacher_checkpoint needs one path per teacher ({len(teachers)}), got {paths!r}.")
            for network, path in zip(teachers, paths, strict=True):
                load_network_weights(network, path, what="teacher_checkpoint", advice=TEACHER_ADVICE)
        check_temperature(temperature)
        self.temperature = temperature
        self.teacher_weights = check_weights(teacher_weights, len(teachers), "teacher_weights")
        self.weights = self.check_term_weights(
            soft=soft_weight, hard=hard_weight, hint=hint_weight, attention=attention_weight, fsp=fsp_weight,
            similarity=similarity_weight, rkd_distance=rkd_distance_weight, rkd_angle=rkd_angle_weight,
            pairwise=pairwise_weight,
        )
        self.student_layers, self.teacher_layers = list(student_layers or []), list(teacher_layers or [])
        check_feature_layers(student, teachers[0], self.student_layers, self.teacher_layers, self.weights,
                             feature_stage_epochs)
        self.feature_stage_epochs = feature_stage_epochs
        self.keep_teacher_in_checkpoint = keep_teacher_in_checkpoint
        self.student = student
        self.teachers = nn.ModuleList([t.requires_grad_(False).eval() for t in teachers])
        self.regressors = nn.ModuleList()
        self._student_taps: FeatureTaps | None = None
        self._teacher_taps: FeatureTaps | None = None
        self._checked = False
        self._teacher_acc_logged = False
        if self.input_shape is not None:
            self.check_and_build(self.example_input())

    # ------------------------------------------------------------------ validation

    @staticmethod
    def check_term_weights(**weights: float) -> dict[str, float]:
        """Public override point: the validated term weights (finite, non-negative, at least one positive)."""
        return validate_term_weights(**weights)

    def check_and_build(self, example_input: Any) -> None:
        """Public override point: check class counts and layer pairs on one example forward (before training, or
        at construction with ``input_shape``); build the hint regressors. Subclasses extend it with ``super()``."""
        with eval_mode(self.student, *self.teachers), torch.no_grad():
            student_logits = self.student(example_input)
            for index, teacher in enumerate(self.teachers):
                teacher_logits = teacher(example_input)
                if teacher_logits.shape[1:] != student_logits.shape[1:]:
                    raise ValueError(
                        f"Teacher {index} predicts {tuple(teacher_logits.shape[1:])} classes, the student "
                        f"{tuple(student_logits.shape[1:])}; they must have the same number of classes."
                    )
        if self.student_layers:
            pairs = inspect_layer_pairs(self.student, self.teacher, self.student_layers, self.teacher_layers,
                                        example_input)
            for term, allowed in FEATURE_TERMS.items():
                if self.weights[term] > 0:
                    check_layer_pairs(pairs, allowed, purpose=term)
                    if term in SPATIAL_TERMS:
                        check_spatial(pairs, term)
            if self.weights["hint"] > 0 and len(self.regressors) == 0:
                for pair in pairs:
                    rank = len(pair.student_shape)
                    self.regressors.append(losses.HintRegressor(pair.student_shape[1], pair.teacher_shape[1], rank))
        self._checked = True

    # ------------------------------------------------------------------ properties and modes

    @property
    def teacher(self) -> nn.Module:
        """The first (or only) teacher."""
        return self.teachers[0]

    @property
    def compression_target(self) -> nn.Module:
        """What pruning and quantization callbacks compress: the student."""
        return self.student

    @override
    def frozen_networks(self) -> Iterable[nn.Module]:
        return self.teachers

    def forward(self, x: Any) -> torch.Tensor:
        return self.student(x)

    @override
    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.student, self.regressors]

    @property
    def in_feature_stage(self) -> bool:
        return self.current_epoch < self.feature_stage_epochs

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._checked:
            self.check_and_build(self.example_input())
        if self.student_layers and self._student_taps is None:
            self._student_taps = FeatureTaps(self.student, self.student_layers)
            self._teacher_taps = FeatureTaps(self.teacher, self.teacher_layers)

    @override
    def teardown(self, stage: str) -> None:
        self.remove_taps()

    def remove_taps(self) -> None:
        """Remove the forward hooks on student and teacher (done at the end of every fit/validate/test)."""
        for taps in (self._student_taps, self._teacher_taps):
            if taps is not None:
                taps.remove()
        self._student_taps = self._teacher_taps = None

    def _clear_taps(self) -> None:
        for taps in (self._student_taps, self._teacher_taps):
            if taps is not None:
                taps.clear()

    @override
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.feature_stage_epochs and self.current_epoch == self.feature_stage_epochs:
            # The task stage is a fresh optimisation (Romero et al. 2015): moments accumulated on the feature
            # losses' scale would otherwise throttle it.
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()

    # ------------------------------------------------------------------ steps

    def teacher_forward(self, inputs: Any) -> list[torch.Tensor]:
        """Logits of every teacher, under ``torch.no_grad`` (override point)."""
        with torch.no_grad():
            return [teacher(inputs) for teacher in self.teachers]

    def active_terms(self) -> list[str]:
        """Terms of the current stage with a positive weight."""
        names = [name for name, weight in self.weights.items() if weight > 0]
        if self.feature_stage_epochs == 0:
            return names
        if self.in_feature_stage:
            return [name for name in names if name in FEATURE_TERMS]
        return [name for name in names if name in RESPONSE_TERMS]

    def compute_terms(
        self, student_logits: torch.Tensor, teacher_logits: list[torch.Tensor], targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Unweighted value of each active term (override point)."""
        terms: dict[str, torch.Tensor] = {}
        active = self.active_terms()
        if "soft" in active:
            terms["soft"] = losses.multi_teacher_soft_target_loss(
                student_logits, teacher_logits, self.temperature, self.teacher_weights
            )
        if "hard" in active:
            terms["hard"] = losses.hard_target_loss(student_logits, targets)
        if any(name in FEATURE_TERMS for name in active):
            assert self._student_taps is not None and self._teacher_taps is not None
            terms.update(feature_terms(self._student_taps.features(), self._teacher_taps.features(), active,
                                       list(self.regressors)))
        return terms

    def combine(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the terms (override point)."""
        return torch.stack([self.weights[name] * value for name, value in terms.items()]).sum()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        student_inputs, teacher_inputs, targets = self.split_modalities(batch)
        student_logits = self.student(student_inputs)
        teacher_logits = self.teacher_forward(teacher_inputs)
        terms = self.compute_terms(student_logits, teacher_logits, targets)
        if self.global_step == 0 and (warning := unbalanced_terms(terms, self.weights)):
            rank_zero_warn(f"{type(self).__name__}: {warning} (README, 'Weighing the terms').")
        total = self.combine(terms)
        self._clear_taps()
        batch_size = len(targets)
        for name, value in terms.items():
            self.log_epoch(f"distill/{name}", value.detach(), batch_size)
        self.log_epoch("distill/total", total.detach(), batch_size)
        self.log_epoch("train/acc", self.accuracy(student_logits.detach(), targets), batch_size)
        return total

    def split_modalities(self, batch: Any) -> tuple[Any, Any, torch.Tensor]:
        """``(student_inputs, teacher_inputs, targets)``: the same inputs for both here (override point; the
        cross-modal module gives each model its own)."""
        inputs, targets = self.split_batch(batch)
        return inputs, inputs, targets

    def _evaluate(self, batch: Any, stage: str) -> None:
        student_inputs, teacher_inputs, targets = self.split_modalities(batch)
        student_logits = self.student(student_inputs)
        teacher_logits = self.teacher_forward(teacher_inputs)[0]
        self._clear_taps()
        batch_size = len(targets)
        self.log_epoch(f"{stage}/loss", losses.hard_target_loss(student_logits, targets), batch_size)
        self.log_epoch(f"{stage}/acc", self.accuracy(student_logits, targets), batch_size)
        agreement = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean()
        self.log_epoch("distill/agreement" if stage == "val" else f"{stage}/agreement", agreement, batch_size)
        if stage == "val" and not self._teacher_acc_logged:
            self.log_epoch("val/teacher_acc", self.accuracy(teacher_logits, targets), batch_size)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._teacher_acc_logged = True

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["teacher_acc_logged"] = self._teacher_acc_logged  # once per run, resumed runs included
        teacher_acc = self.trainer.callback_metrics.get("val/teacher_acc") if self._trainer is not None else None
        if teacher_acc is not None:
            checkpoint["teacher_acc"] = float(teacher_acc)
        if not self.keep_teacher_in_checkpoint:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(_TEACHER_PREFIX)]:
                del state[key]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._teacher_acc_logged = bool(checkpoint.get("teacher_acc_logged", self._teacher_acc_logged))
        self._restored_teacher_acc = checkpoint.get("teacher_acc")

    @override
    def on_fit_start(self) -> None:
        """A resumed run shows the teacher's accuracy (logged in the first epoch only) in ``callback_metrics`` too."""
        restored = getattr(self, "_restored_teacher_acc", None)
        if restored is not None and "val/teacher_acc" not in self.trainer.callback_metrics:
            self.trainer.callback_metrics["val/teacher_acc"] = torch.tensor(restored)
        self._restored_teacher_acc = None

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint's state; missing teacher weights are taken from the current teachers and hint
        regressors are built from the saved shapes when they do not exist yet."""
        state = dict(state_dict)
        for key, value in self.teachers.state_dict(prefix=_TEACHER_PREFIX).items():
            state.setdefault(key, value)
        if len(self.regressors) == 0 and self.weights["hint"] > 0:
            self.regressors.extend(losses.hint_regressors_from_state(state, len(self.student_layers)))
        return super().load_state_dict(state, strict=strict, assign=assign)

    @staticmethod
    def student_from_checkpoint(checkpoint_path: str | Path, student: nn.Module) -> nn.Module:
        """``student`` (a fresh network of the student's architecture) with the trained weights of a checkpoint of
        this module (a trusted file)."""
        return load_network_weights(student, checkpoint_path, prefix="student.")


__all__ = ["DistillationModule"]
