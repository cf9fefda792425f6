"""Relation and structural losses (SP, RKD, Structured KD pair-wise) against explicit numpy loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lightning_compress.distillation.losses import (
    batch_similarity,
    pairwise_similarity_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
    spatial_similarity,
)

RNG = np.random.default_rng(1)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).double()


def _huber(x: float, y: float) -> float:
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def _sp_matrix(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(array.shape[0], -1)
    b = flat.shape[0]
    g = np.array([[float(np.dot(flat[i], flat[j])) for j in range(b)] for i in range(b)])
    return np.stack([row / math.sqrt((row**2).sum()) for row in g])


def test_similarity_preserving_by_hand() -> None:
    student, teacher = RNG.normal(size=(4, 3, 2, 2)), RNG.normal(size=(4, 7))
    expected = ((_sp_matrix(student) - _sp_matrix(teacher)) ** 2).sum() / 16
    assert similarity_preserving_loss(_t(student), _t(teacher)).item() == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(batch_similarity(_t(teacher)).numpy(), _sp_matrix(teacher), rtol=1e-12)


def _distances(x: np.ndarray) -> dict[tuple[int, int], float]:
    b = x.shape[0]
    return {(i, j): math.sqrt(((x[i] - x[j]) ** 2).sum()) for i in range(b) for j in range(b) if i != j}


def test_rkd_distance_by_hand() -> None:
    student, teacher = RNG.normal(size=(4, 3)), 3.0 * RNG.normal(size=(4, 5))
    ds, dt = _distances(student), _distances(teacher)
    mu_s, mu_t = sum(ds.values()) / len(ds), sum(dt.values()) / len(dt)
    expected = sum(_huber(ds[k] / mu_s, dt[k] / mu_t) for k in ds) / len(ds)
    assert rkd_distance_loss(_t(student), _t(teacher)).item() == pytest.approx(expected, rel=1e-12)


def test_rkd_distance_uses_huber_beyond_one() -> None:
    # Two points: both normalised distances are 1, so 0; with 3 points large deviations are linear (|d| - 1/2).
    student = np.array([[0.0], [1.0], [100.0]])
    teacher = np.array([[0.0], [100.0], [101.0]])
    ds, dt = _distances(student), _distances(teacher)
    mu_s, mu_t = sum(ds.values()) / 6, sum(dt.values()) / 6
    expected = sum(_huber(ds[k] / mu_s, dt[k] / mu_t) for k in ds) / 6
    assert rkd_distance_loss(_t(student), _t(teacher)).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss", [rkd_distance_loss, rkd_angle_loss])
def test_rkd_gradients_stay_finite_with_duplicate_samples(loss) -> None:
    """Two equal samples in a batch (a duplicate image, features zeroed by ReLU) must not give NaN gradients."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    teacher = torch.randn(4, 16, generator=generator, dtype=torch.float64)
    student[1], teacher[3] = student[0], teacher[2]
    student.requires_grad_(True)
    value = loss(student, teacher)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
    # The duplicate pair's distance is 0 for both: the loss equals the hand value over the pairs.
    if loss is rkd_distance_loss:
        ds, dt = _distances(student.detach().numpy()), _distances(teacher.numpy())
        mu_s, mu_t = sum(ds.values()) / len(ds), sum(dt.values()) / len(dt)
        expected = sum(_huber(ds[k] / mu_s, dt[k] / mu_t) for k in ds) / len(ds)
        assert value.item() == pytest.approx(expected, abs=1e-5)


def _cosines(x: np.ndarray) -> list[float]:
    out = []
    for i, j, k in itertools.permutations(range(x.shape[0]), 3):
        e_ij, e_kj = x[i] - x[j], x[k] - x[j]
        out.append(float(np.dot(e_ij, e_kj) / math.sqrt((e_ij**2).sum() * (e_kj**2).sum())))
    return out


def test_rkd_angle_by_hand() -> None:
    student, teacher = RNG.normal(size=(4, 2, 2)), RNG.normal(size=(4, 6))
    cs, ct = _cosines(student.reshape(4, -1)), _cosines(teacher)
    expected = sum(_huber(a, b) for a, b in zip(cs, ct, strict=True)) / len(cs)
    assert len(cs) == 4 * 3 * 2
    assert rkd_angle_loss(_t(student), _t(teacher)).item() == pytest.approx(expected, rel=1e-12)


def test_rkd_batch_size_errors() -> None:
    with pytest.raises(ValueError, match="at least 2, got 1"):
        rkd_distance_loss(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="at least 3, got 2"):
        rkd_angle_loss(torch.randn(2, 2), torch.randn(2, 2))


def _spatial_by_hand(array: np.ndarray) -> np.ndarray:
    b, c = array.shape[:2]
    flat = array.reshape(b, c, -1)
    n = flat.shape[2]
    out = np.zeros((b, n, n))
    for s in range(b):
        for i in range(n):
            for j in range(n):
                fi, fj = flat[s, :, i], flat[s, :, j]
                out[s, i, j] = np.dot(fi, fj) / math.sqrt((fi**2).sum() * (fj**2).sum())
    return out


def _maxpool2(array: np.ndarray) -> np.ndarray:
    b, c, h, w = array.shape
    return array.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def test_spatial_similarity_by_hand() -> None:
    features = RNG.normal(size=(2, 3, 2, 3))
    np.testing.assert_allclose(spatial_similarity(_t(features)).numpy(), _spatial_by_hand(features), rtol=1e-12)


def test_pairwise_loss_by_hand_with_and_without_node_pooling() -> None:
    student, teacher = RNG.normal(size=(2, 3, 4, 4)), RNG.normal(size=(2, 5, 4, 4))
    diff = _spatial_by_hand(student) - _spatial_by_hand(teacher)
    expected = sum((diff[s] ** 2).sum() for s in range(2)) / 16**2 / 2
    assert pairwise_similarity_loss(_t(student), _t(teacher)).item() == pytest.approx(expected, rel=1e-12)
    diff = _spatial_by_hand(_maxpool2(student)) - _spatial_by_hand(_maxpool2(teacher))
    expected = sum((diff[s] ** 2).sum() for s in range(2)) / 4**2 / 2
    value = pairwise_similarity_loss(_t(student), _t(teacher), scale=0.5)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"scale must lie in \(0, 1\], got 1.5"):
        pairwise_similarity_loss(_t(student), _t(teacher), scale=1.5)


def test_gradcheck_relation_losses() -> None:
    generator = torch.Generator().manual_seed(2)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.double, generator=generator, requires_grad=True)

    assert torch.autograd.gradcheck(similarity_preserving_loss, (rand(4, 2, 2, 2), rand(4, 5)))
    assert torch.autograd.gradcheck(rkd_distance_loss, (rand(4, 3), rand(4, 6)))
    assert torch.autograd.gradcheck(rkd_angle_loss, (rand(4, 3), rand(4, 6)))
    assert torch.autograd.gradcheck(pairwise_similarity_loss, (rand(2, 3, 2, 2), rand(2, 4, 4, 4)))
    assert torch.autograd.gradcheck(
        lambda a, b: pairwise_similarity_loss(a, b, 0.5), (rand(2, 3, 4, 4), rand(2, 2, 4, 4))
    )
