"""compact(): smaller dense models with the masked model's eval outputs, on chains, groups, residuals, concats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress.demo import MLP, PlainCNN, ResidualCNN
from lightning_compress.pruning import compact, plan_compaction, zero_bn_for_pruned_filters, zero_filter_indices


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)


def zero_filters(model: nn.Module, filters: dict[str, list[int]]) -> None:
    with torch.no_grad():
        for name, indices in filters.items():
            module = model.get_submodule(name)
            module.weight[indices] = 0
            if module.bias is not None:
                module.bias[indices] = 0


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_equal(model: nn.Module, small: nn.Module, x: torch.Tensor) -> None:
    model.eval(), small.eval()
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max().item() < 1e-4
    assert num_parameters(small) < num_parameters(model)


class Conv1dChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 6, 3)
        self.fc = nn.Linear(6 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.view(x.size(0), -1))


def test_conv1d_chain_with_unpadded_consumer_folds_the_batchnorm_constant() -> None:
    model = Conv1dChain().eval()
    randomize_batchnorm(model)
    zero_filters(model, {"conv1": [1, 4, 6], "conv2": [0, 5]})
    x = torch.randn(4, 2, 10)
    small, plan = compact(model, x, return_plan=True)
    # conv2 has no padding: BN's constant for conv1's zero filters folds into conv2's bias exactly
    assert (small.conv1.out_channels, small.bn1.num_features, small.conv2.in_channels) == (5, 5, 5)
    assert (small.conv2.out_channels, small.fc.in_features) == (4, 4 * 8)  # blocks of 8 features per channel
    assert plan.skipped == [] and plan.graph is not None and plan.graph.trace.method == "fx"
    check_equal(model, small, x)
    assert model.conv1.out_channels == 8  # the original is untouched


class Conv2dChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_batchnorm_trap_padded_consumer_is_kept_until_bn_is_zeroed() -> None:
    model = Conv2dChain().eval()
    randomize_batchnorm(model)
    with torch.no_grad():
        model.bn1.bias[0] = 5.0  # relu(beta - gamma mu / sigma) > 0 for filter 0: a constant into a padded conv
        model.bn1.bias[2] = -5.0  # relu(beta - gamma mu / sigma) = 0 for filter 2: removable as is
    zero_filters(model, {"conv1": [0, 2], "conv2": [1]})
    x = torch.randn(2, 3, 6, 6)
    small, plan = compact(model, x, return_plan=True)
    assert small.conv1.out_channels == 5  # filter 0 kept: its constant feeds a padded conv
    assert small.conv2.out_channels == 3  # filter 1 folds into fc's bias through the average pool
    assert [(positions, "padded convolution" in reason) for _, positions, reason in plan.skipped] == [([0], True)]
    check_equal(model, small, x)
    assert zero_bn_for_pruned_filters(model, x) == 3  # bn1 channels 0, 2 and bn2 channel 1
    assert model.bn1.weight[0] == 0 and model.bn1.bias[0] == 0
    small = compact(model, x)
    assert (small.conv1.out_channels, small.conv2.in_channels, small.bn2.num_features) == (4, 4, 3)
    check_equal(model, small, x)


def test_zero_filter_indices() -> None:
    model = Conv2dChain()
    zero_filters(model, {"conv1": [3], "fc": [1]})
    assert zero_filter_indices(model) == {"conv1": [3], "fc": [1]}


class Separable(nn.Module):
    """conv -> BN -> depthwise (multiplier 1) -> BN -> pointwise; a grouped conv on a side branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.depthwise, self.bn_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pointwise = nn.Conv2d(8, 6, 1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn_dw(self.depthwise(x)))
        x = F.relu(self.grouped(F.relu(self.pointwise(x))))
        return self.fc(x.mean((2, 3)))


def test_depthwise_carries_channels_and_grouped_conv_ties_its_inputs_to_its_outputs() -> None:
    model = Separable().eval()
    randomize_batchnorm(model)
    zero_filters(model, {"conv": [1, 5], "pointwise": [0], "grouped": [2]})
    zero_bn_for_pruned_filters(model, torch.randn(2, 3, 5, 5))
    # the depthwise filters of the pruned channels still have weights: channel = bias + w * 0 = 0 after BN zeroing
    with torch.no_grad():
        model.depthwise.bias[[1, 5]] = 0
        model.bn_dw.weight[[1, 5]] = 0
        model.bn_dw.bias[[1, 5]] = 0
    x = torch.randn(2, 3, 5, 5)
    small, plan = compact(model, x, return_plan=True)
    assert small.conv.out_channels == small.depthwise.groups == small.depthwise.out_channels == 6
    assert small.bn_dw.num_features == 6 and small.pointwise.in_channels == 6
    # the grouped conv carries channel i in and out: filter 0 of pointwise alone (grouped's is live) stays
    assert small.pointwise.out_channels == 6 and small.grouped.out_channels == 6
    first = next(group for group in plan.groups if "conv" in group.producers)
    assert first.depthwise == {"depthwise": list(range(8))} and set(first.batchnorms) == {"bn", "bn_dw"}
    tied = next(group for group in plan.groups if "pointwise" in group.producers)
    assert set(tied.producers) == {"pointwise", "grouped"} and not tied.blocked
    assert tied.segments == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    check_equal(model, small, x)


