"""Data-free distillation: DeepInversion's terms, the synthesis and the synthetic data module."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.demo import ResidualCNN
from lightning_compress.distillation import DistillationModule
from lightning_compress.distillation.methods.data_free import SyntheticDataModule
from lightning_compress.distillation.methods.deep_inversion import (
    BNStatisticsHooks,
    batch_indices,
    bn_statistics_loss,
    competition_loss,
    synthesize,
    teacher_fingerprint,
    total_variation,
)
from lightning_compress.testing import read_scalars

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*",
                                        "ignore:.*Total length of .* across ranks is zero.*")
SHAPE = (1, 8, 8)


def _tiny() -> nn.Module:
    """conv -> BN -> ReLU -> linear, with non-trivial running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 64, 4))
    model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    model[1].running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    return model.eval()


@pytest.fixture(scope="module")
def trained_teacher(digits: Any) -> nn.Module:
    """A small ResidualCNN trained for a few epochs on real digits (plain torch loop, about a second)."""
    torch.manual_seed(0)
    model = ResidualCNN(width=4, num_stages=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(5):
        for inputs, targets in digits.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return model.eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- terms


def test_bn_statistics_loss_by_hand() -> None:
    # two channels, batch 2, 2 positions
    features = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 6.0], [4.0, 0.0]]])  # (B=2, C=2, L=2)
    # channel 0 values 1, 2, 3, 6: mean 3, biased variance (4 + 1 + 0 + 9) / 4 = 3.5
    # channel 1 values 0, 0, 4, 0: mean 1, biased variance (1 + 1 + 9 + 1) / 4 = 3
    running_mean, running_var = torch.tensor([1.0, 1.0]), torch.tensor([3.5, 7.0])
    expected = torch.tensor([2.0, 0.0]).norm() + torch.tensor([0.0, -4.0]).norm()  # 2 + 4
    torch.testing.assert_close(bn_statistics_loss(features, running_mean, running_var), expected)
    assert float(bn_statistics_loss(features, torch.tensor([3.0, 1.0]), torch.tensor([3.5, 3.0]))) == 0.0


def test_bn_statistics_loss_errors() -> None:
    with pytest.raises(ValueError, match="channels"):
        bn_statistics_loss(torch.zeros(4, 3, 2), torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="at least 2 values"):
        bn_statistics_loss(torch.zeros(1, 2), torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="batch, channels"):
        bn_statistics_loss(torch.zeros(4), torch.zeros(4), torch.ones(4))


def test_hooks_compute_the_term_at_each_bn_input_and_go_away() -> None:
    model = _tiny()
    inputs = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    bn_input = model[0](inputs)
    x = bn_input.transpose(0, 1).reshape(3, -1)
    mean, var = x.mean(1), ((x - x.mean(1, keepdim=True)) ** 2).mean(1)
    expected = (mean - model[1].running_mean).norm() + (var - model[1].running_var).norm()
    with BNStatisticsHooks(model) as hooks:
        model(inputs)
        assert hooks.names == ["1"] and len(hooks.losses) == 1
        torch.testing.assert_close(hooks.losses[0], expected)
        torch.testing.assert_close(hooks.weighted_sum(10.0), 10 * expected)
    assert not model[1]._forward_hooks and not hooks.losses


def test_hooks_need_a_batchnorm_layer() -> None:
    with pytest.raises(ValueError, match=r"no BatchNorm layer.*bn_weight=0"):
        BNStatisticsHooks(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))


def test_total_variation_and_competition() -> None:
    assert float(total_variation(torch.ones(2, 1, 4, 4))) == 0.0
    image = torch.tensor([[[[0.0, 2.0], [1.0, 3.0]]]])  # horizontal diffs 2, 2; vertical 1, 1
    torch.testing.assert_close(total_variation(image), torch.tensor(4.0 + 1.0))
    same = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    assert float(competition_loss(same, same)) == pytest.approx(1.0)
    assert float(competition_loss(same, same.flip(1), temperature=1.0)) < 0.9  # disagreement lowers it
    with pytest.raises(ValueError, match="same shape"):
        competition_loss(same, same[:, :2])


