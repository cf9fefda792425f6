"""Response knowledge: soft targets (Hinton et al. 2015), hard targets and several teachers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_compress.distillation.checks import check_logits, check_temperature, check_weights


def _kl_batchmean(target_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over classes and averaged over the batch; ``0 log 0 = 0``."""
    return (torch.xlogy(target_probs, target_probs) - target_probs * log_probs).sum(dim=1).mean()


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Soft-target loss of knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network").

    ``T^2 * KL(p^T || q^T)`` with ``p^T = softmax(teacher_logits / T)``, ``q^T = softmax(student_logits / T)``.
    Normalisation: the KL divergence is summed over classes and averaged over the batch (``batchmean``, not the
    per-element ``mean`` that would also divide by the number of classes); the ``T^2`` factor keeps the gradient
    magnitude independent of ``T``. The teacher is the target: detach it (or compute it under ``no_grad``).

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits.
        temperature: softmax temperature ``T > 0``.

    Raises:
        ValueError: for ``temperature <= 0`` or logits of different shapes (e.g. different class counts).

    >>> s = torch.tensor([[0.0, 0.0]]); t = torch.tensor([[0.0, 0.0]])
    >>> soft_target_loss(s, t, temperature=2.0)
    tensor(0.)
    >>> t = torch.tensor([[2.0, 0.0]])
    >>> round(soft_target_loss(s, t, temperature=1.0).item(), 4)  # log 2 - H(softmax([2, 0]))
    0.3278
    """
    check_temperature(temperature)
    check_logits(student_logits, teacher_logits)
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * _kl_batchmean(teacher_probs, student_log_probs)


def hard_target_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hard-target loss: cross-entropy with the labels at ``T = 1``, averaged over the batch.

    >>> round(hard_target_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).item(), 4)  # log 2
    0.6931
    """
    return F.cross_entropy(student_logits, targets)


def multi_teacher_soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits_list: Sequence[torch.Tensor],
    temperature: float = 4.0,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Soft-target loss against several teachers: ``T^2 * KL(p_bar^T || q^T)`` (batchmean), where ``p_bar^T`` is
    the weighted average of the teachers' probabilities at temperature ``T`` (weights normalised to sum to 1).

    Averaging probabilities (not logits) gives the same student gradient as the weighted mean of the per-teacher
    soft losses (Hinton et al. 2015, ensembles as teachers). With one teacher it equals :func:`soft_target_loss`.

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits_list: one ``(B, C)`` tensor per teacher.
        temperature: softmax temperature ``T > 0``.
        weights: non-negative weight per teacher, not all zero; ``None`` weighs them equally.

    Raises:
        ValueError: for ``temperature <= 0``, no teachers, bad weights or mismatched shapes.

    >>> s = torch.zeros(1, 2)
    >>> multi_teacher_soft_target_loss(s, [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])], 1.0)
    tensor(0.)
    """
    check_temperature(temperature)
    if len(teacher_logits_list) == 0:
        raise ValueError("teacher_logits_list must hold at least one teacher's logits, got an empty sequence.")
    normalised = check_weights(weights, len(teacher_logits_list), "teacher weights")
    total = sum(normalised)
    target = torch.zeros_like(student_logits)
    for weight, logits in zip(normalised, teacher_logits_list, strict=True):
        check_logits(student_logits, logits)
        target = target + (weight / total) * F.softmax(logits / temperature, dim=1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * _kl_batchmean(target, student_log_probs)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    soft_weight: float = 0.9,
    hard_weight: float = 0.1,
) -> torch.Tensor:
    """``soft_weight * soft_target_loss + hard_weight * hard_target_loss`` (the ``a L_soft + b L_hard`` of Hinton
    et al. 2015), with the weights named explicitly.

    Raises:
        ValueError: for negative weights, both weights zero, or the errors of :func:`soft_target_loss`.
    """
    check_weights([soft_weight, hard_weight], 2, "(soft_weight, hard_weight)")
    return soft_weight * soft_target_loss(student_logits, teacher_logits, temperature) + hard_weight * (
        hard_target_loss(student_logits, targets)
    )
