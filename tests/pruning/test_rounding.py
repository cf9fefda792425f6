"""How a fractional number of channels is rounded: nearest (the default), up (Torch-Pruning's count), down."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import FilterPruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule
from lightning_compress.graph import compact
from lightning_compress.pruning.criteria import num_pruned
from lightning_compress.pruning.groups import prune_filter_groups
from lightning_compress.pruning.structured import filters_to_prune
from lightning_compress.utils.rounding import round_count


def torch_pruning_count(n: int, rate: float) -> int:
    """Torch-Pruning 1.6's channels removed from ``n`` at ``rate``: ``n - int(n * (1 - rate))``."""
    return n - int(n * (1 - rate))


@pytest.mark.parametrize("n", [3, 7, 8, 10, 16, 30, 48, 64, 100, 440])
@pytest.mark.parametrize("rate", [0.1, 0.25, 0.3, 0.4, 0.5, 0.7])
def test_up_is_torch_pruning_count_and_nearest_and_down_bracket_it(n: int, rate: float) -> None:
    up, nearest, down = (num_pruned(rate, n, rounding) for rounding in ("up", "nearest", "down"))
    assert up == torch_pruning_count(n, rate) or rate * n == pytest.approx(round(rate * n))
    assert down <= rate * n + 1e-9 <= up + 1e-9 and down <= nearest <= up and up - down <= 1
    assert abs(nearest - rate * n) <= 0.5 + 1e-9


def test_float_noise_does_not_round_a_whole_count_up_or_down() -> None:
    assert 0.55 * 100 > 55 and 0.58 * 100 < 58  # the products in binary floating point
    assert num_pruned(0.55, 100, "up") == 55 and num_pruned(0.58, 100, "down") == 58
    assert round_count(2.5) == 3 and round_count(6.5) == 7  # halves up, not to even


def test_bad_rounding_is_named_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"rounding must be one of \('nearest', 'up', 'down'\), got 'ceil'"):
        FilterPruning(rounding="ceil")
    with pytest.raises(ValueError, match="'ceil'"):
        prune_filter_groups(nn.Conv2d(1, 2, 1), torch.randn(1, 1, 2, 2), 0.4, rounding="ceil")


def test_up_refuses_a_rate_that_would_remove_every_filter() -> None:
    assert filters_to_prune(torch.ones(10), 0.85, "nearest") == 9
    with pytest.raises(ValueError, match=r"rounded up = 10\); allowed: sparsity <= 0.9"):
        filters_to_prune(torch.ones(10), 0.95, "up")


class GroupedNet(nn.Module):
    """A stem, a grouped convolution of two 8-channel groups (as RegNet's), a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.grouped, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(("rounding", "kept"), [("nearest", 10), ("down", 10), ("up", 8)])
def test_grouped_convolution_loses_the_rounded_count_from_every_group(rounding: str, kept: int) -> None:
    torch.manual_seed(0)
    model, x = GroupedNet().eval(), torch.randn(2, 1, 8, 8)
    prune_filter_groups(model, x, 0.4, rounding=rounding)  # 6.4 of 16 channels: 3 (3.2) or 4 (3.5 up) per group
    small = compact(model, x)
    assert isinstance(small, GroupedNet)
    assert small.stem.out_channels == small.grouped.out_channels == kept
    assert small.grouped.groups == 2
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_filter_pruning_fit_with_rounding_up_compacts_to_torch_pruning_widths(trainer_factory) -> None:
    callback = FilterPruning(sparsity=0.4, rounding="up", compact_on_fit_end=True, recalibration_batches=1)
    module = ClassifierModule(GroupedNet(), lr=3e-3)
    trainer = trainer_factory(callbacks=[callback], max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert module.backbone.stem.out_channels == 16 - torch_pruning_count(8, 0.4) * 2 == 8
    assert module.backbone.grouped.out_channels == 8