def test_batch_indices_cover_every_sample_once() -> None:
    for num_samples, batch_size in ((1000, 256), (7, 3), (5, 2), (2, 2), (3, 8)):
        chunks = batch_indices(num_samples, batch_size)
        assert torch.cat(chunks).tolist() == list(range(num_samples))
        assert all(len(chunk) >= 2 for chunk in chunks)


# ---------------------------------------------------------------------------------------------------- synthesis


def _bn_loss(model: nn.Module, inputs: torch.Tensor) -> float:
    with BNStatisticsHooks(model) as hooks, torch.no_grad():
        model(inputs)
        return float(hooks.weighted_sum())


def test_optimisation_lowers_the_bn_term() -> None:
    model = _tiny()
    options = {"bn_weight": 1.0, "tv_weight": 0.0, "l2_weight": 0.0, "batch_size": 32, "seed": 3}
    noise, _ = synthesize(model, 32, SHAPE, 4, steps=0, **options)
    optimised, _ = synthesize(model, 32, SHAPE, 4, steps=60, lr=0.1, **options)
    assert _bn_loss(model, optimised) < 0.5 * _bn_loss(model, noise)


def test_steps_are_reported_and_the_total_decreases() -> None:
    seen: list[tuple[int, int, dict[str, float]]] = []
    synthesize(_tiny(), 12, SHAPE, 4, steps=30, batch_size=6, on_step=lambda *args: seen.append(args))
    assert [(b, s) for b, s, _ in seen] == [(b, s) for b in range(2) for s in range(30)]
    assert set(seen[0][2]) == {"class", "bn", "tv", "l2", "total"}
    assert seen[29][2]["total"] < seen[0][2]["total"]


def test_teacher_predicts_the_sampled_labels(trained_teacher: nn.Module) -> None:
    inputs, labels = synthesize(trained_teacher, 40, SHAPE, 10, steps=60, lr=0.1, batch_size=20, seed=0)
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 4)  # balanced
    with torch.no_grad():
        predictions = trained_teacher(inputs).argmax(1)
    assert (predictions == labels).float().mean() >= 0.9


def test_given_labels_are_used() -> None:
    labels = torch.tensor([3, 3, 1, 0])
    _, returned = synthesize(_tiny(), 4, SHAPE, 4, steps=1, labels=labels)
    assert returned.tolist() == [3, 3, 1, 0]


def test_teacher_is_left_untouched(trained_teacher: nn.Module) -> None:
    teacher = copy.deepcopy(trained_teacher).train()
    teacher.stage1.eval()  # mixed flags come back as they were
    teacher.fc.weight.requires_grad_(False)
    before = _snapshot(teacher)
    modes = {name: module.training for name, module in teacher.named_modules()}
    grads = {name: p.requires_grad for name, p in teacher.named_parameters()}
    student = ResidualCNN(width=2, num_stages=2).train()
    student_before = _snapshot(student)
    synthesize(teacher, 8, SHAPE, 10, steps=5, batch_size=4, jitter=1, student=student, competition_weight=1.0)
    for key, value in teacher.state_dict().items():  # weights and BN running statistics, bit for bit
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert {name: module.training for name, module in teacher.named_modules()} == modes
    assert {name: p.requires_grad for name, p in teacher.named_parameters()} == grads
    assert all(not m._forward_hooks for m in teacher.modules())
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, student_before[key], rtol=0, atol=0)
    assert student.training and all(p.requires_grad for p in student.parameters())


def test_teacher_is_restored_after_an_error() -> None:
    teacher = _tiny().train()
    with pytest.raises(ValueError, match=r"\(batch, 7\) logits"):
        synthesize(teacher, 4, SHAPE, 7, steps=2)  # the teacher has 4 classes
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(not m._forward_hooks for m in teacher.modules())


