"""Cross-modal distillation: teacher and student read different inputs (modalities, views) of the same batch.

The math (views, feature-statistics losses) is in :mod:`~lightning_compress.distillation.losses.cross_modal`;
:class:`CrossModalDistillationModule` is the thin Lightning part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from typing_extensions import override

from lightning_compress.distillation import losses
from lightning_compress.distillation.checks import check_nonnegative
from lightning_compress.distillation.losses.cross_modal import (
    MODES,
    STATISTICS,
    VIEW_NAMES,
    View,
    downsample_view,
    feature_statistics_loss,
    make_view,
    mask_view,
    mmd_loss,
    moment_matching_loss,
    noise_view,
    paired_hint_loss,
    pool_features,
)
from lightning_compress.distillation.module import DistillationModule
from lightning_compress.distillation.taps import LayerPair, _output_shapes, check_layer_pairs, eval_mode
from lightning_compress.distillation.terms import FEATURE_TERMS
from lightning_compress.utils.data import first_training_batch

# ---------------------------------------------------------------------------------------------------- module


class ModalInputs(NamedTuple):
    """The student's and the teacher's inputs of one batch."""

    student: Any
    teacher: Any


#: Terms that compare samples one to one (unavailable in the unpaired mode).
PAIRED_TERMS = ("soft", *FEATURE_TERMS)


class CrossModalDistillationModule(DistillationModule):
    """Distillation where teacher and student see different modalities (or views) of the same samples.

    Each network's input is chosen from the batch by a key (``student_key`` / ``teacher_key``, for batches that are
    mappings such as ``{"rgb": ..., "depth": ..., "target": ...}``) or is the batch's first element (tuple batches),
    and is then passed through a view (``student_view`` / ``teacher_view``: a name from :func:`make_view` such as
    ``"identity"``, ``"downsample:2"``, ``"mask:0.5"``, ``"noise:0.1"``, or a callable). Training, validation and
    test all give each network its own modality: ``val/acc`` and ``test/acc`` are the student's accuracy on *its*
    input (``distill/agreement`` compares it with the teacher on the teacher's input); ``forward`` and
    ``predict_step`` apply the student's view to the input they are given.

    Two variants (``mode``):

    - ``"paired"``: the samples of both modalities correspond one to one (Gupta et al. 2016, "Cross Modal
      Distillation for Supervision Transfer"). Every term of :class:`~.module.DistillationModule` is available
      (per-sample soft targets, hints, relations on the tapped layers) and ``cross_modal`` is
      :func:`paired_hint_loss`: the student's pooled features on its modality regress, through a learned linear
      projection when widths differ, onto the teacher's pooled features on the paired sample of its modality.
    - ``"unpaired"``: no per-sample correspondence is used. ``cross_modal`` is :func:`feature_statistics_loss`
      (``statistic="moments"``: means and covariances, ``"mmd"``: kernel MMD) between the batch of the student's
      (projected) pooled features and the batch of the teacher's; the loss is invariant to permuting either batch,
      so it transfers the distribution of the teacher's features, not per-sample targets. Terms that compare
      samples one to one (``soft`` and the feature terms) are refused; ``hard`` uses the student's own labels.

    ``cross_modal`` is summed over the tapped layer pairs (``student_layers`` / ``teacher_layers``) and logged every
    epoch as ``distill/cross_modal``; with a feature stage it belongs to the feature stage.

    Args:
        student: the network trained on the student's modality.
        teacher: the trained network of the teacher's modality (a list: several teachers on the same modality).
        mode: ``"paired"`` or ``"unpaired"``.
        student_key: key of the student's input in mapping batches (``None``: tuple batches, element 0).
        teacher_key: key of the teacher's input in mapping batches.
        target_key: key of the labels in mapping batches.
        student_view: view applied to the student's input (name or callable).
        teacher_view: view applied to the teacher's input.
        cross_modal_weight: weight of the ``cross_modal`` term.
        statistic: ``"moments"`` or ``"mmd"`` (unpaired mode).
        soft_weight: see :class:`~.module.DistillationModule` (must be 0 in unpaired mode).
        hard_weight: see :class:`~.module.DistillationModule`.
        **kwargs: any other argument of :class:`~.module.DistillationModule` (temperature, layers, optimizer, ...).
            ``input_shape`` builds the projections at construction for tuple batches (both views of a zero batch).

    Raises:
        ValueError: for an unknown mode, view or statistic (naming the allowed ones), a negative weight, a
            per-sample term in unpaired mode, ``cross_modal_weight > 0`` without tapped layers, keys given for one
            network only; and before the first training step for a key missing from the batch (naming the batch's
            keys), a mapping batch without keys or a key on a tuple batch.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | list[nn.Module],
        mode: str = "paired",
        student_key: str | None = None,
        teacher_key: str | None = None,
        target_key: str = "target",
        student_view: str | View = "identity",
        teacher_view: str | View = "identity",
        cross_modal_weight: float = 0.0,
        statistic: str = "moments",
        soft_weight: float = 0.9,
        hard_weight: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
        check_nonnegative(cross_modal_weight, "cross_modal_weight")
        if (student_key is None) != (teacher_key is None):
            raise ValueError(
                f"Give both student_key and teacher_key (mapping batches) or neither (tuple batches), got "
                f"student_key={student_key!r}, teacher_key={teacher_key!r}."
            )
        student_view_fn, teacher_view_fn = make_view(student_view), make_view(teacher_view)
        if mode == "unpaired":
            paired = {name: kwargs.get(f"{name}_weight", 0.0) for name in PAIRED_TERMS}
            paired["soft"] = soft_weight
            used = {name: weight for name, weight in paired.items() if weight}
            if used:
                raise ValueError(
                    f"mode='unpaired' uses no per-sample pairing, so these terms are not available: {used}; set "
                    "their weights to 0 (keep hard_weight and cross_modal_weight)."
                )
        input_shape = kwargs.pop("input_shape", None)
        super().__init__(student, teacher, soft_weight=soft_weight, hard_weight=hard_weight, **kwargs)
        callables = [name for name, view in (("student_view", student_view), ("teacher_view", teacher_view))
                     if callable(view)]
        self.save_hyperparameters(ignore=["student", "teacher", *callables, *self.recipe_callables()])
        self.hparams["input_shape"] = input_shape  # given to this class, not to the base
        self.mode, self.statistic = mode, statistic
        self.student_key, self.teacher_key, self.target_key = student_key, teacher_key, target_key
        self.student_view, self.teacher_view = student_view_fn, teacher_view_fn
        self.weights["cross_modal"] = float(cross_modal_weight)
        if not any(value > 0 for value in self.weights.values()):
            raise ValueError(f"At least one loss weight must be positive, got {self.weights!r}.")
        if cross_modal_weight > 0 and not self.student_layers:
            raise ValueError("cross_modal_weight > 0 needs student_layers and teacher_layers; none were given.")
        self.projections = nn.ModuleList()
        if input_shape is not None:
            self.input_shape = [int(d) for d in input_shape]
            self.check_and_build(self.example_input())

    @staticmethod
    def check_term_weights(**weights: float) -> dict[str, float]:
        """Negative weights fail here; "all zero" is checked once the ``cross_modal`` weight is known."""
        for name, value in weights.items():
            check_nonnegative(value, f"{name}_weight")
        return dict(weights)

    # ------------------------------------------------------------------ inputs

    @override
    def split_modalities(self, batch: Any) -> tuple[Any, Any, torch.Tensor]:
        """``(student_inputs, teacher_inputs, targets)`` of a batch, views applied (override point)."""
        if isinstance(batch, Mapping):
            if self.student_key is None:
                raise ValueError(
                    f"The batch is a mapping with keys {sorted(batch)}; give student_key and teacher_key."
                )
            for role, key in (("student_key", self.student_key), ("teacher_key", self.teacher_key),
                              ("target_key", self.target_key)):
                if key not in batch:
                    raise ValueError(f"{role}={key!r} is not in the batch; its keys: {sorted(batch)}.")
            student_in, teacher_in, targets = batch[self.student_key], batch[self.teacher_key], batch[self.target_key]
        else:
            if self.student_key is not None:
                raise ValueError(
                    f"student_key={self.student_key!r} and teacher_key={self.teacher_key!r} need mapping batches, "
                    f"got a {type(batch).__name__}."
                )
            student_in, targets = batch[0], batch[1]
            teacher_in = student_in
        return self.student_view(student_in), self.teacher_view(teacher_in), targets

    @override
    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """``(student_inputs, targets)``: what the trained network sees."""
        student_in, _, targets = self.split_modalities(batch)
        return student_in, targets

    @override
    def example_input(self) -> ModalInputs:
        if self.input_shape is not None:
            zeros = torch.zeros(2, *self.input_shape)
            return ModalInputs(self.student_view(zeros), self.teacher_view(zeros))
        student_in, teacher_in, _ = self.split_modalities(self._first_training_batch())
        return ModalInputs(student_in, teacher_in)

    def _first_training_batch(self) -> Any:
        trainer = self._trainer
        if trainer is None:
            raise ValueError("input_shape is needed to build the module outside a Trainer.")
        return first_training_batch(trainer)

    def forward(self, x: Any) -> torch.Tensor:
        """The student's prediction on ``x`` seen through the student's view."""
        return self.logits(self.student, self.student_view(x))

    # ------------------------------------------------------------------ checks and parts

    @override
    def check_and_build(self, example_input: Any) -> None:
        """Class counts and layer pairs with each network on its own modality; build hint regressors and the
        ``cross_modal`` projections."""
        if not isinstance(example_input, ModalInputs):
            example_input = ModalInputs(example_input, example_input)
        with eval_mode(self.student, *self.teachers), torch.no_grad():
            student_logits = self.logits(self.student, example_input.student)
            for index, teacher in enumerate(self.teachers):
                teacher_logits = self.logits(teacher, example_input.teacher)
                if teacher_logits.shape[1:] != student_logits.shape[1:]:
                    raise ValueError(
                        f"Teacher {index} predicts {tuple(teacher_logits.shape[1:])} classes, the student "
                        f"{tuple(student_logits.shape[1:])}; they must have the same number of classes."
                    )
        if self.student_layers:
            student_shapes = _output_shapes(self.student, self.student_layers, example_input.student)
            teacher_shapes = _output_shapes(self.teacher, self.teacher_layers, example_input.teacher)
            pairs = [LayerPair(s, t, student_shapes[s], teacher_shapes[t])
                     for s, t in zip(self.student_layers, self.teacher_layers, strict=True)]
            for term, allowed in FEATURE_TERMS.items():
                if self.weights[term] > 0:
                    check_layer_pairs(pairs, allowed, purpose=term)
            if self.weights["hint"] > 0 and len(self.regressors) == 0:
                for pair in pairs:
                    self.regressors.append(
                        losses.HintRegressor(pair.student_shape[1], pair.teacher_shape[1], len(pair.student_shape))
                    )
            if self.weights.get("cross_modal", 0) > 0 and len(self.projections) == 0:
                for pair in pairs:
                    self.projections.append(losses.HintRegressor(pair.student_shape[1], pair.teacher_shape[1], 2))
        self._checked = True

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            # one training batch through split_modalities: a wrong key fails here, before the first step
            student_in, teacher_in, _ = self.split_modalities(self._first_training_batch())
            if not self._checked:
                self.check_and_build(ModalInputs(student_in, teacher_in))
        super().setup(stage)

    @override
    def trainable_modules(self) -> Iterable[nn.Module]:
        return [self.student, self.regressors, self.projections]

    @override
    def active_terms(self) -> list[str]:
        names = [name for name in super().active_terms() if name != "cross_modal"]  # base: no stage for it
        if self.weights["cross_modal"] > 0 and (self.feature_stage_epochs == 0 or self.in_feature_stage):
            names.append("cross_modal")
        return names

    # ------------------------------------------------------------------ steps

    @override
    def compute_terms(
        self, student_logits: torch.Tensor, teacher_logits: list[torch.Tensor], targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms = super().compute_terms(student_logits, teacher_logits, targets)
        if "cross_modal" in self.active_terms():
            assert self._student_taps is not None and self._teacher_taps is not None
            pairs = zip(self._student_taps.features(), self._teacher_taps.features(), self.projections, strict=True)
            if self.mode == "paired":
                values = [paired_hint_loss(s, t, projection) for s, t, projection in pairs]
            else:
                values = [feature_statistics_loss(projection(pool_features(s)), pool_features(t), self.statistic)
                          for s, t, projection in pairs]
            terms["cross_modal"] = torch.stack(values).sum()
        return terms

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        student_in = self.split_batch(batch)[0] if not torch.is_tensor(batch) else self.student_view(batch)
        return self.logits(self.student, student_in).argmax(dim=1)

    # ------------------------------------------------------------------ checkpoints

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if len(self.projections) == 0 and self.weights.get("cross_modal", 0) > 0:
            for index in range(len(self.student_layers)):
                weight = state_dict.get(f"projections.{index}.proj.weight")
                widths = (1, 1) if weight is None else (int(weight.shape[1]), int(weight.shape[0]))
                self.projections.append(losses.HintRegressor(widths[0], widths[1], rank=2))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


__all__ = [
    "VIEW_NAMES",
    "CrossModalDistillationModule",
    "ModalInputs",
    "downsample_view",
    "feature_statistics_loss",
    "make_view",
    "mask_view",
    "mmd_loss",
    "moment_matching_loss",
    "noise_view",
    "paired_hint_loss",
    "pool_features",
]
