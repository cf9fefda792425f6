"""Channel shuffles and equal chunks: the same positions go from every group of a shuffle (units), every piece of a
chunk loses equally many channels (balances), and a ShuffleNetV2 stage keeps its channels apart instead of
collapsing into one, compacting exactly. Where filters may be reordered instead (channel routes,
tests/pruning/test_channel_routes.py), the selection takes routes; the unit tests here drop them."""

from __future__ import annotations

import dataclasses
import itertools
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.graph import ChannelGroup, compact, filter_groups
from lightning_compress.graph.channel_ties import (
    BALANCE_REASON,
    UNIT_REASON,
    ChannelTies,
    exact_units,
    greedy_units,
    tied_keep_mask,
)
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
    assert group.ties is not None and group.ties.routes is not None
    ties = dataclasses.replace(group.ties, routes=None)
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


def test_a_stage_too_deep_for_any_balanced_selection_of_units_has_none() -> None:
    group = trunk(ShuffleStage(width=4, blocks=4), torch.randn(2, 3, 4, 4))  # three chunks of 4: 4 / 2**3 < 1
    assert group.ties is not None
    ties = dataclasses.replace(group.ties, routes=None)
    keep = tied_keep_mask(torch.rand(group.size, generator=torch.Generator().manual_seed(0)), 6, ties)
    assert bool(keep.all())  # reordered filters prune it (test_channel_routes.py)


def test_tied_keep_mask_balances_units() -> None:
    ties = ChannelTies(units=[0, 1, 2, 3, 0, 1, 4, 5], balances=[([0, 1, 2, 3], [4, 5, 6, 7])])
    keep = tied_keep_mask(torch.tensor([1.0, 5.0, 6.0, 7.0, 1.0, 5.0, 2.0, 8.0]), 4, ties)
    assert keep.tolist() == [False, True, False, True, False, True, False, True]


def ties_from(coef: list[list[int]], sizes: list[int]) -> ChannelTies:
    """Units of ``sizes`` channels, laid out one after the other, with ``coef[b][u]`` more channels of unit ``u`` in
    the first piece of balance ``b`` than in its second."""
    units: list[int] = []
    balances: list[tuple[list[int], list[int]]] = [([], []) for _ in coef]
    for u, size in enumerate(sizes):
        channels = list(range(len(units), len(units) + size))
        units += [u] * size
        for b, row in enumerate(coef):
            balances[b][0 if row[u] > 0 else 1].extend(channels[:abs(row[u])])
    return ChannelTies(units, balances)


def pruned_units(keep: torch.Tensor, ties: ChannelTies) -> torch.Tensor:
    """The selection of units behind a keep-mask, after checking that every unit goes whole."""
    units = torch.tensor(ties.units)
    pruned = torch.zeros(ties.num_units, dtype=torch.long)
    pruned[units[~keep]] = 1
    assert torch.equal(~keep, pruned[units].bool())
    return pruned


def unit_means(scores: torch.Tensor, ties: ChannelTies) -> torch.Tensor:
    units = torch.tensor(ties.units)
    return torch.zeros(ties.num_units, dtype=torch.float64).index_add_(0, units, scores.double()) / ties.sizes()


# A ShuffleNetV2 trunk three chunks deep, in miniature: 16 channels in units of 8 (+2, +4), 4 (+2, -4) and 2 (-2,
# 0): a balanced selection takes as many 8s as 4s and twice as many 2s, 0, 16, 32 or 48 channels. The 2s score
# lowest, the 8s highest; within a size the later unit scores lower.
TRUNK = ties_from([[2] * 8 + [-2] * 8, [4] * 4 + [-4] * 4 + [0] * 8], [8] * 4 + [4] * 4 + [2] * 8)
TRUNK_SCORES = torch.tensor([(3.0 if u < 4 else 2.0 if u < 8 else 1.0) - 0.01 * u for u in TRUNK.units])


@pytest.mark.parametrize("k, units", [(16, [3, 7, 14, 15]), (32, [2, 3, 6, 7, 12, 13, 14, 15])])
def test_the_exact_search_finds_the_balanced_selection_the_greedy_misses(k: int, units: list[int]) -> None:
    sizes, coef = TRUNK.sizes(), TRUNK.coefficients()
    greedy = greedy_units(unit_means(TRUNK_SCORES, TRUNK), sizes, coef, k)
    assert int((sizes * greedy).sum()) != k  # it collapses to nothing (16) or overshoots (32)
    pruned = pruned_units(tied_keep_mask(TRUNK_SCORES, k, TRUNK), TRUNK)
    assert int((sizes * pruned).sum()) == k and not bool((coef @ pruned).any())
    assert pruned.nonzero().squeeze(1).tolist() == units  # the cheapest of each size


@pytest.mark.parametrize("k, nearest, up, down", [
    (0, 0, 0, 0), (16, 16, 16, 16), (20, 16, 32, 16), (24, 16, 32, 16), (28, 32, 32, 16), (60, 48, 48, 48)])
