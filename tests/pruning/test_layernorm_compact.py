"""LayerNorm over channels (ConvNeXt's residual stream): pruned channels leave the norm exactly, their constant inputs
kept in a CompactLayerNorm; unknown inputs and other norms keep their channels with a reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_trainer
from torch import nn

from lightning_compress import FilterPruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule
from lightning_compress.graph import compact, filter_groups, zero_filter_indices
from lightning_compress.graph.compact import replay_compactions
from lightning_compress.graph.layernorm import CompactLayerNorm
from lightning_compress.pruning.groups import prune_filter_groups
from lightning_compress.pruning.schedules import Constant


class LayerNorm2d(nn.LayerNorm):
    """torchvision's: F.layer_norm on its own parameters between two permutes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """Stem with LayerNorm2d, one channels-last block (depthwise, LayerNorm, MLP, layer scale) on a residual
    stream, pooled LayerNorm head."""

    def __init__(self, width: int = 8, norm2d: type[nn.Module] = LayerNorm2d) -> None:
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(1, width, 2, stride=2), norm2d(width)
        self.dw, self.norm = nn.Conv2d(width, width, 3, padding=1, groups=width), nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.scale = nn.Parameter(torch.full((width, 1, 1), 0.5))
        self.head_norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)
        with torch.no_grad():
            for norm in (self.stem_norm, self.norm, self.head_norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_norm(self.stem(x))
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        x = x + self.scale * y
        return self.head(self.head_norm(x.mean((2, 3))))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def masked_and_compact(model: nn.Module, x: torch.Tensor, edit=None):  # type: ignore[no-untyped-def]
    model.eval()
    prune_filter_groups(model, x, 0.5)
    if edit is not None:
        edit(model)
    small, plan = compact(model, x, return_plan=True)
    with torch.no_grad():
        return model, small, plan, relative(small(x), model(x))


def test_layernorm_channels_are_pruned_and_compacted_exactly() -> None:
    x = torch.randn(4, 1, 8, 8)
    groups = {tuple(g.producers): g for g in filter_groups(TinyConvNeXt(), x)}
    stream = groups[("stem", "fc2")]
    assert stream.blocked == [] and set(stream.layernorms) == {"stem_norm", "norm", "head_norm"}
    model, small, plan, difference = masked_and_compact(TinyConvNeXt(), x)
    assert difference <= 1e-5 and plan.skipped == []
    assert small.stem.out_channels == small.fc2.out_features == small.head.in_features == 4
    assert isinstance(small.norm, CompactLayerNorm) and small.norm.dim == -1 and small.norm.channels == 8
    assert isinstance(small.stem_norm, CompactLayerNorm) and small.stem_norm.dim == 1
    assert tuple(small.norm.weight.shape) == (4,) and small.norm.removed.tolist() == [0.0] * 4
    assert set(small.state_dict()) == set(model.state_dict())  # zero constants: the user's keys only


def test_a_layernorm_input_not_constant_keeps_its_channel_with_a_reason() -> None:
    def revive(model: nn.Module) -> None:  # channel 0's stream is 1 and its depthwise filter spreads it at borders
        pruned = int(model.stem.weight.flatten(1).eq(0).all(1).nonzero()[0])
        with torch.no_grad():
            model.stem_norm.bias[pruned] = 1.0
            model.dw.weight[pruned] = torch.rand(1, 3, 3) + 0.1

    x = torch.randn(4, 1, 8, 8)
    _, small, plan, difference = masked_and_compact(TinyConvNeXt(), x, revive)
    assert difference <= 1e-5 and small.stem.out_channels == 5
    assert [(len(p), why) for _, p, why in plan.skipped] == [(1, plan.skipped[0][2])]
    assert "LayerNorm 'norm' reads it as a non-constant" in plan.skipped[0][2]


def test_non_zero_constants_stay_in_the_statistics_and_in_the_state() -> None:
    def shift(model: nn.Module) -> None:  # pruned channels reach head_norm as the constant 1
        pruned = model.stem.weight.flatten(1).eq(0).all(1)
        with torch.no_grad():
            model.stem_norm.bias[pruned] = 1.0

    x = torch.randn(4, 1, 8, 8)
    model, small, plan, difference = masked_and_compact(TinyConvNeXt(), x, shift)
    assert difference <= 1e-5 and plan.skipped == [] and small.stem.out_channels == 4
    assert small.head_norm.removed.tolist() == [1.0] * 4 and "head_norm.removed" in small.state_dict()
    fresh = copy.deepcopy(small)
    fresh.head_norm.removed.zero_()
    fresh.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert relative(fresh(x), model(x)) <= 1e-5
    again = compact(small, x)  # a compact norm compacts again (nothing more to remove here)
    with torch.no_grad():
        assert relative(again(x), model(x)) <= 1e-5


def test_a_compact_layernorm_is_pruned_and_compacted_again() -> None:
    x = torch.randn(4, 1, 8, 8)
    _, small, _, _ = masked_and_compact(TinyConvNeXt(width=12), x)
    _, smaller, plan, difference = masked_and_compact(small, x)
    assert difference <= 1e-5 and plan.skipped == [] and smaller.stem.out_channels == 3
    assert smaller.norm.channels == 12 and smaller.norm.removed.numel() == 9


class ScaledNorm2d(LayerNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize(("norm2d", "reason"), [
    (ScaledNorm2d, "does not compute a LayerNorm over its input's channel dimension"),
    (lambda width: nn.GroupNorm(2, width), "normalizes over channels"),
])
def test_other_norms_over_channels_stay_blocked(norm2d, reason) -> None:  # type: ignore[no-untyped-def]
    groups = {tuple(g.producers): g for g in filter_groups(TinyConvNeXt(norm2d=norm2d), torch.randn(2, 1, 8, 8))}
    assert any(reason in r for r in groups[("stem",)].blocked)  # the norm's output is a new, blocked, channel set


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_filter_pruning_masks_layernorms_so_the_model_compacts_exactly(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    module = ClassifierModule(TinyConvNeXt(), lr=3e-3, lr_scheduler="none")
    pruning = FilterPruning(sparsity=0.5, mode=mode, schedule=Constant(), recalibration_batches=0,
                            recovery_epochs=1 if mode == "soft" else None)
    make_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0, logger=False,
                 callbacks=[pruning]).fit(module, DigitsDataModule(batch_size=32))
    model = module.compression_target.eval()
    assert [n for g in pruning.groups for n in g.layernorms] == ["stem_norm", "norm", "head_norm"]
    assert int(model.norm.weight.eq(0).sum()) == int(model.norm.bias.eq(0).sum()) == 4
    x = torch.randn(8, 1, 8, 8)
    small, plan = compact(model, x, return_plan=True)
    with torch.no_grad():
        assert relative(small(x), model(x)) <= 1e-5
    assert plan.skipped == [] and small.stem.out_channels == 4 and isinstance(small.head_norm, CompactLayerNorm)


def test_a_replayed_compaction_takes_the_checkpoint_of_the_compacted_run() -> None:
    x = torch.randn(4, 1, 8, 8)
    run = TinyConvNeXt().eval()
    prune_filter_groups(run, x, 0.5)
    event = zero_filter_indices(run)
    masked = copy.deepcopy(run)
    compact(run, x, inplace=True)
    fresh = TinyConvNeXt().eval()  # other weights: its LayerNorms are zeroed as the run's were masked
    replay_compactions(fresh, [event], x)
    fresh.load_state_dict(run.state_dict())
    with torch.no_grad():
        assert isinstance(fresh.norm, CompactLayerNorm) and relative(fresh(x), masked(x)) <= 1e-5
