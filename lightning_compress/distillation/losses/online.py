"""Online and self-distillation losses: Deep Mutual Learning and Be Your Own Teacher."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_compress.distillation.checks import check_logits, check_nonnegative, check_temperature
from lightning_compress.distillation.losses.response import hard_target_loss, soft_target_loss


def mutual_learning_loss(
    peer_logits: Sequence[torch.Tensor], targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Deep Mutual Learning losses for ``K >= 2`` peers (Zhang, Xiang, Hospedales & Lu 2018).

    ``L_k = CE(z_k, y) + 1/(K-1) sum_{l != k} T^2 KL(p_l^T || p_k^T)``, the KL terms summed over classes and
    averaged over the batch (:func:`soft_target_loss`), the other peers' distributions detached as targets. The
    paper uses ``T = 1``. Since each ``L_k`` reaches only peer ``k``'s parameters, their sum trains all peers at once.

    Returns:
        ``(K,)`` tensor of the per-peer losses.

    Raises:
        ValueError: for fewer than 2 peers, ``temperature <= 0`` or peers with different class counts.

    >>> z = torch.zeros(1, 2)
    >>> mutual_learning_loss([z, z], torch.tensor([0]))  # CE = log 2, KL = 0
    tensor([0.6931, 0.6931])
    """
    check_temperature(temperature)
    if len(peer_logits) < 2:
        raise ValueError(f"mutual learning needs at least 2 peers, got {len(peer_logits)}.")
    for logits in peer_logits[1:]:
        check_logits(peer_logits[0], logits)
    count = len(peer_logits)
    losses = []
    for k, logits in enumerate(peer_logits):
        mimicry = sum(
            soft_target_loss(logits, other.detach(), temperature) for other_index, other in enumerate(peer_logits)
            if other_index != k
        )
        losses.append(hard_target_loss(logits, targets) + mimicry / (count - 1))
    return torch.stack(losses)


def be_your_own_teacher_loss(
    exit_logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    exit_features: Sequence[torch.Tensor] | None = None,
    alpha: float = 0.1,
    temperature: float = 3.0,
    feature_weight: float = 1e-6,
) -> torch.Tensor:
    """Self-distillation loss of "Be Your Own Teacher" (Zhang et al. 2019).

    Exits are ordered from the shallowest to the deepest; the deepest teaches the others:
    ``L = sum_i [(1 - a) CE(z_i, y) + a T^2 KL(q_deep^T || q_i^T) + lambda ||F_i - F_deep||^2]``, the deepest logits
    and features detached as targets. The sum runs over every exit, the deepest included (its KL and feature terms
    are zero, so it gets ``(1 - a) CE``). KL is summed over classes and averaged over the batch; the feature term is
    the squared L2 distance summed over each sample's features and averaged over the batch.

    Args:
        exit_logits: ``(B, C)`` logits per exit, deepest last.
        targets: ``(B,)`` labels.
        exit_features: optional features per exit (same shapes), deepest last; ``None`` drops the feature term.
        alpha: weight ``a`` in ``[0, 1]`` of the KL term (paper: 0.1).
        temperature: ``T > 0`` (paper: 3).
        feature_weight: ``lambda >= 0`` (paper: 1e-6).

    Raises:
        ValueError: for fewer than 2 exits, ``alpha`` outside ``[0, 1]``, ``temperature <= 0``, a negative
            ``feature_weight``, mismatched logits or feature shapes.

    >>> z = torch.zeros(1, 2)
    >>> be_your_own_teacher_loss([z, z], torch.tensor([0]), alpha=0.5)  # 2 * 0.5 * log 2
    tensor(0.6931)
    """
    terms = be_your_own_teacher_terms(exit_logits, targets, exit_features, temperature)
    check_nonnegative(feature_weight, "feature_weight")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}.")
    total = (1.0 - alpha) * terms["hard"] + alpha * terms["soft"]
    if "feature" in terms and feature_weight > 0:
        total = total + feature_weight * terms["feature"]
    return total


def be_your_own_teacher_terms(
    exit_logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    exit_features: Sequence[torch.Tensor] | None = None,
    temperature: float = 3.0,
) -> dict[str, torch.Tensor]:
    """The unweighted terms of :func:`be_your_own_teacher_loss`, summed over exits: ``"hard"`` (CE of every exit,
    the deepest included), ``"soft"`` (``T^2 KL(q_deep^T || q_i^T)`` of the shallower exits, batchmean) and, with
    ``exit_features``, ``"feature"`` (``||F_i - F_deep||^2`` summed over features, averaged over the batch).

    >>> z = torch.zeros(1, 2)
    >>> be_your_own_teacher_terms([z, z], torch.tensor([0]))
    {'hard': tensor(1.3863), 'soft': tensor(0.)}
    """
    check_temperature(temperature)
    if len(exit_logits) < 2:
        raise ValueError(f"self-distillation needs at least 2 exits, got {len(exit_logits)}.")
    if exit_features is not None and len(exit_features) != len(exit_logits):
        raise ValueError(
            f"exit_features must have one entry per exit ({len(exit_logits)}), got {len(exit_features)}."
        )
    deepest = exit_logits[-1].detach()
    hard, soft, feature = [hard_target_loss(exit_logits[-1], targets)], [], []
    for index, logits in enumerate(exit_logits[:-1]):
        check_logits(logits, deepest)
        hard.append(hard_target_loss(logits, targets))
        soft.append(soft_target_loss(logits, deepest, temperature))
        if exit_features is not None:
            mine, target = exit_features[index], exit_features[-1].detach()
            if mine.shape != target.shape:
                raise ValueError(
                    f"exit {index} features {tuple(mine.shape)} differ from the deepest {tuple(target.shape)}."
                )
            feature.append((mine - target).pow(2).flatten(1).sum(dim=1).mean())
    terms = {"hard": torch.stack(hard).sum(), "soft": torch.stack(soft).sum()}
    if feature:
        terms["feature"] = torch.stack(feature).sum()
    return terms


__all__ = ["be_your_own_teacher_loss", "be_your_own_teacher_terms", "mutual_learning_loss"]
