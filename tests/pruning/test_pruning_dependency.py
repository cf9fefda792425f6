"""Tracing front ends and the channel dependency analysis: ties, offsets, blocks and constant values."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.graph.dependency import filter_groups
from lightning_compress.graph.tracing import is_leaf, op_name, trace
from lightning_compress.pruning import build_graph, compact


def test_op_names_are_normalized() -> None:
    assert [op_name(f) for f in (operator.iadd, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_)] == [
        "add"] * 4
    assert (op_name(F.relu), op_name("view"), op_name(nn.Conv2d(1, 1, 1)), op_name(F.max_pool2d)) == (
        "relu", "view", "Conv2d", "max_pool2d")


def test_leaf_modules() -> None:
    class MyConv(nn.Conv2d):
        pass

    assert is_leaf(nn.ReLU()) and is_leaf(MyConv(1, 1, 1)) and not is_leaf(nn.Sequential())
    assert not is_leaf(MLPBlock())


class MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def test_both_front_ends_record_the_same_calls_and_restore_training_flags() -> None:
    model = MLPBlock().train()
    by_fx, by_hooks = trace(model, torch.randn(2, 4), "fx"), trace(model, torch.randn(2, 4), "hooks")
    assert [c.name for c in by_fx.calls] == [c.name for c in by_hooks.calls] == ["fc1", "relu", "fc2"]
    assert model.training and model.fc1.training
    with pytest.raises(ValueError, match="'jit'"):
        trace(model, torch.randn(2, 4), "jit")


class Blocked(nn.Module):
    """Each branch meets something the analysis keeps intact."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(2, 4, 1) for _ in range(4))
        self.shared = nn.Conv2d(4, 4, 1)
        self.norm = nn.GroupNorm(2, 4)
        self.seq = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)[:, :2]  # indexing
        b1, b2 = self.b(x).chunk(2, dim=1)  # several outputs
        c = self.shared(self.shared(self.c(x)))  # a module called twice
        d = self.norm(self.d(x))  # a norm across channels
        e = self.seq(x.flatten(2).transpose(1, 2).repeat(1, 1, 2))  # Linear on a 3-d input
        return a.sum() + b1.sum() + b2.sum() + c.mean(1).sum() + d.sum() + e.sum()


def test_unsupported_operations_block_their_channels() -> None:
    groups = {tuple(g.producers): g.blocked for g in filter_groups(Blocked(), torch.randn(2, 2, 3, 3))}
    assert any("getitem selects channels by position" in reason for reason in groups[("a",)])
    assert any("over the batch or channel dimension" in reason for reason in groups[("b",)])
    assert any("called more than once" in reason for reason in groups[("c",)])
    assert any("GroupNorm" in reason for reason in groups[("d",)])
    assert any("channels in dimensions [(2,)]" in reason for reason in groups[("seq",)])  # Linear on the last dim
    assert ("shared",) not in groups  # opaque calls produce no filters
    chunked = next(g for g in filter_groups(Blocked(), torch.randn(2, 2, 3, 3)) if "b" in g.producers)
    assert chunked.size == 4 and chunked.ties is not None  # equal chunks lose equally many channels
    assert chunked.ties.balances == [([0, 1], [2, 3])]


def test_a_channel_tied_by_multiplication_and_mean_over_channels_blocks() -> None:
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 4)
            self.head = nn.Conv2d(4, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.conv(x))
            scale = torch.sigmoid(self.fc(y.mean((2, 3)))).view(y.size(0), -1, 1, 1)
            z = self.head(y * scale)
            return z + z.mean(1, keepdim=True)

    groups = {tuple(g.producers): g for g in filter_groups(SE(), torch.randn(2, 1, 4, 4))}
    assert set(groups) == {("conv", "fc"), ("head",)}  # the excitation ties fc's features to conv's channels
    assert groups[("conv", "fc")].consumers == {"fc": [[0], [1], [2], [3]], "head": [[0], [1], [2], [3]]}
    assert any("mean over the batch or channel dimension" in r for r in groups[("head",)].blocked)


