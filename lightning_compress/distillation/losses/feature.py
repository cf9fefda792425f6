"""Intermediate-feature knowledge: FitNets hints, attention transfer and FSP matrices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress.distillation.checks import check_reduction, check_same_batch, check_weights, pool_to_common

HINT_REDUCTIONS = ("batchmean", "mean", "sum")


class HintRegressor(nn.Module):
    """The learned regressor of FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets") that maps student
    features to the teacher's width: a bias-free 1x1 convolution for ``(B, C, *spatial)`` maps (1-D, 2-D or 3-D), a
    bias-free linear layer for ``(B, C)`` vectors, the identity when the widths are equal.

    Its parameters are trained with the student and saved with it.

    Args:
        student_channels: channels (or features) of the student's hint layer.
        teacher_channels: channels (or features) of the teacher's guided layer.
        rank: rank of the features, 2 to 5 (``(B, C)`` to ``(B, C, D, H, W)``).

    >>> HintRegressor(8, 16, rank=4)(torch.zeros(2, 8, 4, 4)).shape
    torch.Size([2, 16, 4, 4])
    >>> HintRegressor(8, 8, rank=2).proj
    Identity()
    """

    def __init__(self, student_channels: int, teacher_channels: int, rank: int = 4) -> None:
        super().__init__()
        if rank not in (2, 3, 4, 5):
            raise ValueError(f"rank must be 2, 3, 4 or 5 (batch, channels, *spatial), got {rank!r}.")
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.proj: nn.Module
        if student_channels == teacher_channels:
            self.proj = nn.Identity()
        elif rank == 2:
            self.proj = nn.Linear(student_channels, teacher_channels, bias=False)
        else:
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 3]
            self.proj = conv(student_channels, teacher_channels, kernel_size=1, bias=False)

    @classmethod
    def from_features(cls, student_features: torch.Tensor, teacher_features: torch.Tensor) -> HintRegressor:
        """Build the regressor that maps example student features to the teacher's channel count."""
        if student_features.dim() != teacher_features.dim():
            raise ValueError(
                f"hint features of different ranks cannot be matched: student {tuple(student_features.shape)}, "
                f"teacher {tuple(teacher_features.shape)}."
            )
        return cls(student_features.shape[1], teacher_features.shape[1], rank=student_features.dim())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


def hint_regressors_from_state(state: Mapping[str, Any], count: int,
                               prefix: str = "regressors.") -> list[HintRegressor]:
    """The ``count`` hint regressors whose weights a state dict holds under ``<prefix><i>.proj.weight`` (an identity
    where there is none), to be built before the state is loaded into them."""
    regressors = []
    for index in range(count):
        weight = state.get(f"{prefix}{index}.proj.weight")
        rank = 2 if weight is None or weight.dim() == 2 else weight.dim()
        regressors.append(HintRegressor(1, 1) if weight is None else HintRegressor(weight.shape[1], weight.shape[0],
                                                                                 rank))
    return regressors


