"""Offline distillation: a student trained from one or several frozen teachers, with any mix of knowledge."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.distillation import losses
from lightning_compress.distillation.checkpoints import TEACHER_ADVICE, load_network_weights
from lightning_compress.distillation.checks import check_temperature, check_weights
from lightning_compress.distillation.module_state import OfflineCheckpoints
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
from lightning_compress.distillation.transformer import (
    TRANSFORMER_TERMS,
    TransformerKnowledge,
    TransformerTerms,
    attention_mask_of,
)
from lightning_compress.utils.optim import LRSchedulerChoice, OptimizerChoice
from lightning_compress.utils.outputs import logits_of, run_model


class DistillationModule(OfflineCheckpoints):
    """Train ``student`` from frozen ``teacher`` (Hinton et al. 2015) plus optional feature and relation knowledge.

    ``loss = sum_term weight_term * term`` over ``soft`` (:func:`~.losses.soft_target_loss`, or the weighted average
    of several teachers' probabilities), ``hard`` (cross-entropy at T = 1) and, on the layers named in
    ``student_layers`` / ``teacher_layers`` (paired one to one, forward hooks): ``hint`` (FitNets, with a
    :class:`~.losses.HintRegressor` built when widths differ, trained and saved with the student), ``attention``,
    ``fsp`` (over consecutive tapped layers: pairs (l0, l1), (l1, l2), ...), ``similarity`` (SP), ``rkd_distance``,
    ``rkd_angle`` and ``pairwise`` (Structured KD); with ``transformer`` (:class:`~.transformer.TransformerKnowledge`)
    ``hidden`` (TinyBERT / DistilBERT), ``attention_kl`` and ``value_relation`` (MiniLM). Feature losses use the
    first teacher. A term with weight 0 is not computed. Batches may be dicts (Hugging Face: inputs as keywords,
    ``labels``) and outputs ``ModelOutput`` (:mod:`lightning_compress.utils.outputs`). Each term is logged every
    epoch as ``distill/<term>``, the total as ``distill/total``, with
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
        temperature: softmax temperature of the soft term, ``> 0`` (default 2, README "Default weights").
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
        transformer: the transformer terms and where they read from (:class:`~.transformer.TransformerKnowledge`).
        logits_key: the logits' key or attribute in the outputs (default: the rule of :mod:`~.utils.outputs`).

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
        temperature: float = 2.0,
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
        transformer: TransformerKnowledge | dict[str, Any] | None = None,
        logits_key: str | None = None,
    ) -> None:
        super().__init__(optimizer, lr, weight_decay, momentum, lr_scheduler, input_shape)
        self.logits_key = logits_key
        self.save_hyperparameters(ignore=["student", "teacher", "transformer", *self.recipe_callables()])
        transformer = TransformerKnowledge.parse(transformer, self.hparams)
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
            pairwise=pairwise_weight, **(transformer.weights() if transformer is not None else {}),
        )
        self.student_layers, self.teacher_layers = list(student_layers or []), list(teacher_layers or [])
        check_feature_layers(student, teachers[0], self.student_layers, self.teacher_layers, self.weights,
                             feature_stage_epochs)
        self.feature_stage_epochs = feature_stage_epochs
        self.keep_teacher_in_checkpoint = keep_teacher_in_checkpoint
        self.student = student
        self.teachers = nn.ModuleList([t.requires_grad_(False).eval() for t in teachers])
        self.regressors = nn.ModuleList()
        self.transformer_terms = TransformerTerms(transformer) if transformer is not None else None
        if self.transformer_terms is not None:
            self.transformer_terms.check_names(student, teachers[0])
        self._student_taps: FeatureTaps | None = None
        self._teacher_taps: FeatureTaps | None = None
        self._checked = False
        self._outputs: tuple[Any, Any] = (None, None)
        self._mask: torch.Tensor | None = None
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
        if self.transformer_terms is not None:
            self.transformer_terms.attach(self.student, self.teacher)
        with eval_mode(self.student, *self.teachers), torch.no_grad():
            student_logits = self.student_forward(example_input)
            for index, teacher_logits in enumerate(self.teacher_forward(example_input)):
                if teacher_logits.shape[1:] != student_logits.shape[1:]:
                    raise ValueError(
                        f"Teacher {index} predicts {tuple(teacher_logits.shape[1:])} classes, the student "
                        f"{tuple(student_logits.shape[1:])}; they must have the same number of classes."
                    )
            if self.transformer_terms is not None:
                self.transformer_terms.build(self._outputs[0], self._outputs[1])
        self._outputs = (None, None)
        if self.student_layers:
            pairs = inspect_layer_pairs(self.student, self.teacher, self.student_layers, self.teacher_layers,
                                        example_input)
            for term, allowed in FEATURE_TERMS.items():
                if self.weights[term] > 0:
                    check_layer_pairs(pairs, allowed, purpose=term)
                    if term in SPATIAL_TERMS:
                        check_spatial(pairs, term, self.student, self.teacher)
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
        return self.logits(self.student, x)

    @override
    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.student, self.regressors, *([self.transformer_terms] if self.transformer_terms else [])]

    @property
    def in_feature_stage(self) -> bool:
        return self.current_epoch < self.feature_stage_epochs

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._checked:
            self.check_and_build(self.example_input())
        if self.transformer_terms is not None:
            self.transformer_terms.attach(self.student, self.teacher)
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
        if self.transformer_terms is not None:
            self.transformer_terms.remove()

    def _clear_taps(self) -> None:
        self._outputs = (None, None)
        if self.transformer_terms is not None:
            self.transformer_terms.clear()
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

    def _run(self, network: nn.Module, inputs: Any, first: bool) -> Any:
        """``network``'s raw output, asked for what the transformer terms read (only the student and first teacher)."""
        options = self.transformer_terms.knowledge.output_options() if self.transformer_terms and first else {}
        return run_model(network, inputs, **options)

    def student_forward(self, inputs: Any) -> torch.Tensor:
        """The student's logits; its full output is kept for the transformer terms (override point)."""
        output = self._run(self.student, inputs, True)
        self._outputs, self._mask = (output, self._outputs[1]), attention_mask_of(inputs)
        return logits_of(output, self.logits_key)

    def teacher_forward(self, inputs: Any) -> list[torch.Tensor]:
        """Logits of every teacher, under ``torch.no_grad`` (override point)."""
        with torch.no_grad():
            outputs = [self._run(teacher, inputs, index == 0) for index, teacher in enumerate(self.teachers)]
        self._outputs = (self._outputs[0], outputs[0])
        return [logits_of(output, self.logits_key) for output in outputs]

    def active_terms(self) -> list[str]:
        """Terms of the current stage with a positive weight."""
        names = [name for name, weight in self.weights.items() if weight > 0]
        if self.feature_stage_epochs == 0:
            return names
        if self.in_feature_stage:
            return [name for name in names if name in FEATURE_TERMS or name in TRANSFORMER_TERMS]
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
        if self.transformer_terms is not None and any(name in TRANSFORMER_TERMS for name in active):
            terms.update(self.transformer_terms(*self._outputs, active, self._mask))
        return terms

    def combine(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the terms (override point)."""
        return torch.stack([self.weights[name] * value for name, value in terms.items()]).sum()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        student_inputs, teacher_inputs, targets = self.split_modalities(batch)
        student_logits = self.student_forward(student_inputs)
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
        student_logits = self.student_forward(student_inputs)
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


__all__ = ["DistillationModule"]