def test_concat_offsets_and_non_channel_concat_ties() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv1d(1, 2, 1), nn.Conv1d(1, 3, 1), nn.Conv1d(1, 5, 1)
            self.head = nn.Conv1d(5, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            joined = torch.cat([self.a(x), self.b(x)], dim=1)  # channels 0-1 from a, 2-4 from b
            longer = torch.cat([joined, self.c(x)], dim=-1)  # c's channels tied to a's and b's one by one
            return self.head(longer)

    for method in ("fx", "hooks"):
        (group, head) = build_graph(Cat(), torch.randn(2, 1, 3), method=method).groups()
        assert group.producers == {"a": [0, 1, None, None, None], "b": [None, None, 0, 1, 2], "c": [0, 1, 2, 3, 4]}
        assert group.consumers == {"head": [[0], [1], [2], [3], [4]]} and group.blocked == []
        assert head.producers == {"head": [0, 1]} and head.blocked == ["model output"]


def test_constant_values_follow_batchnorm_and_activations() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Sigmoid(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[0].weight[0] = 0
        model[0].bias[0] = 1.0
        model[1].running_mean.fill_(0.5), model[1].running_var.fill_(4.0 - 1e-5)
        model[1].weight.fill_(2.0), model[1].bias.fill_(0.25)
    graph = build_graph(model, torch.randn(4, 3))
    reads = next(meta.reads for meta in graph.merged().values() if meta.reads and meta.reads[0][:2] == ("3", 0))
    # sigmoid(0.25 + 2 * (1 - 0.5) / 2) = sigmoid(0.75)
    assert reads == [("3", 0, pytest.approx(torch.sigmoid(torch.tensor(0.75)).item()), True)]
    small = compact(model, torch.randn(4, 3))
    assert small[0].out_features == 1 and small[3].in_features == 1
    x = torch.randn(5, 3)
    assert torch.allclose(small(x), model(x), atol=1e-6)


def test_squeeze_excitation_zero_channels_are_removable() -> None:
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.squeeze, self.excite = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 2), nn.Linear(2, 4)
            self.head = nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.conv(x))
            scale = torch.sigmoid(self.excite(F.relu(self.squeeze(y.mean((2, 3))))))
            return self.head(y * scale[:, :, None, None]).flatten(1)

    model = SE().eval()
    with torch.no_grad():
        model.conv.weight[[0, 2]] = 0
        model.conv.bias[[0, 2]] = 0
    x = torch.randn(3, 1, 5, 5)
    small = compact(model, x)
    # conv's channels 0 and 2 go with excite's outputs 0 and 2 (0 * sigmoid(...) = 0) and squeeze's inputs
    assert (small.conv.out_channels, small.excite.out_features, small.squeeze.in_features) == (2, 2, 2)
    assert small.head.in_channels == 2 and torch.allclose(small(x), model(x), atol=1e-5)


def test_no_layer_of_a_concatenation_group_becomes_empty() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv1d(1, 2, 1), nn.Conv1d(1, 2, 1), nn.Conv1d(1, 4, 1)
            self.head = nn.Conv1d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.a(x), self.b(x)], dim=1) + self.c(x))

    model = Tied().eval()
    with torch.no_grad():
        for conv, rows in ((model.a, [0, 1]), (model.c, [0, 1, 2])):
            conv.weight[rows] = 0
            conv.bias[rows] = 0
    x = torch.randn(2, 1, 3)
    small, plan = compact(model, x, return_plan=True)
    # a's channels are dead in a and c, but a keeps one; c's channel 2 is alive in b
    assert (small.a.out_channels, small.b.out_channels, small.c.out_channels, small.head.in_channels) == (1, 2, 3, 3)
    assert plan.skipped == [(0, [0], "a layer keeps at least one channel")]
    assert torch.allclose(small(x), model(x), atol=1e-6)
