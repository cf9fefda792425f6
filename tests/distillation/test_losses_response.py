"""Response-knowledge losses against hand-computed values, gradient checks and argument validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_compress.distillation.losses import (
    distillation_loss,
    hard_target_loss,
    multi_teacher_soft_target_loss,
    soft_target_loss,
)

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]]


def _softmax(row: list[float], temperature: float) -> np.ndarray:
    exps = np.exp(np.asarray(row) / temperature)
    return exps / exps.sum()


def _kl_by_hand(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """T^2 * sum_i p_i log(p_i / q_i), averaged over the rows (batchmean)."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p, q = _softmax(t_row, temperature), _softmax(s_row, temperature)
        total += sum(p_i * math.log(p_i / q_i) for p_i, q_i in zip(p, q, strict=True))
    return temperature**2 * total / len(student)


def test_soft_target_known_value_two_classes() -> None:
    # student uniform, teacher softmax([2, 0]) = [e^2, 1] / (e^2 + 1): KL = log 2 - H(p)
    p = np.array([math.e**2, 1.0]) / (math.e**2 + 1)
    expected = math.log(2) + float((p * np.log(p)).sum())
    value = soft_target_loss(torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), temperature=1.0)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.327813, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 20.0])
def test_soft_target_matches_hand_formula_with_t_squared(temperature: float) -> None:
    s, t = torch.tensor(STUDENT, dtype=torch.double), torch.tensor(TEACHER, dtype=torch.double)
    value = soft_target_loss(s, t, temperature)
    assert value.item() == pytest.approx(_kl_by_hand(STUDENT, TEACHER, temperature), rel=1e-9)


def test_soft_target_is_batchmean_not_elementwise_mean() -> None:
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    value = soft_target_loss(s, t, 2.0)
    batchmean = 4.0 * F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    pointwise = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="none")
    torch.testing.assert_close(value, batchmean)
    torch.testing.assert_close(value / 3, 4.0 * pointwise.mean())  # an element mean divides by the 3 classes too


def test_soft_target_gradient_magnitude_is_independent_of_t() -> None:
    # dL/dz = T (q - p) -> (z - v) / C for large T with zero-mean logits (Hinton et al. 2015, eq. 3): the T^2
    # factor keeps the soft gradient O(1) as T grows.
    s = torch.tensor([[0.3, -0.2, -0.1]], dtype=torch.double, requires_grad=True)
    t = torch.tensor([[0.1, 0.2, -0.3]], dtype=torch.double)
    for temperature in (10.0, 100.0, 1000.0):
        (grad,) = torch.autograd.grad(soft_target_loss(s, t, temperature), s)
        torch.testing.assert_close(grad, (s.detach() - t) / 3, rtol=0.03, atol=1e-3 * 10 / temperature)


def test_hard_target_is_cross_entropy_at_t1() -> None:
    expected = np.mean([-math.log(_softmax(row, 1.0)[label]) for row, label in zip(STUDENT, [1, 2], strict=True)])
    value = hard_target_loss(torch.tensor(STUDENT), torch.tensor([1, 2]))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_multi_teacher_uses_weighted_average_of_probabilities() -> None:
    t2 = [[0.0, 3.0, 0.0], [-1.0, 0.0, 2.0]]
    weights, temperature = (3.0, 1.0), 2.0
    total = 0.0
    for row in range(2):
        p = (3.0 * _softmax(TEACHER[row], temperature) + 1.0 * _softmax(t2[row], temperature)) / 4.0
        q = _softmax(STUDENT[row], temperature)
        total += float((p * np.log(p / q)).sum())
    expected = temperature**2 * total / 2
    value = multi_teacher_soft_target_loss(
        torch.tensor(STUDENT), [torch.tensor(TEACHER), torch.tensor(t2)], temperature, weights
    )
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_multi_teacher_gradient_equals_mean_of_single_teacher_gradients() -> None:
    s = torch.tensor(STUDENT, requires_grad=True)
    teachers = [torch.tensor(TEACHER), torch.tensor([[0.0, 3.0, 0.0], [-1.0, 0.0, 2.0]])]
    (grad_avg,) = torch.autograd.grad(multi_teacher_soft_target_loss(s, teachers, 3.0), s)
    mean = sum(soft_target_loss(s, t, 3.0) for t in teachers) / 2
    (grad_mean,) = torch.autograd.grad(mean, s)
    torch.testing.assert_close(grad_avg, grad_mean)


def test_single_teacher_equals_soft_target_loss() -> None:
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    torch.testing.assert_close(multi_teacher_soft_target_loss(s, [t], 4.0), soft_target_loss(s, t, 4.0))


def test_distillation_loss_combines_named_weights() -> None:
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor([0, 1])
    expected = 0.7 * soft_target_loss(s, t, 4.0) + 0.3 * hard_target_loss(s, y)
    torch.testing.assert_close(distillation_loss(s, t, y, 4.0, soft_weight=0.7, hard_weight=0.3), expected)


def test_gradcheck_response_losses() -> None:
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, dtype=torch.double, generator=generator, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.double, generator=generator, requires_grad=True)
    t2 = torch.randn(3, 4, dtype=torch.double, generator=generator)
    y = torch.tensor([0, 3, 1])
    assert torch.autograd.gradcheck(lambda a, b: soft_target_loss(a, b, 2.5), (s, t))
    assert torch.autograd.gradcheck(lambda a: hard_target_loss(a, y), (s,))
    assert torch.autograd.gradcheck(lambda a, b: multi_teacher_soft_target_loss(a, [b, t2], 3.0, [1, 2]), (s, t))
    assert torch.autograd.gradcheck(lambda a: distillation_loss(a, t.detach(), y, 2.0, 0.5, 0.5), (s,))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature_is_quoted(temperature: float) -> None:
    with pytest.raises(ValueError, match=f"temperature must be a finite positive number, got {temperature}"):
        soft_target_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature)


def test_mismatched_class_counts_are_quoted() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
        soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0, -0.5], r"non-negative numbers, got \[1.0, -0.5\]"), ([0.0, 0.0], r"not all be zero, got \[0.0, 0.0\]"),
     ([1.0], "one entry per item")],
)
def test_bad_teacher_weights(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        multi_teacher_soft_target_loss(torch.zeros(1, 2), [torch.zeros(1, 2)] * 2, 1.0, weights)


def test_bad_soft_hard_weights() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), 1.0, -0.1, 1.0)
    with pytest.raises(ValueError, match="not all be zero"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), 1.0, 0.0, 0.0)