def test_deterministic_under_a_seed_and_leaves_global_rng_alone() -> None:
    options: dict[str, Any] = {"steps": 5, "batch_size": 4, "jitter": 1}
    model = _tiny()
    state = torch.get_rng_state()
    first = synthesize(model, 8, SHAPE, 4, seed=7, **options)
    assert torch.equal(torch.get_rng_state(), state)
    second = synthesize(_tiny(), 8, SHAPE, 4, seed=7, **options)
    other = synthesize(_tiny(), 8, SHAPE, 4, seed=8, **options)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_input_range_is_respected() -> None:
    inputs, _ = synthesize(_tiny(), 8, SHAPE, 4, steps=5, lr=1.0, input_range=(-0.5, 1.0))
    assert inputs.min() >= -0.5 and inputs.max() <= 1.0


def test_without_bn_term_a_network_without_batchnorm_works() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    inputs, labels = synthesize(model, 6, SHAPE, 3, steps=3, bn_weight=0.0)
    assert inputs.shape == (6, *SHAPE) and labels.shape == (6,)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_samples": 1}, "num_samples"),
        ({"input_shape": (1, 0, 8)}, "input_shape"),
        ({"num_classes": 1}, "num_classes"),
        ({"steps": -1}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 1}, "batch_size"),
        ({"bn_weight": -1.0}, "bn_weight"),
        ({"tv_weight": -0.1}, "tv_weight"),
        ({"l2_weight": -0.1}, "l2_weight"),
        ({"jitter": -1}, "jitter"),
        ({"input_shape": (64,), "tv_weight": 0.0, "jitter": 1}, "jitter shifts images"),
        ({"input_shape": (64,)}, "tv_weight > 0"),
        ({"input_range": (1.0, 1.0)}, "input_range"),
        ({"labels": torch.tensor([0, 9])}, r"labels must be class indices in \[0, 4\)"),
        ({"labels": torch.tensor([0, 1, 2])}, r"labels must have shape \(2,\)"),
        ({"labels": torch.tensor([], dtype=torch.long)}, r"labels must have shape \(2,\)"),
        ({"competition_weight": 1.0}, "needs a student"),
        ({"competition_temperature": 0.0}, "competition_temperature"),
    ],
)
def test_bad_arguments_are_rejected(overrides: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {"num_samples": 2, "input_shape": SHAPE, "num_classes": 4, "steps": 1}
    arguments.update(overrides)
    positional = [arguments.pop(k) for k in ("num_samples", "input_shape", "num_classes")]
    with pytest.raises(ValueError, match=match):
        synthesize(_tiny(), *positional, **arguments)


def test_teacher_without_batchnorm_is_rejected_when_bn_weight_is_positive() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        synthesize(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), 4, SHAPE, 3, steps=1)


# ---------------------------------------------------------------------------------------------------- data module


def _data(teacher: nn.Module, **overrides: Any) -> SyntheticDataModule:
    options: dict[str, Any] = {"num_samples": 16, "sample_shape": list(SHAPE), "num_classes": 10, "synthesis_steps": 3,
                               "batch_size": 8, "synthesis_batch_size": 8}
    options.update(overrides)
    return SyntheticDataModule(teacher, **options)


def test_data_module_synthesises_in_setup(trained_teacher: nn.Module) -> None:
    data = _data(trained_teacher, seed=4)
    data.setup("fit")
    inputs, labels = data.train_set.tensors  # type: ignore[union-attr]
    expected = synthesize(trained_teacher, 16, SHAPE, 10, steps=3, batch_size=8, seed=4)
    torch.testing.assert_close(inputs, expected[0])
    assert torch.equal(labels, expected[1])
    batch = next(iter(data.train_dataloader()))
    assert batch[0].shape == (8, *SHAPE)
    assert sorted(data.synthesis_terms) == [0, 1] and "bn" in data.synthesis_terms[0]
    assert data.val_dataloader() == [] and data.test_dataloader() == []