def hint_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    regressor: nn.Module | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """FitNets hint loss ``1/2 ||r(h_s) - h_t||^2`` (Romero et al. 2015).

    ``r`` is ``regressor`` (e.g. a :class:`HintRegressor`) or the identity. When spatial sizes still differ the
    larger map is average-pooled to the smaller one. Normalisation by ``reduction``: ``"batchmean"`` (default) sums
    the squared error over each sample's features and averages over the batch, as the per-example loss of the
    paper; ``"mean"`` averages over every element (``MSE / 2``); ``"sum"`` sums over the batch too.

    Raises:
        ValueError: for an unknown reduction or features that do not match after the regressor.

    >>> hint_loss(torch.ones(2, 3), torch.zeros(2, 3))  # 1/2 * 3 per sample
    tensor(1.5000)
    >>> hint_loss(torch.ones(2, 3), torch.zeros(2, 3), reduction="mean")
    tensor(0.5000)
    """
    check_reduction(reduction, HINT_REDUCTIONS)
    check_same_batch(student_features, teacher_features)
    if regressor is not None:
        student_features = regressor(student_features)
    if student_features.dim() > 2:
        student_features, teacher_features = pool_to_common(student_features, teacher_features)
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"hint features do not match after the regressor: student {tuple(student_features.shape)}, teacher "
            f"{tuple(teacher_features.shape)}; give a regressor that maps the student's channels to the teacher's."
        )
    squared = (student_features - teacher_features).pow(2)
    if reduction == "mean":
        return 0.5 * squared.mean()
    total = 0.5 * squared.sum()
    return total / squared.shape[0] if reduction == "batchmean" else total


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (2017, "Paying More Attention to Attention").

    ``normalize(flatten(mean_c |A_c|^p))``: the channel mean of the ``p``-th power of the absolute activations,
    flattened over the spatial positions and divided by its L2 norm, per sample.

    Args:
        features: ``(B, C, *spatial)`` activations.
        p: power applied to the activations (the paper uses 2).

    Returns:
        ``(B, prod(spatial))`` unit-norm maps.

    >>> attention_map(torch.tensor([[[[3.0, 4.0]]], [[[0.0, 2.0]]]]))  # channel mean of squares: [9, 16], [0, 4]
    tensor([[0.4903, 0.8716],
            [0.0000, 1.0000]])
    """
    if features.dim() < 3:
        raise ValueError(f"attention maps need (batch, channels, *spatial) features, got {tuple(features.shape)}.")
    if not p > 0:
        raise ValueError(f"p must be positive, got {p!r}.")
    energy = features.abs().pow(p).mean(dim=1).flatten(1)
    return torch.nn.functional.normalize(energy, p=2.0, dim=1)


def attention_loss(
    student_features: torch.Tensor | Sequence[torch.Tensor],
    teacher_features: torch.Tensor | Sequence[torch.Tensor],
    p: float = 2.0,
) -> torch.Tensor:
    """Attention-transfer loss (Zagoruyko & Komodakis 2017), as in the authors' code.

    For each pair of maps: ``mean((a_s - a_t)^2)`` over the batch and the spatial positions, with ``a`` from
    :func:`attention_map`; the larger map is average-pooled to the smaller spatial size first (channel counts may
    differ). Several pairs are summed. The authors multiply the result by ``beta = 1000`` (``beta / 2`` per layer in
    the paper) for 32x32 CIFAR maps: apply it as the loss weight, but note that the mean over positions makes the
    value scale like ``1 / (H W)``, so small maps need a smaller weight (on 8x8 digits with maps of 64, 16 and 4
    positions, 1000 swamps the cross-entropy and the student stays at chance).

    Raises:
        ValueError: for pair lists of different lengths, different batch sizes or ranks.

    >>> a = torch.ones(1, 2, 2, 2)
    >>> attention_loss(a, 2 * a)  # the normalised maps are equal
    tensor(0.)
    """
    students, teachers = _as_pairs(student_features, teacher_features)
    terms = []
    for student, teacher in zip(students, teachers, strict=True):
        check_same_batch(student, teacher)
        student, teacher = pool_to_common(student, teacher)
        terms.append((attention_map(student, p) - attention_map(teacher, p)).pow(2).mean())
    return torch.stack(terms).sum()


def _as_pairs(
    student: torch.Tensor | Sequence[torch.Tensor], teacher: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    students = [student] if isinstance(student, torch.Tensor) else list(student)
    teachers = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    if len(students) != len(teachers) or not students:
        raise ValueError(
            f"student and teacher feature lists must have the same non-zero length, got {len(students)} and "
            f"{len(teachers)}."
        )
    return students, teachers


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure matrix (Yim et al. 2017, "A Gift from Knowledge Distillation").

    ``G = F1 F2^T / (H W)`` for two maps of one network, ``F1: (B, C1, H, W)`` and ``F2: (B, C2, H, W)``, i.e.
    ``G[b, i, j] = sum_{h,w} F1[b, i, h, w] F2[b, j, h, w] / (H W)``. When the spatial sizes differ the larger map
    is average-pooled to the smaller one first.

    Returns:
        ``(B, C1, C2)``.

    >>> fsp_matrix(torch.ones(1, 2, 2, 2), torch.full((1, 1, 4, 4), 3.0))
    tensor([[[3.],
             [3.]]])
    """
    if a.dim() < 3 or a.dim() != b.dim():
        raise ValueError(
            f"fsp_matrix needs two (batch, channels, *spatial) maps of the same rank, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    check_same_batch(a, b)
    a, b = pool_to_common(a, b)
    a, b = a.flatten(2), b.flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[2]


def fsp_loss(
    student_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    teacher_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """FSP loss (Yim et al. 2017): ``sum_i w_i * mean_b ||G_s^i - G_t^i||_F^2``.

    Normalisation: the squared Frobenius (L2) norm of the difference of the ``(C1, C2)`` FSP matrices, summed over
    their entries and averaged over the batch, as in the paper (torchdistill uses the unsquared norm, RepDistiller
    the element mean). Each pair holds two maps of one network (e.g. a stage's input and output); the student's and
    the teacher's FSP matrices must have the same ``(C1, C2)``.

    Args:
        student_pairs: ``[(F1, F2), ...]`` of the student.
        teacher_pairs: the corresponding pairs of the teacher.
        weights: non-negative weight per pair, not all zero; ``None`` gives 1 each.

    Raises:
        ValueError: for pair lists of different lengths, bad weights, or FSP matrices of different shapes.

    >>> x = torch.ones(2, 1, 2, 2)
    >>> fsp_loss([(x, x)], [(x, 2 * x)])  # G_s = 1, G_t = 2
    tensor(1.)
    """
    if len(student_pairs) != len(teacher_pairs) or not student_pairs:
        raise ValueError(
            f"student_pairs and teacher_pairs must have the same non-zero length, got {len(student_pairs)} and "
            f"{len(teacher_pairs)}."
        )
    weights = check_weights(weights, len(student_pairs), "FSP pair weights")
    terms = []
    for index, (weight, (s1, s2), (t1, t2)) in enumerate(zip(weights, student_pairs, teacher_pairs, strict=True)):
        g_s, g_t = fsp_matrix(s1, s2), fsp_matrix(t1, t2)
        if g_s.shape != g_t.shape:
            raise ValueError(
                f"FSP pair {index}: student matrix {tuple(g_s.shape)} and teacher matrix {tuple(g_t.shape)} differ; "
                f"the paired layers need the same channel counts."
            )
        terms.append(weight * (g_s - g_t).pow(2).sum(dim=(1, 2)).mean())
    return torch.stack(terms).sum()
