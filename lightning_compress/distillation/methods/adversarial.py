"""Adversarial distillation: a discriminator tells teacher from student outputs, the student learns to fool it.

The losses are pure functions in :mod:`~lightning_compress.distillation.losses.adversarial`;
:class:`AdversarialDistillationModule` is the thin Lightning object over them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_compress.distillation.checks import check_nonnegative
from lightning_compress.distillation.losses.adversarial import (
    ADVERSARIAL_LOSSES,
    Discriminator,
    _check_loss,
    discriminator_accuracy,
    discriminator_loss,
    frozen,
    generator_loss,
    gradient_penalty,
    pooled_features,
)
from lightning_compress.distillation.module import DistillationModule
from lightning_compress.distillation.taps import FeatureTaps, check_layer_names, inspect_layer_pairs

#: Discriminator objectives: the original GAN's cross-entropy, or a Wasserstein critic with gradient penalty.

_DISCRIMINATOR_PREFIX = "discriminator."
_ADAPTER_PREFIX = "adversarial_adapter."


# ---------------------------------------------------------------------------------------------- Lightning module


class AdversarialDistillationModule(DistillationModule):
    """Distillation with a discriminator that learns to tell the teacher's outputs from the student's, and a
    generator term by which the student learns to fool it, on top of :class:`~.module.DistillationModule`'s terms.

    Methods. On logits (the default) this is adversarial KD after Xu et al. 2018 ("Training Shallow and Thin
    Networks for Acceleration via Knowledge Distillation with Conditional Adversarial Networks": an MLP
    discriminator on logits, the adversarial loss added to a supervised one) and, in spirit, Wang et al. 2018
    (KDGAN, NeurIPS: a discriminator between teacher and student label distributions); with
    ``adversarial_student_layers`` / ``adversarial_teacher_layers`` the discriminator reads the globally pooled
    features of those layers (concatenated; the student's go through a learned linear adapter to the teacher's width
    when it differs, trained with the student and saved in checkpoints), after Wang et al. 2018 (AAAI, "Adversarial
    Learning of Portable Student Networks"). ``adversarial_loss="wasserstein"`` with ``conditional=True`` is the
    holistic distillation of Structured KD (Liu et al. CVPR 2019): a Wasserstein critic with gradient penalty on
    (input, output) pairs; with ``pairwise_weight > 0`` on tapped layers it gives both halves of Structured KD.

    Terms, all logged every epoch: ``distill/adversarial_g`` (the student's generator loss, unweighted, added to the
    student's objective with ``adversarial_weight``; present in every stage of a two-stage run),
    ``distill/adversarial_d`` (the discriminator's loss, gradient penalty included) and
    ``distill/discriminator_acc`` (see :func:`discriminator_accuracy`; 0.5 = the student is indistinguishable), plus
    :class:`~.module.DistillationModule`'s ``distill/<term>``, ``distill/total`` (the student's objective),
    ``train/acc``, ``val/acc``, ...

    Optimisation: automatic (Lightning), one optimizer over student, regressors, adapter and discriminator, one
    backward of ``student objective + discriminator loss`` per batch, i.e. simultaneous gradient steps of the two
    players. The gradients are kept apart by construction: the discriminator's loss reads the student's outputs
    detached (no gradient to the student), and the generator term runs the discriminator with its parameters
    frozen (no gradient to the discriminator). This keeps what a Trainer offers (one ``global_step`` per batch,
    which pruning and quantization schedules count; gradient accumulation; schedulers; every parameter used in the
    one backward, as DDP wants) where manual optimization with two optimizers would count two steps per batch and
    refuse accumulation and clipping (not yet exercised under DDP). The discriminator has the student's learning
    rate and schedule; with Adam the relative scale of the two losses does not matter (with SGD it acts as a
    learning-rate ratio), and gradient clipping by norm (``Trainer(gradient_clip_val=...)``) clips both players'
    gradients together.

    The discriminator is built at construction when ``input_shape`` is given, else in ``setup`` from one batch, and
    from the saved shapes when a checkpoint is loaded into a fresh module; it is saved in checkpoints (keys
    ``discriminator.*``, ``adversarial_adapter.*``) with its optimizer state; the teachers stay frozen, in eval
    mode, under ``torch.no_grad`` and out of checkpoints as in the parent. The gradient penalty's interpolation
    points come from a generator seeded by the global step and rank, so a resumed run draws the same ones.
    Conditioning (``conditional=True``) concatenates the flattened input to what the discriminator reads (inputs
    must be a tensor; meant for small inputs such as 8x8 digits).

    Override points: :meth:`discriminator_inputs` and :meth:`build_discriminator`, besides the parent's.

    Args:
        student: the network to train.
        teacher: a trained network, or a list of them (the discriminator reads the first).
        adversarial_weight: weight of the generator term in the student's objective (``0``: the discriminator is
            still trained and logged, as a probe of how distinguishable the student is).
        adversarial_loss: ``"bce"`` (GAN cross-entropy, non-saturating generator loss) or ``"wasserstein"``
            (critic with gradient penalty).
        gradient_penalty_weight: weight of the WGAN-GP penalty (Gulrajani et al. use 10); used with
            ``"wasserstein"`` only.
        adversarial_student_layers: student layers whose pooled outputs the discriminator reads (default: logits).
        adversarial_teacher_layers: the teacher layers paired with them.
        conditional: also give the discriminator the flattened input (conditional GAN; Liu et al.'s holistic loss).
        discriminator_hidden: widths of the discriminator's hidden layers.
        **kwargs: the arguments of :class:`~.module.DistillationModule` (weights of its terms, temperature,
            ``student_layers`` / ``teacher_layers`` of its feature terms, optimizer, ``input_shape``, ...).

    Raises:
        ValueError: (besides the parent's) for a negative ``adversarial_weight`` or ``gradient_penalty_weight``, an
            unknown ``adversarial_loss``, non-positive hidden widths, adversarial layer lists of different lengths,
            unknown adversarial layer names; before the first training step for conditioning on a non-tensor input.

    >>> student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    >>> module = AdversarialDistillationModule(student, teacher, adversarial_weight=0.1, input_shape=[4])
    >>> module.discriminator
    Discriminator(
      (layers): Sequential(
        (0): Linear(in_features=3, out_features=64, bias=True)
        (1): LeakyReLU(negative_slope=0.2)
        (2): Linear(in_features=64, out_features=64, bias=True)
        (3): LeakyReLU(negative_slope=0.2)
        (4): Linear(in_features=64, out_features=1, bias=True)
      )
    )
    """

    #: False while the parent's constructor runs (it may call :meth:`check_and_build` before our fields exist).
    _adversarial_configured = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | list[nn.Module],
        adversarial_weight: float = 0.1,
        adversarial_loss: str = "bce",
        gradient_penalty_weight: float = 10.0,
        adversarial_student_layers: list[str] | None = None,
        adversarial_teacher_layers: list[str] | None = None,
        conditional: bool = False,
        discriminator_hidden: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        check_nonnegative(adversarial_weight, "adversarial_weight")
        _check_loss(adversarial_loss)
        check_nonnegative(gradient_penalty_weight, "gradient_penalty_weight")
        hidden = [64, 64] if discriminator_hidden is None else list(discriminator_hidden)
        if any(int(width) < 1 for width in hidden):
            raise ValueError(f"discriminator_hidden must list positive widths, got {discriminator_hidden!r}.")
        student_layers = list(adversarial_student_layers or [])
        teacher_layers = list(adversarial_teacher_layers or [])
        if len(student_layers) != len(teacher_layers):
            raise ValueError(
                f"adversarial_student_layers and adversarial_teacher_layers must pair up one to one, got "
                f"{len(student_layers)} and {len(teacher_layers)}: {student_layers} vs {teacher_layers}."
            )
        check_layer_names(student, student_layers, "student")
        first_teacher = teacher[0] if isinstance(teacher, (list, tuple, nn.ModuleList)) and len(teacher) else teacher
        if isinstance(first_teacher, nn.Module):
            check_layer_names(first_teacher, teacher_layers, "teacher")
        super().__init__(student, teacher, **kwargs)
        self.adversarial_loss = adversarial_loss
        self.gradient_penalty_weight = gradient_penalty_weight
        self.adversarial_student_layers, self.adversarial_teacher_layers = student_layers, teacher_layers
        self.conditional = conditional
        self.discriminator_hidden = [int(width) for width in hidden]
        self.weights["adversarial_g"] = float(adversarial_weight)
        self.discriminator: nn.Module | None = None
        self.adversarial_adapter: nn.Module = nn.Identity()
        self._adversarial_student_taps: FeatureTaps | None = None
        self._adversarial_teacher_taps: FeatureTaps | None = None
        self._adversarial_configured = True
        if self.input_shape is not None:
            self._build_adversarial(self.example_input())

    # ------------------------------------------------------------------ building

    def build_discriminator(self, in_features: int) -> nn.Module:
        """The discriminator for ``(B, in_features)`` inputs, returning ``(B,)`` scores (override point)."""
        return Discriminator(in_features, self.discriminator_hidden)

    @override
    def check_and_build(self, example_input: Any) -> None:
        super().check_and_build(example_input)
        if self._adversarial_configured:
            self._build_adversarial(example_input)

    def _build_adversarial(self, example_input: Any) -> None:
        """Size the discriminator (and the student's adapter) from one example forward of each network."""
        if self.discriminator is not None:
            return
        condition_width = self._condition_width(example_input)
        if self.adversarial_student_layers:
            pairs = inspect_layer_pairs(self.student, self.teacher, self.adversarial_student_layers,
                                        self.adversarial_teacher_layers, example_input)
            student_width = sum(pair.student_shape[1] for pair in pairs)
            width = sum(pair.teacher_shape[1] for pair in pairs)
            if student_width != width:
                self.adversarial_adapter = nn.Linear(student_width, width)
        else:
            with torch.no_grad():
                width = int(self.logits(self.teacher, example_input).shape[1])
        self.discriminator = self.build_discriminator(width + condition_width)

    def _condition_width(self, example_input: Any) -> int:
        if not self.conditional:
            return 0
        if not isinstance(example_input, torch.Tensor):
            raise ValueError(
                f"conditional=True concatenates the flattened input, which must be a tensor; got "
                f"{type(example_input).__name__} (override discriminator_inputs for other inputs)."
            )
        return math.prod(example_input.shape[1:])

    # ------------------------------------------------------------------ modules and taps

    @override
    def trainable_modules(self) -> Iterable[nn.Module]:
        assert self.discriminator is not None, "the discriminator is built in setup"
        return [*super().trainable_modules(), self.adversarial_adapter, self.discriminator]

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.discriminator is None:
            self._build_adversarial(self.example_input())
        if self.adversarial_student_layers and self._adversarial_student_taps is None:
            self._adversarial_student_taps = FeatureTaps(self.student, self.adversarial_student_layers)
            self._adversarial_teacher_taps = FeatureTaps(self.teacher, self.adversarial_teacher_layers)

    @override
    def remove_taps(self) -> None:
        super().remove_taps()
        for taps in (self._adversarial_student_taps, self._adversarial_teacher_taps):
            if taps is not None:
                taps.remove()
        self._adversarial_student_taps = self._adversarial_teacher_taps = None

    @override
    def _clear_taps(self) -> None:
        super()._clear_taps()
        for taps in (self._adversarial_student_taps, self._adversarial_teacher_taps):
            if taps is not None:
                taps.clear()

    @override
    def active_terms(self) -> list[str]:
        names = super().active_terms()
        if self.weights["adversarial_g"] > 0 and "adversarial_g" not in names:
            names.append("adversarial_g")  # every stage of a two-stage run
        return names

    # ------------------------------------------------------------------ the game

    def discriminator_inputs(
        self, inputs: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(teacher_view, student_view)``: the ``(B, F)`` vectors the discriminator scores, the student's with its
        graph (override point). Default: logits, or the pooled tapped features (the student's through the adapter),
        with the flattened input in front when ``conditional``."""
        if self._adversarial_student_taps is not None and self._adversarial_teacher_taps is not None:
            teacher_view = pooled_features(self._adversarial_teacher_taps.features())
            student_view = self.adversarial_adapter(pooled_features(self._adversarial_student_taps.features()))
        else:
            teacher_view, student_view = teacher_logits, student_logits
        if self.conditional:
            condition = inputs.flatten(1).to(student_view.dtype)
            teacher_view = torch.cat([condition, teacher_view], dim=1)
            student_view = torch.cat([condition, student_view], dim=1)
        return teacher_view.detach(), student_view

    def adversarial_terms(
        self, teacher_view: torch.Tensor, student_view: torch.Tensor, with_generator: bool = True
    ) -> dict[str, torch.Tensor]:
        """``adversarial_g`` (gradient to the student only), ``adversarial_d`` (gradient to the discriminator only)
        and ``discriminator_acc`` (no gradient) from the two views."""
        assert self.discriminator is not None
        terms: dict[str, torch.Tensor] = {}
        if with_generator:
            with frozen(self.discriminator):
                terms["adversarial_g"] = generator_loss(self.discriminator(student_view), self.adversarial_loss)
        teacher_view, student_view = teacher_view.detach(), student_view.detach()
        teacher_scores, student_scores = self.discriminator(teacher_view), self.discriminator(student_view)
        loss = discriminator_loss(teacher_scores, student_scores, self.adversarial_loss)
        if self.adversarial_loss == "wasserstein" and self.gradient_penalty_weight > 0:
            loss = loss + self.gradient_penalty_weight * gradient_penalty(
                self.discriminator, teacher_view, student_view, self._mix(len(teacher_view)).to(teacher_view)
            )
        terms["adversarial_d"] = loss
        terms["discriminator_acc"] = discriminator_accuracy(teacher_scores.detach(), student_scores.detach(),
                                                            self.adversarial_loss)
        return terms

    def _mix(self, batch_size: int) -> torch.Tensor:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        generator = torch.Generator().manual_seed(1_000_003 * int(self.global_step) + rank)
        return torch.rand(batch_size, 1, generator=generator)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = self.split_batch(batch)
        student_logits = self.student_forward(inputs)
        teacher_logits = self.teacher_forward(inputs)
        terms = self.compute_terms(student_logits, teacher_logits, targets)
        teacher_view, student_view = self.discriminator_inputs(inputs, student_logits, teacher_logits[0])
        game = self.adversarial_terms(teacher_view, student_view, "adversarial_g" in self.active_terms())
        self._clear_taps()
        if "adversarial_g" in game:
            terms["adversarial_g"] = game["adversarial_g"]
        total = self.combine(terms)
        batch_size = len(targets)
        for name, value in {**terms, **game}.items():
            self.log_epoch(f"distill/{name}", value.detach(), batch_size)
        self.log_epoch("distill/total", total.detach(), batch_size)
        self.log_epoch("train/acc", self.accuracy(student_logits.detach(), targets), batch_size)
        return total + game["adversarial_d"]

    # ------------------------------------------------------------------ checkpoints

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As the parent's; a discriminator (and adapter) not built yet are built from the saved shapes."""
        if self.discriminator is None:
            self._build_from_state(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _build_from_state(self, state: Mapping[str, Any]) -> None:
        first = state.get(f"{_DISCRIMINATOR_PREFIX}layers.0.weight")
        if first is None:
            raise KeyError(
                f"The checkpoint has no discriminator weights ({_DISCRIMINATOR_PREFIX}layers.0.weight); give "
                "input_shape to build it, or load a checkpoint of an AdversarialDistillationModule."
            )
        self.discriminator = self.build_discriminator(int(first.shape[1]))
        adapter = state.get(f"{_ADAPTER_PREFIX}weight")
        if adapter is not None:
            self.adversarial_adapter = nn.Linear(int(adapter.shape[1]), int(adapter.shape[0]))


__all__ = [
    "ADVERSARIAL_LOSSES",
    "AdversarialDistillationModule",
    "Discriminator",
    "discriminator_accuracy",
    "discriminator_loss",
    "frozen",
    "generator_loss",
    "gradient_penalty",
    "pooled_features",
]