class Branches(nn.Module):
    """Residual blocks with identity and 1x1 shortcuts, then a concatenation of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.a1, self.a2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 6, 1)
        self.left, self.right = nn.Conv2d(6, 3, 1), nn.Conv2d(6, 5, 1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(x + self.a2(F.relu(self.a1(x))))
        x = F.relu(self.shortcut(x) + self.b2(F.relu(self.b1(x))))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.head(x)), 2), 1))


def test_residual_groups_need_zeros_in_every_producer_and_cat_offsets_channels() -> None:
    model = Branches().eval()
    randomize_batchnorm(model)
    zero_filters(model, {"stem": [0, 1], "a2": [1, 2], "a1": [3], "b1": [0], "shortcut": [4, 5], "b2": [5],
                         "left": [1], "right": [0, 4], "head": [2]})
    x = torch.randn(2, 1, 8, 8)
    zero_bn_for_pruned_filters(model, x)
    small = compact(model, x)
    assert (small.stem.out_channels, small.a2.out_channels, small.a1.in_channels) == (3, 3, 3)  # channel 1 only
    assert (small.a1.out_channels, small.b1.out_channels) == (3, 5)
    assert (small.shortcut.out_channels, small.b2.out_channels, small.left.in_channels) == (5, 5, 5)
    assert (small.left.out_channels, small.right.out_channels, small.head.in_channels) == (2, 3, 5)
    assert (small.head.out_channels, small.fc.in_features) == (3, 3 * 16)
    check_equal(model, small, x)


def test_groups_of_the_residual_cnn() -> None:
    from lightning_compress.graph.dependency import filter_groups

    groups = filter_groups(ResidualCNN(width=4, depth=1, num_stages=2), torch.randn(2, 1, 8, 8))
    tied = {tuple(group.producers): group for group in groups}
    assert set(tied) == {("stem.conv", "stage1.0.conv2"), ("stage1.0.conv1",), ("stage2.0.conv1",),
                         ("stage2.0.conv2", "stage2.0.shortcut.0"), ("fc",)}
    stage1 = tied[("stem.conv", "stage1.0.conv2")]
    assert stage1.size == 4 and stage1.producers["stage1.0.conv2"] == [0, 1, 2, 3]
    assert set(stage1.batchnorms) == {"stem.bn", "stage1.0.bn2"}
    assert set(stage1.consumers) == {"stage1.0.conv1", "stage2.0.conv1", "stage2.0.shortcut.0"}
    assert tied[("fc",)].blocked == ["model output"]


class ControlFlow(nn.Module):
    """Data-dependent branching defeats torch.fx: the hooks front end takes over."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        if x.shape[-1] > 4:  # a Python bool from a shape: torch.fx cannot trace it
            x = x * 2.0
        x = self.conv2(x)
        return self.fc(x.mean(dim=(2, 3)))


def test_hooks_fallback_when_fx_fails() -> None:
    model = ControlFlow().eval()
    zero_filters(model, {"conv1": [0, 3], "conv2": [2]})
    x = torch.randn(3, 1, 7, 7)
    small, plan = compact(model, x, return_plan=True)
    assert plan.graph is not None and plan.graph.trace.method == "hooks" and plan.graph.trace.fx_error
    assert (small.conv1.out_channels, small.conv2.in_channels, small.fc.in_features) == (4, 4, 3)
    check_equal(model, small, x)


def test_hooks_and_fx_agree_on_the_residual_cnn() -> None:
    model = ResidualCNN(width=4, num_stages=2).eval()
    x = torch.randn(2, 1, 8, 8)
    by_fx = plan_compaction(model, x, method="fx").groups
    by_hooks = plan_compaction(model, x, method="hooks").groups
    assert [g.producers for g in by_fx] == [g.producers for g in by_hooks]
    assert [g.consumers for g in by_fx] == [g.consumers for g in by_hooks]


