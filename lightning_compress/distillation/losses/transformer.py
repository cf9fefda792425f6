"""Transformer knowledge: hidden states (TinyBERT, DistilBERT), self-attention distributions and value relations
(MiniLM), over ``(batch, tokens, hidden)`` states and ``(batch, heads, tokens, tokens)`` attention probabilities.

Layer numbers are 1-based transformer layers (Hugging Face ``hidden_states[0]`` is the embedding output, so layer
``l`` is ``hidden_states[l]`` and ``attentions[l - 1]``). A ``mask`` is the tokenizer's ``(batch, tokens)``
attention mask (1 for real tokens): averages run over real tokens only, and value relations ignore padded keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: Named layer mappings of :func:`layer_mapping`.
LAYER_MAPS = ("uniform", "last", "final")

#: Hidden-state losses of :func:`hidden_state_loss`.
HIDDEN_LOSSES = ("mse", "cosine")

_EPS = 1e-12


def layer_mapping(student_layers: int, teacher_layers: int, rule: str | Sequence[int] = "uniform"
                  ) -> list[tuple[int, int]]:
    """Pairs ``(student layer, teacher layer)`` (1-based) that a layer-wise loss compares.

    ``"uniform"``: student layer ``m`` with teacher layer ``m * N / M`` (rounded down; TinyBERT's ``g(m)``, Jiao et
    al. 2020); ``"last"``: the student's ``M`` layers with the teacher's last ``M``; ``"final"``: the last layer of
    each only (MiniLM, Wang et al. 2020); a list: the teacher layer of each student layer, in order (``0`` skips
    that student layer).

    >>> layer_mapping(2, 4), layer_mapping(2, 4, "last"), layer_mapping(2, 4, "final"), layer_mapping(2, 4, [1, 3])
    ([(1, 2), (2, 4)], [(1, 3), (2, 4)], [(2, 4)], [(1, 1), (2, 3)])

    Raises:
        ValueError: for layer counts below 1, an unknown rule, ``"uniform"``/``"last"`` with more student than
            teacher layers, or a list of the wrong length or with a layer out of range.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be positive, got student {student_layers}, teacher {teacher_layers}.")
    if isinstance(rule, str):
        if rule not in LAYER_MAPS:
            raise ValueError(f"layer_map={rule!r} is not one of {list(LAYER_MAPS)} or a list of teacher layers.")
        if rule == "final":
            return [(student_layers, teacher_layers)]
        if student_layers > teacher_layers:
            raise ValueError(f"layer_map={rule!r} needs no more student layers ({student_layers}) than teacher "
                             f"layers ({teacher_layers}); give an explicit list.")
        if rule == "last":
            return [(m, teacher_layers - student_layers + m) for m in range(1, student_layers + 1)]
        return [(m, m * teacher_layers // student_layers) for m in range(1, student_layers + 1)]
    teachers = [int(t) for t in rule]
    if len(teachers) != student_layers or any(not 0 <= t <= teacher_layers for t in teachers):
        raise ValueError(f"layer_map={list(rule)!r} must list one teacher layer in 0..{teacher_layers} for each of "
                         f"the {student_layers} student layers (0 skips one).")
    return [(m, t) for m, t in enumerate(teachers, start=1) if t > 0]


def _token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(batch, tokens)`` values over the real tokens of ``mask`` (all tokens without one)."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _check_states(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"{what} needs (batch, tokens, hidden) states with the same batch and tokens, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}.")


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module | None = None,
                      kind: str = "mse", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between hidden states ``(B, T, H_s)`` and ``(B, T, H_t)``; ``projection`` (a learned ``H_s -> H_t``
    map, TinyBERT's ``W_h``) is applied to the student's first.

    ``"mse"``: mean squared error over real tokens and features (TinyBERT, Jiao et al. 2020); ``"cosine"``: mean of
    ``1 - cos(h_s, h_t)`` over real tokens (DistilBERT's cosine embedding loss, Sanh et al. 2019).

    >>> s, t = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])
    >>> hidden_state_loss(s, t), hidden_state_loss(s, t, kind="cosine")
    (tensor(2.5000), tensor(1.))
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"kind={kind!r} is not one of {list(HIDDEN_LOSSES)}.")
    if projection is not None:
        student = projection(student)
    _check_states(student, teacher, "hidden_state_loss")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"hidden widths differ (student {student.shape[-1]}, teacher {teacher.shape[-1]}): give a "
                         "projection (HiddenProjection).")
    if kind == "mse":
        return _token_mean((student - teacher).pow(2).mean(dim=-1), mask)
    return _token_mean(1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8), mask)


def _kl_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of probability rows over the last dimension."""
    return (teacher * (teacher.clamp_min(_EPS).log() - student.clamp_min(_EPS).log())).sum(dim=-1)


def attention_distribution_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
                                ) -> torch.Tensor:
    """MiniLM's self-attention distribution transfer (Wang et al. 2020): ``KL(A_t || A_s)`` of each query's attention
    probabilities ``(B, heads, T, T)``, averaged over heads and real query tokens. With different head counts the
    head-averaged distributions are compared.

    >>> a = torch.full((1, 1, 2, 2), 0.5)
    >>> attention_distribution_loss(a, a)
    tensor(0.)
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"attention distributions must be (batch, heads, tokens, tokens) with the same batch and "
                         f"tokens, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}.")
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    return _token_mean(_kl_rows(teacher, student).mean(dim=1), mask)


def value_relation(values: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM's value relation ``softmax(V V^T / sqrt(d))`` per relation head: ``values`` ``(B, T, D)`` split into
    ``heads`` slices of ``d = D / heads``; ``(B, heads, T, T)``. Padded keys (``mask`` 0) get probability 0.

    >>> value_relation(torch.zeros(1, 3, 4), heads=2).shape
    torch.Size([1, 2, 3, 3])
    """
    batch, tokens, width = values.shape
    if heads < 1 or width % heads:
        raise ValueError(f"relation heads={heads} must divide the value width {width}.")
    split = values.reshape(batch, tokens, heads, width // heads).transpose(1, 2)
    scores = split @ split.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def value_relation_loss(student_values: torch.Tensor, teacher_values: torch.Tensor, heads: int = 1,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM's value-relation transfer (Wang et al. 2020): ``KL(VR_t || VR_s)`` of :func:`value_relation` rows,
    averaged over relation heads and real query tokens. Value widths may differ (the relations are ``T x T``).

    >>> v = torch.randn(2, 3, 4)
    >>> value_relation_loss(v, 2 * v, heads=2) > 0
    tensor(True)
    """
    _check_states(student_values, teacher_values, "value_relation_loss")
    student = value_relation(student_values, heads, mask)
    teacher = value_relation(teacher_values, heads, mask)
    return _token_mean(_kl_rows(teacher, student).mean(dim=1), mask)


class HiddenProjection(nn.Module):
    """A learned linear map from the student's hidden width to the teacher's (TinyBERT's ``W_h``), one per mapped
    layer pair; trained with the student and saved in its checkpoints, dropped after distillation."""

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_width, teacher_width, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


__all__ = ["HIDDEN_LOSSES", "LAYER_MAPS", "HiddenProjection", "attention_distribution_loss", "hidden_state_loss",
           "layer_mapping", "value_relation", "value_relation_loss"]
