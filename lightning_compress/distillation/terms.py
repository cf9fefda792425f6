"""The feature and relation terms of :class:`~.module.DistillationModule` over tapped layer pairs (no Lightning)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from lightning_compress.distillation import losses
from lightning_compress.distillation.checks import check_count, check_nonnegative
from lightning_compress.distillation.taps import LayerPair, check_layer_names

#: Response terms, computed from the logits.
RESPONSE_TERMS = ("soft", "hard")

#: Terms that read the tapped layers, and the layer-pair verdicts (:class:`~.features.LayerPair`) each accepts.
FEATURE_TERMS: dict[str, tuple[str, ...]] = {
    "hint": ("same", "channels", "spatial", "channels+spatial"),
    "attention": ("same", "channels", "spatial", "channels+spatial"),
    "fsp": ("same", "spatial"),
    "similarity": ("same", "channels", "spatial", "channels+spatial", "rank"),
    "rkd_distance": ("same", "channels", "spatial", "channels+spatial", "rank"),
    "rkd_angle": ("same", "channels", "spatial", "channels+spatial", "rank"),
    "pairwise": ("same", "channels", "spatial", "channels+spatial"),
}

#: Terms over maps with spatial positions: ``(batch, channels, *spatial)`` layers, not ``(batch, features)`` vectors.
SPATIAL_TERMS = ("attention", "fsp", "pairwise")

_PER_PAIR = {
    "similarity": losses.similarity_preserving_loss,
    "rkd_distance": losses.rkd_distance_loss,
    "rkd_angle": losses.rkd_angle_loss,
    "pairwise": losses.pairwise_similarity_loss,
}

_MIN_BATCH = {"rkd_distance": 2, "rkd_angle": 3}


def feature_terms(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    active: Sequence[str],
    regressors: Sequence[nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """Unweighted feature terms over paired tapped layers ``student[i] <-> teacher[i]``.

    ``hint``: sum over pairs of :func:`~.losses.hint_loss` through ``regressors[i]``; ``attention``:
    :func:`~.losses.attention_loss` summed over pairs; ``fsp``: :func:`~.losses.fsp_loss` over consecutive layers
    ``(l0, l1), (l1, l2), ...`` of each network; ``similarity``, ``rkd_distance``, ``rkd_angle``, ``pairwise``: the
    loss summed over pairs. Only the names in ``active`` are computed. A batch too small for RKD (fewer than 2
    samples for distances, 3 for angles) gives 0 for that term.

    >>> x = [torch.ones(2, 3, 4, 4)]
    >>> feature_terms(x, x, ["attention", "similarity"])
    {'attention': tensor(0.), 'similarity': tensor(0.)}
    """
    terms: dict[str, torch.Tensor] = {}
    pairs = list(zip(student, teacher, strict=True))
    if "hint" in active:
        regressors = list(regressors) if regressors is not None else [nn.Identity()] * len(pairs)
        terms["hint"] = torch.stack(
            [losses.hint_loss(s, t, r) for (s, t), r in zip(pairs, regressors, strict=True)]
        ).sum()
    if "attention" in active:
        terms["attention"] = losses.attention_loss(list(student), list(teacher))
    if "fsp" in active:
        terms["fsp"] = losses.fsp_loss(list(pairwise(student)), list(pairwise(teacher)))
    for name, loss in _PER_PAIR.items():
        if name in active:
            if pairs and pairs[0][0].shape[0] < _MIN_BATCH.get(name, 1):
                terms[name] = pairs[0][0].new_zeros(())  # e.g. a last batch of one sample: no relation to keep
            else:
                terms[name] = torch.stack([loss(s, t) for s, t in pairs]).sum()
    return terms


def validate_term_weights(**weights: float) -> dict[str, float]:
    """Every weight finite and non-negative, at least one positive; returned as floats by term."""
    checked = {name: check_nonnegative(value, f"{name}_weight") for name, value in weights.items()}
    if not any(value > 0 for value in checked.values()):
        raise ValueError(f"At least one loss weight must be positive, got {weights!r}.")
    return checked


def check_spatial(pairs: list[LayerPair], term: str, student: nn.Module | None = None,
                  teacher: nn.Module | None = None) -> None:
    """``term`` reads maps with spatial positions: refuse a pair of ``(batch, features)`` vectors before training
    (and, for ``attention`` given the networks, token-shaped states: :func:`check_not_tokens`)."""
    if term == "attention" and student is not None and teacher is not None:
        check_not_tokens(pairs, student, teacher)
    for pair in pairs:
        if len(pair.student_shape) < 3:
            raise ValueError(
                f"{term} needs (batch, channels, *spatial) feature maps, got student {pair.student_layer!r} "
                f"{pair.student_shape} and teacher {pair.teacher_layer!r} {pair.teacher_shape}; tap convolutional "
                f"layers for {term}, or use hint, similarity or rkd terms on vector layers."
            )


#: Layers whose ``(batch, channels, length)`` outputs are 1-d feature maps, not ``(batch, tokens, hidden)`` states.
MAP_LAYERS_1D = (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)


def check_not_tokens(pairs: list[LayerPair], student: nn.Module, teacher: nn.Module) -> None:
    """Attention transfer treats dimension 1 as channels: refuse a 3-d output of anything but a 1-d convolution,
    pooling or BatchNorm, a transformer's ``(batch, tokens, hidden)`` states, before training."""
    for pair in pairs:
        for network, name, shape in ((student, pair.student_layer, pair.student_shape),
                                     (teacher, pair.teacher_layer, pair.teacher_shape)):
            if len(shape) == 3 and not isinstance(network.get_submodule(name), MAP_LAYERS_1D):
                raise ValueError(
                    f"attention (Zagoruyko & Komodakis) reads (batch, channels, *spatial) maps, but {name!r} of "
                    f"{type(network).__name__} gives {shape}, token-shaped (batch, tokens, hidden) states of a "
                    "transformer (it would treat tokens as channels). For transformers use "
                    "transformer=TransformerKnowledge(attention_weight=..., hidden_weight=...) (README, 'Distilling "
                    "transformers'), or the hint term on these layers.")


