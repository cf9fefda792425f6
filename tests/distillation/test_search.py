"""Teacher-guided student search: the Pareto front by hand, the grid, a brief search with measured multiply-adds."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_compress.demo import ResidualCNN
from lightning_compress.distillation.methods.search import SearchResult, grid, pareto_front, search_students
from lightning_compress.measure import count_macs


def test_pareto_front_on_hand_made_points() -> None:
    points = [
        (0.90, 100),  # 0: front
        (0.95, 300),  # 1: front (the most accurate)
        (0.93, 400),  # 2: dominated by 1 (less accurate, more work)
        (0.80, 50),   # 3: front (the cheapest)
        (0.85, 100),  # 4: dominated by 0 (same work, less accurate)
        (0.90, 120),  # 5: dominated by 0 (same accuracy, more work)
        (0.94, 200),  # 6: front
    ]
    assert pareto_front(points) == [3, 0, 6, 1]  # by increasing multiply-adds


def test_pareto_front_edge_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 10)]) == [0]
    assert pareto_front([(0.9, 10), (0.9, 10)]) == [0, 1]  # equal points do not dominate each other
    assert pareto_front([(0.9, 10), (0.8, 20), (0.7, 30)]) == [0]  # one point dominates all
    assert pareto_front([(0.1, 1), (0.2, 2), (0.3, 3)]) == [0, 1, 2]  # a strict trade-off: all on the front
    with pytest.raises(ValueError, match=r"points\[1\] has a NaN accuracy"):
        pareto_front([(0.9, 10), (math.nan, 5)])
    with pytest.raises(ValueError, match=r"points\[0\] must have non-negative multiply-adds, got \(0.9, -1\)"):
        pareto_front([(0.9, -1)])
    with pytest.raises(ValueError, match=r"points\[0\] must be an \(accuracy, macs\) pair"):
        pareto_front([(0.9, 1, 2)])  # type: ignore[list-item]


def test_grid() -> None:
    assert grid({"width": [4, 8, 16], "depth": [1, 2]}) == [
        {"width": w, "depth": d} for w in (4, 8, 16) for d in (1, 2)]
    with pytest.raises(ValueError, match="at least one argument"):
        grid({})
    with pytest.raises(ValueError, match=r"space\['width'\] must be a non-empty list of values, got \[\]"):
        grid({"width": []})
    with pytest.raises(ValueError, match=r"space\['width'\] must be a non-empty list"):
        grid({"width": 4})  # type: ignore[dict-item]


def test_search_trains_candidates_and_measures_macs(digits) -> None:  # type: ignore[no-untyped-def]
    teacher = ResidualCNN(width=8).eval()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    built: list[nn.Module] = []

    def build(**config: int) -> nn.Module:
        built.append(ResidualCNN(**config))
        return built[-1]

    result = search_students(
        teacher, build, {"width": [2, 4], "depth": [1, 2]}, digits,
        trainer_kwargs={"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1},
        distill_kwargs={"temperature": 2.0},
    )
    assert isinstance(result, SearchResult) and result.split == "val"
    assert [c.config for c in result.candidates] == grid({"width": [2, 4], "depth": [1, 2]})
    example = torch.zeros(1, 1, 8, 8)
    inputs, targets = next(iter(digits.val_dataloader()))  # limit_val_batches=1: the batch each is scored on
    for candidate, student in zip(result.candidates, built, strict=True):
        assert candidate.macs == count_macs(ResidualCNN(**candidate.config), example)[0] > 0
        assert candidate.parameters == sum(p.numel() for p in student.parameters())
        pl.seed_everything(0, verbose=False)  # the search seeds 0 before building each candidate
        initial = ResidualCNN(**candidate.config)
        assert not torch.equal(student.stem.conv.weight, initial.stem.conv.weight)  # trained
        with torch.no_grad():
            accuracy = float((student.eval()(inputs).argmax(1) == targets).float().mean())
        assert candidate.accuracy == pytest.approx(accuracy)  # the trained student's validation accuracy
    macs = {(c.config["width"], c.config["depth"]): c.macs for c in result.candidates}
    assert macs[(2, 1)] < macs[(2, 2)] < macs[(4, 2)] and macs[(2, 1)] < macs[(4, 1)]
    assert result.front == [result.candidates[i] for i in
                            pareto_front([(c.accuracy, c.macs) for c in result.candidates])]
    assert all(c.on_front == (c in result.front) for c in result.candidates)
    assert result.front[0].config == {"width": 2, "depth": 1}  # the cheapest is always on the front
    table = result.table()
    assert table.splitlines()[0] == "| width | depth | val accuracy | multiply-adds | parameters |"
    assert len(table.splitlines()) == 2 + len(result.front)
    assert len(result.table(front_only=False).splitlines()) == 2 + 4
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key])


def test_search_with_a_custom_score() -> None:
    seen = []

    def score(student: nn.Module, teacher: nn.Module) -> float:
        seen.append(student.stem.conv.out_channels)
        return {2: 0.5, 4: 0.9, 8: 0.85}[student.stem.conv.out_channels]

    result = search_students(ResidualCNN(width=8), ResidualCNN, {"width": [2, 4, 8]}, None,  # type: ignore[arg-type]
                             example_input=torch.zeros(1, 1, 8, 8), score=score)
    assert seen == [2, 4, 8]
    assert [c.config["width"] for c in result.front] == [2, 4]  # width 8 costs more and scores lower than 4


def test_search_errors(digits) -> None:  # type: ignore[no-untyped-def]
    teacher = ResidualCNN(width=8)
    with pytest.raises(ValueError, match="split must be one of \\('val', 'test'\\), got 'train'"):
        search_students(teacher, ResidualCNN, {"width": [4]}, digits, split="train")
    with pytest.raises(ValueError, match=r"space\['depth'\] must be a non-empty list"):
        search_students(teacher, ResidualCNN, {"depth": []}, digits)
    with pytest.raises(ValueError, match=r"build rejected the configuration \{'width': 0\}"):
        search_students(teacher, ResidualCNN, {"width": [0]}, digits)
    with pytest.raises(ValueError, match=r"build rejected the configuration \{'colour': 'red'\}"):
        search_students(teacher, ResidualCNN, {"colour": ["red"]}, digits)
    with pytest.raises(ValueError, match="same number of classes"):
        search_students(teacher, ResidualCNN, {"num_classes": [5]}, digits,
                        trainer_kwargs={"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1})
