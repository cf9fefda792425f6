"""Student builders: slim_copy and born_again."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.demo import MLP, PlainCNN, ResidualCNN
from lightning_compress.distillation import born_again, slim_copy


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model", [ResidualCNN(width=16, depth=2), PlainCNN(width=16), MLP()],
                         ids=["residual", "plain", "mlp"])
@pytest.mark.parametrize("multiplier", [0.5, 0.3])
def test_slim_copy_runs_and_is_smaller(model: nn.Module, multiplier: float, tiny_input: torch.Tensor) -> None:
    student = slim_copy(model, multiplier)
    assert student(tiny_input).shape == (4, 10)
    assert _count(student) < 0.6 * _count(model)
    assert type(student) is type(model)
    assert model(tiny_input).shape == (4, 10)  # reference untouched


def test_slim_copy_widths_and_dropped_blocks(tiny_input: torch.Tensor) -> None:
    teacher = ResidualCNN(width=16, depth=2)
    student = slim_copy(teacher, 0.25, drop=["stage1.1", "stage2.1", "stage3.1"])
    assert student.stem.conv.in_channels == 1 and student.stem.conv.out_channels == 4
    assert student.stage3[0].conv2.out_channels == 16 and student.fc.out_features == 10
    assert isinstance(student.stage2[1], nn.Identity)
    assert student(tiny_input).shape == (4, 10)
    with pytest.raises(ValueError, match="Unknown layer 'stage4' in drop"):
        slim_copy(teacher, 0.5, drop=["stage4"])
    with pytest.raises(ValueError, match="width_multiplier must be positive, got 0"):
        slim_copy(teacher, 0)


class _HeadRegisteredFirst(nn.Module):
    """The classifier assigned before the convolutions: registration order is not the forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.conv2(nn.functional.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_slim_copy_follows_the_forward_order_given_example_inputs() -> None:
    x = torch.randn(2, 3, 8, 8)
    student = slim_copy(_HeadRegisteredFirst(), 0.5, example_inputs=x)
    assert (student.conv1.in_channels, student.conv1.out_channels, student.fc.in_features) == (3, 8, 8)
    assert student.fc.out_features == 10 and student(x).shape == (2, 10)
    with pytest.raises(RuntimeError, match=r"expected input.* to have 2 channels, but got 3"):  # registration order
        slim_copy(_HeadRegisteredFirst(), 0.5)(x)


def test_slim_copy_keeps_a_batchnorm_on_the_input() -> None:
    tabular = nn.Sequential(nn.BatchNorm1d(20), nn.Linear(20, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Linear(32, 3))
    student = slim_copy(tabular, 0.5)
    assert student[0].num_features == 20 and student[1].in_features == 20 and student[3].num_features == 16
    assert student(torch.randn(4, 20)).shape == (4, 3)


def test_slim_copy_with_example_inputs_checks_the_student_runs() -> None:
    class HardCodedWidth(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)).view(-1, 8))  # the width written as a number

    with pytest.raises(ValueError, match="student of HardCodedWidth does not run on the example inputs"):
        slim_copy(HardCodedWidth(), 0.5, example_inputs=torch.randn(2, 1, 8, 8))


def test_slim_copy_rejects_unsupported_layers() -> None:
    with pytest.raises(ValueError, match="cannot resize layers"):
        slim_copy(nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 2)))


def test_born_again_gives_fresh_student_and_frozen_copy() -> None:
    model = ResidualCNN(width=4)
    with torch.no_grad():
        model.fc.weight.fill_(0.5)
    student, teacher = born_again(model)
    assert torch.equal(teacher.fc.weight, model.fc.weight) and not teacher.training
    assert not torch.equal(student.fc.weight, model.fc.weight)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert student is not model and teacher is not model
