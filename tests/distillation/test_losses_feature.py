"""Feature losses (hints, attention transfer, FSP) against values computed by hand with explicit numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress.distillation.losses import (
    HintRegressor,
    attention_loss,
    attention_map,
    fsp_loss,
    fsp_matrix,
    hint_loss,
)

RNG = np.random.default_rng(0)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).double()


def _avgpool2(array: np.ndarray) -> np.ndarray:
    """2x2 average pooling of a (B, C, H, W) array, written out."""
    b, c, h, w = array.shape
    out = np.zeros((b, c, h // 2, w // 2))
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, :, i, j] = array[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(2, 3))
    return out


# ---------------------------------------------------------------- hints


def test_hint_loss_with_linear_regressor_by_hand() -> None:
    student, teacher = RNG.normal(size=(3, 2)), RNG.normal(size=(3, 4))
    regressor = HintRegressor(2, 4, rank=2).double()
    weight = RNG.normal(size=(4, 2))
    with torch.no_grad():
        regressor.proj.weight.copy_(_t(weight))
    total = 0.0
    for b in range(3):
        mapped = [sum(weight[o, i] * student[b, i] for i in range(2)) for o in range(4)]
        total += 0.5 * sum((mapped[o] - teacher[b, o]) ** 2 for o in range(4))
    value = hint_loss(_t(student), _t(teacher), regressor)
    assert value.item() == pytest.approx(total / 3, rel=1e-12)
    assert hint_loss(_t(student), _t(teacher), regressor, reduction="sum").item() == pytest.approx(total, rel=1e-12)
    assert hint_loss(_t(student), _t(teacher), regressor, reduction="mean").item() == pytest.approx(
        total / 12, rel=1e-12
    )


def test_hint_loss_conv_regressor_and_pooling_of_the_larger_map() -> None:
    student, teacher = RNG.normal(size=(2, 3, 4, 4)), RNG.normal(size=(2, 5, 2, 2))
    regressor = HintRegressor(3, 5, rank=4).double()
    weight = regressor.proj.weight.detach().numpy()[:, :, 0, 0]
    mapped = np.einsum("oc,bchw->bohw", weight, student)
    expected = 0.5 * ((_avgpool2(mapped) - teacher) ** 2).sum() / 2
    assert hint_loss(_t(student), _t(teacher), regressor).item() == pytest.approx(expected, rel=1e-12)


def test_hint_regressor_kinds() -> None:
    assert isinstance(HintRegressor(4, 4).proj, nn.Identity)
    assert isinstance(HintRegressor(4, 8, rank=2).proj, nn.Linear)
    assert isinstance(HintRegressor(4, 8, rank=3).proj, nn.Conv1d)
    conv = HintRegressor.from_features(torch.zeros(1, 4, 3, 3), torch.zeros(1, 8, 3, 3)).proj
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    with pytest.raises(ValueError, match="different ranks"):
        HintRegressor.from_features(torch.zeros(1, 4, 3, 3), torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"rank must be 2, 3, 4 or 5.*got 6"):
        HintRegressor(1, 2, rank=6)


def test_hint_loss_errors() -> None:
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        hint_loss(torch.zeros(1, 2), torch.zeros(1, 2), reduction="avg")
    with pytest.raises(ValueError, match="do not match after the regressor"):
        hint_loss(torch.zeros(1, 2), torch.zeros(1, 3))


# ---------------------------------------------------------------- attention


def _attention_by_hand(array: np.ndarray, p: float = 2.0) -> np.ndarray:
    b, c = array.shape[:2]
    out = []
    for i in range(b):
        energy = sum(np.abs(array[i, k]) ** p for k in range(c)) / c
        flat = energy.reshape(-1)
        out.append(flat / np.sqrt((flat**2).sum()))
    return np.stack(out)


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_attention_map_by_hand(p: float) -> None:
    features = RNG.normal(size=(2, 3, 3, 2))
    np.testing.assert_allclose(attention_map(_t(features), p).numpy(), _attention_by_hand(features, p), rtol=1e-12)


def test_attention_map_of_a_known_tensor() -> None:
    # channel mean of squares [[9, 16]] -> normalised [9, 16] / sqrt(337)
    features = torch.tensor([[[[3.0, 4.0]], [[3.0, 4.0]]]])
    expected = torch.tensor([[9.0, 16.0]]) / 337**0.5
    torch.testing.assert_close(attention_map(features), expected)


def test_attention_loss_by_hand_with_pooling_and_two_layers() -> None:
    s1, t1 = RNG.normal(size=(2, 3, 4, 4)), RNG.normal(size=(2, 6, 2, 2))  # teacher smaller: pool the student
    s2, t2 = RNG.normal(size=(2, 2, 2, 2)), RNG.normal(size=(2, 5, 2, 2))
    first = ((_attention_by_hand(_avgpool2(s1)) - _attention_by_hand(t1)) ** 2).mean()
    second = ((_attention_by_hand(s2) - _attention_by_hand(t2)) ** 2).mean()
    value = attention_loss([_t(s1), _t(s2)], [_t(t1), _t(t2)])
    assert value.item() == pytest.approx(first + second, rel=1e-12)


def test_attention_loss_list_length_mismatch() -> None:
    with pytest.raises(ValueError, match="same non-zero length, got 2 and 1"):
        attention_loss([torch.zeros(1, 1, 2, 2)] * 2, [torch.zeros(1, 1, 2, 2)])


# ---------------------------------------------------------------- FSP


def _fsp_by_hand(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    batch, c1, h, w = a.shape
    c2 = b.shape[1]
    out = np.zeros((batch, c1, c2))
    for n in range(batch):
        for i in range(c1):
            for j in range(c2):
                out[n, i, j] = sum(a[n, i, y, x] * b[n, j, y, x] for y in range(h) for x in range(w)) / (h * w)
    return out


def test_fsp_matrix_normalised_by_hw() -> None:
    a, b = RNG.normal(size=(2, 3, 3, 3)), RNG.normal(size=(2, 4, 3, 3))
    np.testing.assert_allclose(fsp_matrix(_t(a), _t(b)).numpy(), _fsp_by_hand(a, b), rtol=1e-12)
    assert fsp_matrix(_t(a), _t(b)).shape == (2, 3, 4)


def test_fsp_matrix_pools_the_larger_map() -> None:
    a, b = RNG.normal(size=(1, 2, 4, 4)), RNG.normal(size=(1, 3, 2, 2))
    np.testing.assert_allclose(fsp_matrix(_t(a), _t(b)).numpy(), _fsp_by_hand(_avgpool2(a), b), rtol=1e-12)
    np.testing.assert_allclose(fsp_matrix(_t(b), _t(a)).numpy(), _fsp_by_hand(b, _avgpool2(a)), rtol=1e-12)


def test_fsp_loss_squared_frobenius_mean_over_batch_weighted() -> None:
    shapes = [((3, 2, 2, 2), (3, 3, 2, 2)), ((3, 1, 4, 4), (3, 2, 4, 4))]
    student = [(RNG.normal(size=x), RNG.normal(size=y)) for x, y in shapes]
    teacher = [(RNG.normal(size=x), RNG.normal(size=y)) for x, y in shapes]
    weights = [0.5, 2.0]
    expected = 0.0
    for weight, (s1, s2), (t1, t2) in zip(weights, student, teacher, strict=True):
        diff = _fsp_by_hand(s1, s2) - _fsp_by_hand(t1, t2)
        expected += weight * sum((diff[n] ** 2).sum() for n in range(3)) / 3
    value = fsp_loss([(_t(a), _t(b)) for a, b in student], [(_t(a), _t(b)) for a, b in teacher], weights)
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_fsp_loss_errors() -> None:
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="same channel counts"):
        fsp_loss([(x, x)], [(x, torch.zeros(1, 3, 2, 2))])
    with pytest.raises(ValueError, match=r"non-negative numbers, got \[-1.0\]"):
        fsp_loss([(x, x)], [(x, x)], [-1.0])
    with pytest.raises(ValueError, match=r"not all be zero, got \[0.0\]"):
        fsp_loss([(x, x)], [(x, x)], [0.0])
    with pytest.raises(ValueError, match="same non-zero length"):
        fsp_loss([(x, x)], [])


# ---------------------------------------------------------------- gradients


def test_gradcheck_feature_losses() -> None:
    generator = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.double, generator=generator, requires_grad=True)

    s4, t4 = rand(2, 3, 4, 4), rand(2, 5, 2, 2)
    regressor = HintRegressor(3, 5).double()
    assert torch.autograd.gradcheck(lambda a, b: hint_loss(a, b, regressor), (s4, t4))
    assert torch.autograd.gradcheck(lambda a: attention_map(a, 2.0), (s4,))
    assert torch.autograd.gradcheck(lambda a, b: attention_loss(a, b), (s4, t4))
    s2 = rand(2, 2, 2, 2)
    assert torch.autograd.gradcheck(fsp_matrix, (s4, s2))
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: fsp_loss([(a, b)], [(c, d)], [2.0]),
        (s2, rand(2, 3, 2, 2), rand(2, 2, 4, 4), rand(2, 3, 2, 2)),
    )
