"""Graph-based distillation: instance graphs, graph matching, graph-weighted soft targets and the module."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress.demo import ResidualCNN
from lightning_compress.distillation import losses
from lightning_compress.distillation.methods.graph import (
    GraphDistillationModule,
    graph_matching_loss,
    graph_soft_weights,
    instance_graph,
    knn_mask,
    neighbour_label_agreement,
    weighted_soft_target_loss,
)
from lightning_compress.testing import read_scalars

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")
QUICK = {"limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0}


def _net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ResidualCNN(width=width, num_stages=2)


# ------------------------------------------------------------------------------------------------ graphs


def test_knn_mask_excludes_self_and_clips_k() -> None:
    a = torch.tensor([[1.0, 0.2, 0.9], [0.2, 1.0, 0.5], [0.9, 0.5, 1.0]])
    assert knn_mask(a, 1).tolist() == [[False, False, True], [False, False, True], [True, False, False]]
    assert knn_mask(a, 10).equal(~torch.eye(3, dtype=torch.bool))  # k clipped to B - 1
    assert not knn_mask(torch.ones(1, 1), 3).any()
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        knn_mask(a, 0)


def test_graph_matching_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cosines: s01 = 0, s02 = s12 = 1/sqrt(2)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # cosines: t01 = 1, t02 = t12 = 0
    # dense: ordered pairs (0,1), (1,0): 1; (0,2), (2,0), (1,2), (2,1): 1/2 -> mean 4 / 6
    assert graph_matching_loss(s, t).item() == pytest.approx(4 / 6)
    # teacher 1-NN edges: 0 -> 1 (1), 1 -> 0 (1), 2 -> 0 or 1 (tie; 1/2 either way) -> mean 2.5 / 3
    assert graph_matching_loss(s, t, k=1).item() == pytest.approx(2.5 / 3)
    assert graph_matching_loss(3 * t, t).item() == 0.0  # cosine edges: scale-free
    maps = torch.randn(4, 3, 2, 2)
    assert graph_matching_loss(maps, maps.flatten(1)).item() == pytest.approx(0.0, abs=1e-7)  # widths may differ
    with pytest.raises(ValueError, match="at least 2"):
        graph_matching_loss(torch.ones(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="share the batch size"):
        graph_matching_loss(torch.ones(2, 2), torch.ones(3, 2))


def test_instance_graph_is_the_cosine_matrix() -> None:
    x = torch.randn(5, 7)
    expected = torch.nn.functional.cosine_similarity(x.unsqueeze(1), x.unsqueeze(0), dim=2)
    torch.testing.assert_close(instance_graph(x), expected)


@pytest.mark.parametrize("k", [None, 2])
def test_graph_matching_gradient(k: int | None) -> None:
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, dtype=torch.double, generator=generator, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.double, generator=generator)
    assert torch.autograd.gradcheck(lambda a: graph_matching_loss(a, t, k), (s,))


# ------------------------------------------------------------------------------------------------ weighting


def test_agreement_and_confidence_weights_by_hand() -> None:
    features = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 0, 1, 0])
    # 1-NN: 0 <-> 1 (same label), 2 <-> 3 (different labels)
    assert neighbour_label_agreement(instance_graph(features), labels, 1).tolist() == [1.0, 1.0, 0.0, 0.0]
    # 3-NN of a batch of 4: every other sample; agreement = share of the others with my label
    assert neighbour_label_agreement(instance_graph(features), labels, 3).tolist() == pytest.approx(
        [2 / 3, 2 / 3, 0.0, 2 / 3])
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(3.0)], [0.0, 0.0]])
    weights, raw = graph_soft_weights(features, logits, labels, rule="confidence")
    assert raw.tolist() == pytest.approx([0.75, 0.5, 0.75, 0.5])
    assert weights.tolist() == pytest.approx([1.2, 0.8, 1.2, 0.8])  # divided by the mean 0.625
    weights, raw = graph_soft_weights(features, logits, labels, rule="agreement*confidence", k=1)
    assert raw.tolist() == pytest.approx([0.75, 0.5, 0.0, 0.0]) and weights.mean().item() == pytest.approx(1.0)
    weights, raw = graph_soft_weights(features, logits, torch.tensor([0, 1, 0, 1]), k=1)
    assert raw.tolist() == [0.0] * 4 and weights.tolist() == [0.0] * 4  # all zero stays zero
    assert graph_soft_weights(features, logits, labels, rule="none")[0].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="rule must be one of \\('none', 'agreement', 'confidence'"):
        graph_soft_weights(features, logits, labels, rule="degree")


def test_weighted_soft_target_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=generator), torch.randn(6, 10, generator=generator)
    torch.testing.assert_close(weighted_soft_target_loss(s, t, torch.ones(6), 4.0), losses.soft_target_loss(s, t, 4.0))
    weights = torch.tensor([2.0, 0.0, 1.0, 0.0, 3.0, 0.0])
    per_sample = torch.stack([losses.soft_target_loss(s[i:i + 1], t[i:i + 1], 2.0) for i in range(6)])
    torch.testing.assert_close(weighted_soft_target_loss(s, t, weights, 2.0), (weights * per_sample).mean())
    s.requires_grad_(True)
    weighted_soft_target_loss(s, t, weights, 2.0).backward()
    assert s.grad[weights == 0].abs().sum() == 0 and s.grad[weights > 0].abs().sum() > 0
    with pytest.raises(ValueError, match="non-negative"):
        weighted_soft_target_loss(s, t, -torch.ones(6))
    with pytest.raises(ValueError, match="one value per sample"):
        weighted_soft_target_loss(s, t, torch.ones(5))


# ------------------------------------------------------------------------------------------------ module


def test_fit_logs_graph_terms_every_epoch(trainer_factory: Any, digits: Any, tmp_path: Path) -> None:
    module = GraphDistillationModule(_net(4, 0), _net(8, 1), graph_weight=2.0, graph_k=4, soft_weighting="agreement",
                                     weighting_k=3, student_layers=["stage2"], teacher_layers=["stage2"])
    trainer_factory(max_epochs=2, **QUICK).fit(module, datamodule=digits)
    scalars = read_scalars(tmp_path)
    for tag in ("distill/graph", "distill/soft", "distill/hard", "distill/graph_soft_weight", "val/acc"):
        assert len(scalars[tag]) == 2, tag
    assert 0.0 <= scalars["distill/graph_soft_weight"][-1][1] <= 1.0
    total = sum(module.weights[n] * scalars[f"distill/{n}"][-1][1] for n in ("soft", "hard", "graph"))
    assert scalars["distill/total"][-1][1] == pytest.approx(total, rel=1e-5)


def test_terms_by_hand_on_logits() -> None:
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    module = GraphDistillationModule(student, teacher, graph_weight=1.0, soft_weighting="confidence", temperature=2.0)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    s_logits, t_logits = student(x), module.teacher_forward(x)
    terms = module.compute_terms(s_logits, t_logits, y)
    torch.testing.assert_close(terms["graph"], graph_matching_loss(s_logits, t_logits[0]))  # no layers: logits
    weights, _ = graph_soft_weights(t_logits[0], t_logits[0], y, "confidence")
    torch.testing.assert_close(terms["soft"], weighted_soft_target_loss(s_logits, t_logits[0], weights, 2.0))
    torch.testing.assert_close(terms["hard"], losses.hard_target_loss(s_logits, y))
    terms["graph"].backward()
    assert student.weight.grad.abs().sum() > 0 and teacher.weight.grad is None
    plain = GraphDistillationModule(student, teacher, graph_weight=1.0, temperature=2.0)
    torch.testing.assert_close(plain.compute_terms(s_logits, t_logits, y)["soft"],
                               losses.soft_target_loss(s_logits, t_logits[0], 2.0))


@pytest.mark.parametrize(("options", "message"), [
    ({"graph_weight": -1.0}, "graph_weight must be a finite non-negative number, got -1.0"),
    ({"soft_weight": -1.0}, "soft_weight must be a finite non-negative number"),
    ({"graph_k": 0}, "graph_k must be a positive integer or None, got 0"),
    ({"weighting_k": 0}, "weighting_k must be a positive integer, got 0"),
    ({"soft_weighting": "degree"}, "soft_weighting must be one of \\('none', 'agreement', 'confidence', "
                                   "'agreement\\*confidence'\\), got 'degree'"),
    ({"soft_weighting": "agreement", "soft_weight": 0.0}, "soft_weight is 0"),
    ({"soft_weight": 0.0, "hard_weight": 0.0}, "At least one loss weight must be positive"),
])
def test_bad_arguments(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GraphDistillationModule(nn.Linear(4, 3), nn.Linear(4, 3), **options)


def test_graph_only_and_several_teachers() -> None:
    module = GraphDistillationModule(nn.Linear(4, 3), nn.Linear(4, 3), soft_weight=0.0, hard_weight=0.0,
                                     graph_weight=1.0)
    assert module.active_terms() == ["graph"]
    with pytest.raises(ValueError, match="supports one teacher"):
        GraphDistillationModule(nn.Linear(4, 3), [nn.Linear(4, 3), nn.Linear(4, 3)], soft_weighting="agreement")