def test_whole_layer_pruned_keeps_one_channel_and_mlp_shrinks() -> None:
    model = MLP(in_features=16, hidden=(8, 6), num_classes=3).eval()
    zero_filters(model, {"layers.fc1": list(range(8)), "layers.fc2": [1]})
    x = torch.randn(4, 1, 4, 4)
    small, plan = compact(model, x, return_plan=True)
    assert small.layers.fc1.out_features == 1 and small.layers.fc2.in_features == 1
    # with fc1 dead, fc2 outputs its (relu'd) bias: constants that fold into the classifier's bias
    assert small.layers.fc2.out_features == 1 and small.classifier.in_features == 1
    assert any(reason == "a layer keeps at least one channel" for _, _, reason in plan.skipped)
    check_equal(model, small, x)


# ResidualCNN(width=16, depth=1)'s producers tied by residual sums (see test_groups_of_the_residual_cnn)
RESIDUAL_TIES = [("stem.conv", "stage1.0.conv2"), ("stage2.0.conv2", "stage2.0.shortcut.0"),
                 ("stage3.0.conv2", "stage3.0.shortcut.0")]


@pytest.mark.parametrize(
    "factory",
    [lambda: ResidualCNN(width=16, depth=1), lambda: PlainCNN(width=32), lambda: MLP(hidden=(128, 64))],
    ids=["ResidualCNN", "PlainCNN", "MLP"],
)
def test_reference_models_shrink_by_40_percent(factory) -> None:  # type: ignore[no-untyped-def]
    model = factory().eval()
    randomize_batchnorm(model)
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    generator = torch.Generator().manual_seed(1)
    zeroed: dict[str, set[int]] = {}
    for name in layers[:-1]:
        n = model.get_submodule(name).weight.shape[0]
        zeroed[name] = set(torch.randperm(n, generator=generator)[: int(0.4 * n)].tolist())
        zero_filters(model, {name: sorted(zeroed[name])})
    x = torch.randn(4, 1, 8, 8)
    zero_bn_for_pruned_filters(model, x)
    small = compact(model, x)
    check_equal(model, small, x)
    # every zeroed filter goes, except where a residual sum ties it to a live filter of another producer: 40% of
    # each untied layer, the shared zeros of a tied group; the classifier keeps its outputs
    ties = RESIDUAL_TIES if isinstance(model, ResidualCNN) else []
    for name in layers:
        partners = next((group for group in ties if name in group), (name,))
        removable = set.intersection(*(zeroed[p] for p in partners)) if name in zeroed else set()
        width = model.get_submodule(name).weight.shape[0]
        assert small.get_submodule(name).weight.shape[0] == width - len(removable), name
        if name in zeroed and len(partners) == 1:
            assert len(removable) == int(0.4 * width)
    if isinstance(model, PlainCNN):  # no residual ties, every layer pruned: the parameters fall to about 0.6^2
        assert num_parameters(small) < 0.45 * num_parameters(model)


class RandomStack(nn.Module):
    def __init__(self, widths: list[int], residual: list[bool], kernel: int) -> None:
        super().__init__()
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
        self.residual = []  # decided here: a shape test in forward would change meaning after compaction
        channels = 2
        for width, skip in zip(widths, residual, strict=False):
            self.convs.append(nn.Conv2d(channels, width, kernel, padding=kernel // 2))
            self.bns.append(nn.BatchNorm2d(width))
            self.residual.append(skip and channels == width)
            channels = width
        self.fc = nn.Linear(channels * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn, skip in zip(self.convs, self.bns, self.residual, strict=True):
            y = bn(conv(x))
            x = F.relu(y + x) if skip else F.relu(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


@settings(max_examples=6, deadline=None, derandomize=True, database=None)
@given(
    widths=st.lists(st.integers(2, 6), min_size=1, max_size=4),
    residual=st.lists(st.booleans(), min_size=4, max_size=4),
    kernel=st.sampled_from([1, 3]),
    seed=st.integers(0, 1000),
    zero_bn=st.booleans(),
)
def test_random_conv_bn_residual_stacks(widths, residual, kernel, seed, zero_bn) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    for i in range(1, len(widths)):
        widths[i] = widths[i - 1] if residual[i] else widths[i]  # a residual step keeps the width
    model = RandomStack(widths, residual, kernel).eval()
    randomize_batchnorm(model, seed)
    generator = torch.Generator().manual_seed(seed)
    for index, conv in enumerate(model.convs):
        pruned = (torch.rand(conv.out_channels, generator=generator) < 0.5).nonzero().flatten().tolist()
        zero_filters(model, {f"convs.{index}": pruned})
    x = torch.randn(2, 2, 6, 6)
    if zero_bn:
        zero_bn_for_pruned_filters(model, x)
    small, plan = compact(model, x, return_plan=True)
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max().item() < 1e-4
    assert (num_parameters(small) < num_parameters(model)) == (plan.num_removable > 0)
    for positions, group in zip(plan.removable, plan.groups, strict=True):
        assert len(positions) < group.size