def check_feature_layers(student: nn.Module, teacher: nn.Module, student_layers: Sequence[str],
                         teacher_layers: Sequence[str], weights: dict[str, float], feature_stage_epochs: int) -> None:
    """The tapped layers pair up, exist, and suit the active feature terms; the two-stage options are consistent."""
    if len(student_layers) != len(teacher_layers):
        raise ValueError(
            f"student_layers and teacher_layers must pair up one to one, got {len(student_layers)} and "
            f"{len(teacher_layers)}: {student_layers} vs {teacher_layers}."
        )
    check_layer_names(student, student_layers, "student")
    check_layer_names(teacher, teacher_layers, "teacher")
    active = [name for name in FEATURE_TERMS if weights[name] > 0]
    if active and not student_layers:
        raise ValueError(f"Feature terms {active} need student_layers and teacher_layers; none were given.")
    if weights["fsp"] > 0 and len(student_layers) < 2:
        raise ValueError(f"fsp needs at least 2 tapped layers per network, got {student_layers}.")
    check_count(feature_stage_epochs, "feature_stage_epochs")
    if feature_stage_epochs > 0 and not active:
        raise ValueError(
            f"feature_stage_epochs={feature_stage_epochs} needs a positive feature weight among "
            f"{list(FEATURE_TERMS)}."
        )
    if feature_stage_epochs > 0 and not (weights["soft"] > 0 or weights["hard"] > 0):
        raise ValueError(
            f"feature_stage_epochs={feature_stage_epochs}: the task stage after it trains on soft and hard only, "
            "so soft_weight or hard_weight must be positive (both are 0)."
        )


def unbalanced_terms(terms: dict[str, torch.Tensor], weights: dict[str, float], ratio: float = 10.0) -> str | None:
    """A warning when a weighted feature term is more than ``ratio`` times the weighted response terms (soft +
    hard), with the weight that would bring it to their scale; ``None`` when balanced.

    FitNets hints sum squared errors over every feature of a sample (hundreds on a conv map) where the soft and hard
    terms are a few units: at equal weights the student only copies features and hardly learns the task.

    >>> unbalanced_terms({"soft": torch.tensor(2.0), "hint": torch.tensor(200.0)}, {"soft": 1.0, "hint": 1.0})[:60]
    'hint term is 100x the soft and hard terms (200 against 2 at '
    """
    response = sum(float(weights[n] * terms[n].detach()) for n in RESPONSE_TERMS if n in terms)
    if response <= 0:
        return None
    for name in FEATURE_TERMS:
        if name in terms and float(weights[name] * terms[name].detach()) > ratio * response:
            weighted = float(weights[name] * terms[name].detach())
            return (f"{name} term is {weighted / response:.0f}x the soft and hard terms ({weighted:.3g} against "
                    f"{response:.3g} at the first step); {name}_weight={weights[name] * response / weighted:.2g} "
                    "brings it to their scale")
    return None