def test_rounding_picks_among_the_achievable_counts(k: int, nearest: int, up: int, down: int) -> None:
    # 24 is as far from 16 as from 32: the cheaper wins; 60: nothing >= 60 short of the whole group (64)
    for rounding, expected in (("nearest", nearest), ("up", up), ("down", down)):
        keep = tied_keep_mask(TRUNK_SCORES, k, TRUNK, rounding=rounding)
        assert int((~keep).sum()) == expected, rounding


def test_an_unknown_rounding_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rounding must be one of \('nearest', 'up', 'down'\), got 'nearer'"):
        tied_keep_mask(TRUNK_SCORES, 16, TRUNK, rounding="nearer")


def test_past_its_cap_the_exact_search_gives_way_to_the_greedy() -> None:
    sizes, coef, mean = TRUNK.sizes(), TRUNK.coefficients(), unit_means(TRUNK_SCORES, TRUNK)
    assert exact_units(coef, sizes, mean, 16, cap=1) is None
    assert int((sizes * exact_units(coef, sizes, mean, 16)).sum()) == 16  # type: ignore[operator]


def random_ties(rng: random.Random) -> ChannelTies:
    """Up to 10 units over up to 12 channels, and up to 3 balances of random pieces (a channel may be in both)."""
    n = rng.randint(3, 12)
    numbers: dict[int, int] = {}
    units = [numbers.setdefault(rng.randrange(rng.randint(1, 10)), len(numbers)) for _ in range(n)]
    balances = []
    for _ in range(rng.randint(0, 3)):
        half = rng.randint(1, n // 2 + 1)
        balances.append(([rng.randrange(n) for _ in range(half)], [rng.randrange(n) for _ in range(half)]))
    return ChannelTies(units, balances)


def brute_force(scores: torch.Tensor, k: int, ties: ChannelTies, rounding: str) -> tuple[int, float]:
    """(channels, summed score) of the best balanced selection, over every subset of units."""
    sizes, coef, total = ties.sizes(), ties.coefficients(), len(ties.units)
    cost = unit_means(scores, ties) * sizes
    found = []
    for bits in itertools.product([0, 1], repeat=ties.num_units):
        pruned = torch.tensor(bits, dtype=torch.long)
        count = int((sizes * pruned).sum())
        if not bool((coef @ pruned).any()) and (count < total or count == 0):
            found.append((count, float((cost * pruned).sum())))
    side = [f for f in found if (f[0] >= k if rounding == "up" else f[0] <= k if rounding == "down" else True)]
    return min(side or found, key=lambda f: (abs(f[0] - k), f[1], f[0]))


@pytest.mark.parametrize("seed", range(4))
def test_the_exact_search_matches_a_brute_force_on_small_ties(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(15):
        ties = random_ties(rng)
        scores = torch.tensor([float(rng.randint(0, 5)) for _ in ties.units])  # equal scores on purpose
        k = rng.randint(0, len(ties.units))
        for rounding in ("nearest", "up", "down"):
            keep = tied_keep_mask(scores, k, ties, rounding=rounding)
            pruned = pruned_units(keep, ties)
            assert not bool((ties.coefficients() @ pruned).any())
            count, cost = brute_force(scores, k, ties, rounding)
            assert int((~keep).sum()) == count and float(scores[~keep].double().sum()) == pytest.approx(cost)


def test_shufflenet_v2_stages_prune_as_many_channels_as_their_balances_allow() -> None:
    zoo = str(Path(__file__).resolve().parents[1] / "zoo")
    if zoo not in sys.path:
        sys.path.append(zoo)
    from zoo_support import classifier, torchvision

    if torchvision() is None:
        pytest.skip("torchvision is not installed (.ci/run installs it)")
    model = classifier("shufflenet_v2_x1_0").eval()
    groups = [g for g in filter_groups(model, torch.randn(1, 3, 32, 32)) if g.ties is not None and not g.blocked]
    assert [g.size for g in groups] == [290, 1044, 1160]
    pruned = {}
    for group in groups:
        scores = torch.rand(group.size, generator=torch.Generator().manual_seed(0))
        ties = dataclasses.replace(group.ties, routes=None)  # units alone, without reordering filters
        for rounding in ("nearest", "up", "down"):
            keep = tied_keep_mask(scores, round(0.4 * group.size), ties, rounding=rounding)
            assert not bool((ties.coefficients() @ pruned_units(keep, ties)).any())
            pruned[group.size, rounding] = int((~keep).sum())
    assert [pruned[290, r] for r in ("nearest", "up", "down")] == [120, 120, 90]  # k = 116 of 0, 40, 50, 80, ...
    assert [pruned[1160, r] for r in ("nearest", "up", "down")] == [480, 480, 440]  # k = 464 of 0, 40, 80, ...
    # stage 3, chunked seven times: only the empty selection and the whole group are balanced (routes prune it)
    assert [pruned[1044, r] for r in ("nearest", "up", "down")] == [0, 0, 0]


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