def test_data_module_cache_is_written_reused_and_refreshed(trained_teacher: nn.Module, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache" / "synthetic.pt"
    calls: list[int] = []
    original = SyntheticDataModule.synthesize

    def counting(self: SyntheticDataModule) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(SyntheticDataModule, "synthesize", counting)
    first = _data(trained_teacher, cache_path=str(cache))
    first.prepare_data()
    first.setup("fit")
    assert cache.exists() and len(calls) == 1
    second = _data(trained_teacher, cache_path=str(cache))
    second.prepare_data()
    second.setup("fit")
    assert len(calls) == 1  # loaded, not synthesised again
    assert second.synthesis_terms == first.synthesis_terms and sorted(second.synthesis_terms) == [0, 1]
    assert torch.equal(first.train_set.tensors[0], second.train_set.tensors[0])  # type: ignore[union-attr]
    _data(trained_teacher, cache_path=str(cache), synthesis_steps=4).setup("fit")  # other settings: synthesised anew
    assert len(calls) == 2
    changed = copy.deepcopy(trained_teacher)
    with torch.no_grad():
        changed.fc.bias.add_(1.0)
    assert teacher_fingerprint(changed) != teacher_fingerprint(trained_teacher)
    _data(changed, cache_path=str(cache), synthesis_steps=4).setup("fit")  # another teacher: synthesised anew
    assert len(calls) == 3


def test_data_module_loads_teacher_checkpoint(trained_teacher: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in trained_teacher.state_dict().items()}}, path)
    fresh = ResidualCNN(width=4, num_stages=2)
    data = _data(fresh, teacher_checkpoint=str(path))
    assert teacher_fingerprint(data.teacher) == teacher_fingerprint(trained_teacher)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"num_samples": 1}, "num_samples"), ({"batch_size": 0}, "batch_size"), ({"synthesis_steps": -2}, "steps"),
     ({"bn_weight": -1.0}, "bn_weight"), ({"synthesis_batch_size": 1}, "batch_size"),
     ({"input_range": (2.0, 0.0)}, "input_range"), ({"competition_weight": 1.0}, "needs a student"),
     ({"competition_weight": -1.0, "student": nn.Linear(2, 2)}, "competition_weight")],
)
def test_data_module_rejects_bad_arguments(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _data(_tiny(), **overrides)


def test_distillation_on_synthetic_data_evaluates_on_real_data(trained_teacher: nn.Module, digits: Any,
                                                               trainer_factory: Any, tmp_path: Path) -> None:
    teacher = copy.deepcopy(trained_teacher)
    before = _snapshot(teacher)
    data = _data(teacher, eval_datamodule=digits)
    torch.manual_seed(1)
    module = DistillationModule(ResidualCNN(width=2, num_stages=2), teacher, soft_weight=1.0, hard_weight=0.0)
    trainer = trainer_factory(limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    result = trainer.test(module, datamodule=data, verbose=False)[0]
    # the student's accuracy on the real test split, counted here (the synthetic set has no test split)
    student = module.student.eval()
    with torch.no_grad():
        correct = sum(int((student(x).argmax(1) == y).sum()) for x, y in digits.test_dataloader())
    assert result["test/acc"] == pytest.approx(correct / len(digits.test_set), abs=1e-6)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    scalars = read_scalars(tmp_path)
    assert "val/acc" in scalars  # the real validation split
    assert len(scalars["distill/synthesis/bn"]) == 2  # one value per synthesis batch


def test_data_module_adaptive_round_uses_the_student(trained_teacher: nn.Module) -> None:
    torch.manual_seed(3)
    student = ResidualCNN(width=2, num_stages=2)
    before = _snapshot(student)
    data = _data(trained_teacher, student=student, competition_weight=1.0)
    data.setup("fit")
    assert "competition" in data.synthesis_terms[0]
    plain = _data(trained_teacher)
    assert data.settings()["student"] is not None and plain.settings()["student"] is None
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
