"""Deep Mutual Learning and Be Your Own Teacher losses against explicit numpy formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_compress.distillation.losses import (
    be_your_own_teacher_loss,
    be_your_own_teacher_terms,
    mutual_learning_loss,
)

RNG = np.random.default_rng(2)


def _softmax(row: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    e = np.exp(row / temperature)
    return e / e.sum()


def _ce(logits: np.ndarray, labels: list[int]) -> float:
    return float(np.mean([-math.log(_softmax(row)[y]) for row, y in zip(logits, labels, strict=True)]))


def _kl(target_logits: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    """T^2 * batch mean of sum_c p log(p / q)."""
    total = 0.0
    for t_row, s_row in zip(target_logits, logits, strict=True):
        p, q = _softmax(t_row, temperature), _softmax(s_row, temperature)
        total += float((p * np.log(p / q)).sum())
    return temperature**2 * total / len(logits)


def test_mutual_learning_three_peers_by_hand() -> None:
    peers = [RNG.normal(size=(3, 4)) for _ in range(3)]
    labels = [0, 2, 3]
    expected = [
        _ce(peers[k], labels) + sum(_kl(peers[other], peers[k], 2.0) for other in range(3) if other != k) / 2
        for k in range(3)
    ]
    value = mutual_learning_loss([torch.from_numpy(p) for p in peers], torch.tensor(labels), temperature=2.0)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-12)


def test_mutual_learning_detaches_the_other_peers() -> None:
    a = torch.randn(2, 3, requires_grad=True)
    b = torch.randn(2, 3, requires_grad=True)
    losses = mutual_learning_loss([a, b], torch.tensor([0, 1]))
    (grad_b,) = torch.autograd.grad(losses[0], b, allow_unused=True)
    assert grad_b is None or not grad_b.any()  # peer 0's loss does not reach peer 1


def test_mutual_learning_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 peers, got 1"):
        mutual_learning_loss([torch.zeros(1, 2)], torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(1, 2\) and \(1, 3\)"):
        mutual_learning_loss([torch.zeros(1, 2), torch.zeros(1, 3)], torch.tensor([0]))
    with pytest.raises(ValueError, match="temperature must be a finite positive number, got 0"):
        mutual_learning_loss([torch.zeros(1, 2)] * 2, torch.tensor([0]), temperature=0)


def test_byot_by_hand_with_defaults() -> None:
    logits = [RNG.normal(size=(2, 3)) for _ in range(3)]
    features = [RNG.normal(size=(2, 4)) for _ in range(3)]
    labels = [1, 2]
    a, temperature, lam = 0.1, 3.0, 1e-6
    expected = (1 - a) * _ce(logits[2], labels)
    for i in range(2):
        expected += (1 - a) * _ce(logits[i], labels) + a * _kl(logits[2], logits[i], temperature)
        expected += lam * sum(((features[i][b] - features[2][b]) ** 2).sum() for b in range(2)) / 2
    value = be_your_own_teacher_loss(
        [torch.from_numpy(x) for x in logits], torch.tensor(labels), [torch.from_numpy(f) for f in features]
    )
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_byot_detaches_the_deepest_exit() -> None:
    shallow = torch.randn(2, 3, requires_grad=True)
    deep = torch.randn(2, 3, requires_grad=True)
    loss = be_your_own_teacher_loss([shallow, deep], torch.tensor([0, 1]), alpha=1.0)  # KL only
    (grad_deep,) = torch.autograd.grad(loss, deep, allow_unused=True)
    assert grad_deep is None or not grad_deep.any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"alpha": 1.5}, r"alpha must lie in \[0, 1\], got 1.5"), ({"temperature": -2.0}, "got -2.0"),
     ({"feature_weight": -1.0}, "feature_weight must be a finite non-negative number, got -1.0")],
)
def test_byot_errors(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        be_your_own_teacher_loss([torch.zeros(1, 2)] * 2, torch.tensor([0]), **kwargs)
    with pytest.raises(ValueError, match="at least 2 exits, got 1"):
        be_your_own_teacher_loss([torch.zeros(1, 2)], torch.tensor([0]))


def test_gradcheck_online_losses() -> None:
    generator = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.double, generator=generator, requires_grad=True)

    # The targets are detached, so each loss is checked against the inputs it trains, the targets held fixed.
    y = torch.tensor([0, 2])
    b, c = rand(2, 3).detach(), rand(2, 3).detach()
    assert torch.autograd.gradcheck(lambda a: mutual_learning_loss([a, b, c], y, 2.0)[0], (rand(2, 3),))
    deep, deep_features = rand(2, 3).detach(), rand(2, 4).detach()
    assert torch.autograd.gradcheck(
        lambda a, fa: be_your_own_teacher_loss([a, deep], y, [fa, deep_features], feature_weight=0.5),
        (rand(2, 3), rand(2, 4)),
    )


def test_byot_terms_combine_into_the_loss() -> None:
    logits = [torch.from_numpy(RNG.normal(size=(3, 4))) for _ in range(3)]
    features = [torch.from_numpy(RNG.normal(size=(3, 5))) for _ in range(3)]
    labels = torch.tensor([0, 1, 3])
    terms = be_your_own_teacher_terms(logits, labels, features, temperature=2.0)
    assert terms["soft"].item() == pytest.approx(sum(_kl(logits[2].numpy(), x.numpy(), 2.0) for x in logits[:2]))
    combined = 0.7 * terms["hard"] + 0.3 * terms["soft"] + 0.01 * terms["feature"]
    torch.testing.assert_close(be_your_own_teacher_loss(logits, labels, features, 0.3, 2.0, 0.01), combined)
