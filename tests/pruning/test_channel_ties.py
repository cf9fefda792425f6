"""Channel shuffles and equal chunks: the same positions go from every group of a shuffle (units), every piece of a
chunk loses equally many channels (balances), and a ShuffleNetV2 stage keeps its channels apart instead of
collapsing into one, compacting exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.graph import ChannelGroup, compact, filter_groups
from lightning_compress.graph.channel_ties import BALANCE_REASON, UNIT_REASON, ChannelTies, tied_keep_mask
from lightning_compress.pruning.groups import group_keep_mask, prune_filter_groups


def shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


class ShuffleStage(nn.Module):
    """A ShuffleNetV2 stage in miniature: a unit whose two branches are concatenated and shuffled, then units that
    chunk the trunk in halves, convolve the second and shuffle again; a head reads the trunk."""

    def __init__(self, width: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.left, self.right = nn.Conv2d(8, width, 1), nn.Conv2d(8, width, 1)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU()) for _ in range(blocks - 1))
        self.head = nn.Conv2d(2 * width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = shuffle(torch.cat((self.left(x), self.right(x)), dim=1))
        for branch in self.branches:
            a, b = y.chunk(2, dim=1)
            y = shuffle(torch.cat((a, branch(b)), dim=1))
        return self.head(y)


def trunk(model: nn.Module, x: torch.Tensor) -> ChannelGroup:
    return next(g for g in filter_groups(model, x) if "left" in g.producers)


def zero_filters(model: nn.Module, rows: dict[str, list[int]]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, indices in rows.items():
            modules[name].weight[indices] = 0
            modules[name].bias[indices] = 0


def randomize(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def assert_exact(model: nn.Module, small: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        reference, out = model(x), small(x)
    assert float((out - reference).norm() / reference.norm()) <= 1e-4


def test_a_shuffle_stage_keeps_its_positions_apart() -> None:
    group = trunk(ShuffleStage(), torch.randn(2, 3, 4, 4))
    assert set(group.producers) == {"left", "right", "branches.0.0", "branches.1.0"} and group.blocked == []
    assert group.size == 32 and group.ties is not None  # not one channel: 4 producers of 8 channels each
    sizes = sorted(group.ties.sizes().tolist())  # position j of left and right, with 2 (4) channels of each branch
    assert sizes == [2, 2, 2, 2, 4, 4, 8, 8] and len(group.ties.balances) == 2  # one balance per chunk


def test_a_shuffle_stage_prunes_balanced_units_and_compacts_exactly() -> None:
    x = torch.randn(2, 3, 4, 4)
    model = randomize(ShuffleStage())
    zeroed = prune_filter_groups(model, x, 0.4)
    small, plan = compact(model, x, return_plan=True)
    assert zeroed > 0 and plan.skipped == []  # the selection needs no repair
    width = small.left.out_channels
    assert width < 8 and small.right.out_channels == width and small.head.in_channels == 2 * width
    assert all(branch[0].out_channels == branch[0].in_channels == width for branch in small.branches)
    assert_exact(model, small, x)


@pytest.mark.parametrize("seed", range(5))
def test_selections_are_whole_units_and_balanced(seed: int) -> None:
    group = trunk(ShuffleStage(width=16, blocks=4), torch.randn(2, 3, 4, 4))
    ties = group.ties
    assert ties is not None
    scores = torch.rand(group.size, generator=torch.Generator().manual_seed(seed))
    keep = group_keep_mask(scores, round(0.4 * group.size), ties)
    units = torch.tensor(ties.units)
    for u in range(ties.num_units):
        assert keep[units == u].unique().numel() == 1  # a unit goes whole
    for first, second in ties.balances:
        assert int((~keep[first]).sum()) == int((~keep[second]).sum())
    assert 0.25 * group.size <= int((~keep).sum()) <= 0.55 * group.size


def test_inconsistent_selections_are_kept_back_with_a_reason() -> None:
    x = torch.randn(2, 3, 4, 4)
    model = randomize(ShuffleStage())
    # left[1] and its branch channels without right[1] (one row of the first shuffle); left[5] and right[5]: a whole
    # unit, but on one side of the first chunk only
    zero_filters(model, {"left": [1, 5], "right": [5], "branches.0.0": [2, 3]})
    small, plan = compact(model, x, return_plan=True)
    reasons = {reason: positions for _, positions, reason in plan.skipped}
    assert set(reasons) == {UNIT_REASON, BALANCE_REASON}
    assert small.left.out_channels == small.head.in_channels // 2 == 8  # nothing could go
    assert_exact(model, small, x)


def test_a_balanced_selection_of_units_is_removed() -> None:
    x = torch.randn(2, 3, 4, 4)
    model = randomize(ShuffleStage())
    # positions 0, 2 (first quarter and second quarter), 4, 5 (second half): balanced at both chunks
    zero_filters(model, {"left": [0, 2, 4, 5], "right": [0, 2, 4, 5], "branches.0.0": [0, 1, 4, 5],
                         "branches.1.0": [0, 1, 2, 3]})
    small, plan = compact(model, x, return_plan=True)
    assert plan.skipped == [] and small.left.out_channels == 4 and small.head.in_channels == 8
    assert_exact(model, small, x)


def test_a_stage_too_deep_for_any_balanced_selection_stays_whole() -> None:
    x = torch.randn(2, 3, 4, 4)
    model = randomize(ShuffleStage(width=4, blocks=4))  # three chunks of a width of 4: 4 / 2**3 < 1
    prune_filter_groups(model, x, 0.4)
    small = compact(model, x)
    assert small.left.out_channels == 4 and small.head.in_channels == 8
    assert_exact(model, small, x)


def test_tied_keep_mask_balances_units() -> None:
    ties = ChannelTies(units=[0, 1, 2, 3, 0, 1, 4, 5], balances=[([0, 1, 2, 3], [4, 5, 6, 7])])
    keep = tied_keep_mask(torch.tensor([1.0, 5.0, 6.0, 7.0, 1.0, 5.0, 2.0, 8.0]), 4, ties)
    assert keep.tolist() == [False, True, False, True, False, True, False, True]


class TinyShuffleNet(nn.Module):
    """Digits (1x8x8) through a shuffle stage, pooled into 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = ShuffleStage(width=8, blocks=3)
        self.stage.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.stage(x))).mean((2, 3)))


def test_filter_pruning_trains_a_shuffle_stage_and_compacts_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import lightning.pytorch as pl
    from conftest import make_trainer

    from lightning_compress import FilterPruning
    from lightning_compress.demo import ClassifierModule, DigitsDataModule

    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(TinyShuffleNet(), lr=3e-3, lr_scheduler="none")
    pruning = FilterPruning(sparsity=0.4, mode="soft", compact_on_fit_end=True, recalibration_batches=2)
    trainer = make_trainer(tmp_path, callbacks=[pruning], max_epochs=2, limit_val_batches=0, logger=False,
                           limit_train_batches=5)
    trainer.fit(module, DigitsDataModule(batch_size=64))
    stage = module.compression_target.stage
    assert "left+right+branches.0.0+branches.1.0" not in pruning.skipped
    assert stage.left.out_channels < 8 and stage.head.in_channels == 2 * stage.left.out_channels
    assert module.compression_target(torch.randn(3, 1, 8, 8)).shape == (3, 10)
