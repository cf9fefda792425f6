"""Channel routes: through channel shuffles too deep for a balanced selection of positions, filters are reordered so
that every kept channel takes its road, and any rate prunes and compacts exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from test_channel_ties import ShuffleStage, assert_exact, randomize, trunk, zero_filters
from torch import nn

from lightning_compress.graph import compact, filter_groups
from lightning_compress.graph.channel_routes import group_routes
from lightning_compress.graph.compact import replay_compactions
from lightning_compress.pruning.groups import (
    from_dependency_group,
    group_keep_mask,
    prune_filter_groups,
    zero_group_channels,
)
from lightning_compress.utils.rounding import round_count

X = torch.randn(2, 3, 4, 4)


def test_a_stage_too_deep_for_positions_prunes_through_routes_and_compacts_exactly() -> None:
    model = randomize(ShuffleStage(width=4, blocks=4))  # three chunks of a width of 4: no balanced unit selection
    zeroed = prune_filter_groups(model, X, 0.5)
    small, plan = compact(model, X, return_plan=True)
    assert zeroed == 5 * 2 + 4 and plan.skipped == []  # 2 of 4 filters of the five producers, 4 of the stem's 8
    assert small.left.out_channels == small.right.out_channels == 2 and small.head.in_channels == 4
    assert all(branch[0].in_channels == branch[0].out_channels == 2 for branch in small.branches)
    assert any(order != sorted(order) for order in plan.orders.values())  # reordered, not sliced
    assert_exact(model, small, X)
    assert_exact(model, small, torch.randn(5, 3, 6, 6))  # any batch and size


@pytest.mark.parametrize("rounding", ["nearest", "up", "down"])
@pytest.mark.parametrize("sparsity", [0.2, 0.4, 0.7])
@pytest.mark.parametrize("seed", range(3))
def test_routed_selections_of_any_scores_compact_exactly(seed: int, sparsity: float, rounding: str) -> None:
    model = randomize(ShuffleStage(width=16, blocks=5))
    group = trunk(model, X)
    assert group.ties is not None and group.ties.routes is not None
    scores = torch.rand(group.size, generator=torch.Generator().manual_seed(seed))
    k = round_count(sparsity * group.size, rounding)
    keep = group_keep_mask(scores, k, group.ties, rounding)
    for producer, indices in group.producers.items():  # every producer loses its share
        lost = sum(1 for k_, i in enumerate(indices) if i is not None and not keep[k_])
        assert lost == round_count(16 * k / group.size, rounding), producer
    zero_group_channels(from_dependency_group(group), dict(model.named_modules()), keep, batchnorm=True)
    small, plan = compact(model, X, return_plan=True)
    assert plan.skipped == [] and small.left.out_channels == int(keep[: 16].sum())
    assert_exact(model, small, X)


def test_within_a_route_the_highest_scores_stay() -> None:
    group = trunk(ShuffleStage(width=8, blocks=3), X)
    routes = group.ties.routes
    scores = torch.arange(group.size, dtype=torch.float32)
    keep = routes.keep_mask(scores, 16, "nearest")
    assert keep is not None
    for k in (~keep).nonzero().flatten().tolist():  # a pruned channel scores below every kept one of its route
        same = [j for j in range(group.size) if routes.producer[j][0] == routes.producer[k][0]
                and routes.route[j] == routes.route[k] and keep[j]]
        assert all(scores[j] > scores[k] for j in same)


def test_a_selection_off_the_routes_falls_back_to_units_with_reasons() -> None:
    model = randomize(ShuffleStage(width=8, blocks=3))
    group = trunk(model, X)
    # one filter of each producer, all taking the road that ends first: more of it go than the compacted network has
    # slots for, so the routes refuse it; the same positions of left and right make a unit, balanced by a branch
    zero_filters(model, {"left": [7], "right": [7], "branches.0.0": [7], "branches.1.0": [7]})
    keep = torch.ones(group.size, dtype=torch.bool)
    for indices in group.producers.values():
        keep[[k for k, i in enumerate(indices) if i == 7]] = False
    assert isinstance(group.ties.routes.orders(keep), str)
    small, plan = compact(model, X, return_plan=True)
    assert_exact(model, small, X)
    assert plan.orders == {}


def test_groups_without_a_shuffle_have_no_routes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    (group, _) = filter_groups(model, X)
    assert group.ties is None


def test_a_routed_compaction_replays_on_a_fresh_model_from_the_removed_filters() -> None:
    model = randomize(ShuffleStage(width=8, blocks=4))
    fresh = copy.deepcopy(model)
    prune_filter_groups(model, X, 0.4)
    removed = {name: m.weight.detach().flatten(1).eq(0).all(1).nonzero().flatten().tolist()
               for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    small = compact(model, X)
    replay_compactions(fresh, [{n: r for n, r in removed.items() if r}], X)
    fresh.load_state_dict(small.state_dict())  # the same shapes, in the same order
    assert_exact(small, fresh, X)


def test_routes_need_one_producer_per_channel() -> None:
    group = trunk(ShuffleStage(width=8, blocks=3), X)
    graph_routes = group.ties.routes
    assert group_routes(graph_routes.graph, group) is not None
    group.layernorms = {"norm": [0] * group.size}  # a LayerNorm over them: not routed
    assert group_routes(graph_routes.graph, group) is None
