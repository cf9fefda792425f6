"""The patterns of real CNNs, in miniature (always run): a ReLU reused across a residual block, grouped
convolutions, channels-last MLPs with LayerNorm and a layer scale, stochastic depth, channel shuffle and F.linear
on a layer's weight. Each is pruned by the dependency groups and compacted exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.graph import compact, filter_groups
from lightning_compress.pruning.groups import prune_filter_groups


def randomize_batchnorm(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)


def prune_and_compact(model: nn.Module, x: torch.Tensor, sparsity: float = 0.5) -> tuple[nn.Module, int]:
    model.eval()
    randomize_batchnorm(model)
    zeroed = prune_filter_groups(model, x, sparsity)
    small = compact(model, x)
    assert isinstance(small, nn.Module)
    with torch.no_grad():
        reference, out = model(x), small.eval()(x)
    assert float((out - reference).norm() / reference.norm()) <= 1e-4
    return small, zeroed


class ResNetBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice, an in-place residual addition."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def tiny_resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), ResNetBlock(),
                         ResNetBlock(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_a_relu_reused_across_residual_blocks_is_followed_per_call() -> None:
    groups = filter_groups(tiny_resnet(), torch.randn(2, 3, 6, 6))
    stem = next(g for g in groups if "0" in g.producers)
    assert set(stem.producers) == {"0", "3.conv2", "4.conv2"} and stem.blocked == []  # tied across the additions
    assert all(not g.blocked for g in groups if "3.conv1" in g.producers)
    small, zeroed = prune_and_compact(tiny_resnet(), torch.randn(2, 3, 6, 6))
    assert zeroed == 12 and small[0].out_channels == small[3].conv2.out_channels == small[7].in_features == 4


class Grouped(nn.Module):
    """RegNet's bottleneck: 1x1 conv, a 3x3 conv with groups=2, 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.bn_b(self.b(F.relu(self.bn_a(self.a(x)))))))


def test_grouped_convolutions_lose_the_same_positions_in_every_group() -> None:
    model = Grouped()
    (group, _) = filter_groups(model, torch.randn(2, 3, 5, 5))
    assert set(group.producers) == {"a", "b"} and group.segments == [(i // 4, i % 4) for i in range(8)]
    small, zeroed = prune_and_compact(model, torch.randn(2, 3, 5, 5))
    assert zeroed == 4 and small.b.groups == 2 and tuple(small.b.weight.shape) == (4, 2, 3, 3)
    assert small.a.out_channels == small.c.in_channels == 4


class ChannelsLast(nn.Module):
    """ConvNeXt's block: depthwise conv, permute, LayerNorm, Linear MLP, layer scale, stochastic depth."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)  # a layer scale on prunable channels
        self.dw, self.norm = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.LayerNorm(6)
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x))) * self.scale
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        keep = torch.ones(x.shape[0], 1, 1, 1)  # stochastic depth's per-sample scale
        x = x + y * keep
        return self.head(x.mean((2, 3)))


def test_channels_last_mlps_and_layernorm_channels_prune() -> None:
    groups = {tuple(g.producers): g for g in filter_groups(ChannelsLast(), torch.randn(2, 3, 5, 5))}
    assert groups[("fc1",)].blocked == [] and groups[("fc1",)].consumers == {"fc2": [[i] for i in range(12)]}
    assert groups[("stem", "fc2")].blocked == [] and groups[("stem", "fc2")].layernorms == {"norm": list(range(6))}
    model = ChannelsLast()
    small, zeroed = prune_and_compact(model, torch.randn(2, 3, 5, 5))
    assert zeroed == 9 and small.fc1.out_features == small.fc2.in_features == 6 and small.stem.out_channels == 3


class ScaledChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.conv(x))) * self.scale)


def test_a_per_channel_parameter_of_a_block_shrinks_with_its_channels() -> None:
    (group, _) = filter_groups(ScaledChannels(), torch.randn(2, 3, 5, 5))
    assert group.parameters == {"scale": list(range(6))} and group.blocked == []
    small, _ = prune_and_compact(ScaledChannels(), torch.randn(2, 3, 5, 5))
    assert tuple(small.scale.shape) == (3, 1, 1) and small.out.in_channels == 3


class Shuffle(nn.Module):
    """ShuffleNetV2's unit: split in halves, one branch convolved, concatenated and shuffled."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.branch, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.stem(x).chunk(2, dim=1)
        y = torch.cat((left, F.relu(self.branch(right))), dim=1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(y)


def test_channel_shuffle_and_chunks_tie_positions_and_compact_exactly() -> None:
    groups = filter_groups(Shuffle(), torch.randn(2, 3, 4, 4))
    tied = next(g for g in groups if "stem" in g.producers)
    assert set(tied.producers) == {"stem", "branch"} and tied.blocked == [] and tied.size == 12
    assert tied.ties is not None and tied.ties.num_units == 8  # stem p and branch p go together: the shuffle's rows
    assert tied.ties.balances == [([0, 1, 2, 3], [4, 5, 6, 7])]  # the chunks of stem lose equally many
    model = Shuffle().eval()
    with torch.no_grad():  # channel 0 of each half and of the branch: one unit and one channel to balance it
        model.stem.weight[[0, 4]] = 0
        model.stem.bias[[0, 4]] = 0
        model.branch.weight[0] = 0
        model.branch.bias[0] = 0
    x = torch.randn(2, 3, 4, 4)
    small = compact(model, x)
    assert small.stem.out_channels == 6 and small.branch.out_channels == 3 and small.head.in_channels == 6
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


class FunctionalLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(F.linear(x, self.fc1.weight, self.fc1.bias)))


def test_f_linear_on_a_layers_own_weight_is_that_layer() -> None:
    (group, _) = filter_groups(FunctionalLinear(), torch.randn(2, 4))
    assert group.producers == {"fc1": list(range(8))} and group.blocked == []
    small, zeroed = prune_and_compact(FunctionalLinear(), torch.randn(3, 4))
    assert zeroed == 4 and small.fc1.out_features == small.fc2.in_features == 4


class PaddedConvs(nn.Module):
    """Padding outside the convolution: Hugging Face MobileNetV2's F.pad ("same" as in TensorFlow) and
    EfficientNet's nn.ZeroPad2d, and a constant border of 1 (a pruned channel's value 0 is not kept there)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_a(self.a(F.pad(x, (1, 1, 1, 1)))))
        x = F.relu(self.bn_b(self.b(self.pad(x))))
        x = self.c(F.pad(x, (1, 1, 1, 1), value=1.0))
        return self.head(x.mean((2, 3)))


def test_spatial_padding_keeps_channels_and_compacts_exactly() -> None:
    torch.manual_seed(0)
    model, x = PaddedConvs(), torch.randn(2, 3, 12, 12)
    groups = filter_groups(model.eval(), x)
    assert [g.blocked for g in groups if g.producers.keys() != {"head"}] == [[], [], []]
    small, zeroed = prune_and_compact(model, x)
    assert zeroed == 12 and small.a.out_channels == 4 and small.c.out_channels == 4  # 50% of the three groups
    # b's zeroed filters still output relu(bias of bn_b), which the border of 1 makes non-constant: kept back
    assert small.b.out_channels == 8
