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


# CompactLayerNorm against nn.LayerNorm over the padded input, in both of its forms


def padded_reference(norm: nn.LayerNorm, x: torch.Tensor, constants: torch.Tensor, dim: int) -> torch.Tensor:
    """``norm`` (over all channels, the removed ones last) on ``x`` with the constants put back, kept channels out."""
    last = x.movedim(dim, -1)
    full = torch.cat([last, constants.to(x.dtype).expand(*last.shape[:-1], constants.numel())], -1)
    return norm(full)[..., :last.shape[-1]].movedim(-1, dim)


def compact_pair(kept: int, channels: int, constants: torch.Tensor, dim: int,
                 affine: tuple[bool, bool] = (True, True)) -> tuple[nn.LayerNorm, CompactLayerNorm]:
    norm = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=affine[0], bias=affine[1])
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.uniform_(0.5, 1.5)
        if norm.bias is not None:
            norm.bias.normal_(0, 0.3)
    removed = {kept + i: float(v) for i, v in enumerate(constants)}
    return norm.eval(), CompactLayerNorm.from_layernorm(norm, removed, dim).eval()


def inputs(rows: int, kept: int, dim: int, generator: torch.Generator, offset: float = 0.3) -> torch.Tensor:
    x = torch.randn(2, rows // 2, kept, generator=generator) * 2 + offset
    return x.movedim(-1, dim).contiguous() if dim == 1 else x  # channels first: contiguous in that layout


FORMS = {"padded": 10 ** 12, "closed": 0}  # closed_form_size: never or always


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dim", [-1, 1])
@pytest.mark.parametrize("nonzero", [False, True])
@pytest.mark.parametrize(("kept", "channels"), [(58, 96), (115, 192), (16, 32), (1, 8), (7, 8)])
def test_compact_layernorm_matches_the_norm_over_the_padded_input(form: str, dim: int, nonzero: bool, kept: int,
                                                                  channels: int) -> None:
    generator = torch.Generator().manual_seed(kept * channels + dim)
    constants = (torch.randn(channels - kept, generator=generator) + 0.5 if nonzero
                 else torch.zeros(channels - kept))
    norm, small = compact_pair(kept, channels, constants, dim)
    small.closed_form_size = FORMS[form]
    x = inputs(64, kept, dim, generator)
    with torch.no_grad():
        out, reference = small(x), padded_reference(norm, x, constants, dim)
    assert out.shape == x.shape and relative(out, reference) <= 2e-6
    assert out.movedim(dim, -1).is_contiguous()  # channels last in memory, as LayerNorm2d's output


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("affine", [(False, False), (True, False), (True, True)])
def test_compact_layernorm_without_scale_or_shift(form: str, affine: tuple[bool, bool]) -> None:
    generator = torch.Generator().manual_seed(1)
    constants = torch.randn(40, generator=generator)
    norm, small = compact_pair(24, 64, constants, -1, affine)
    small.closed_form_size = FORMS[form]
    x = inputs(32, 24, -1, generator)
    with torch.no_grad():
        assert relative(small(x), padded_reference(norm, x, constants, -1)) <= 2e-6


def test_the_closed_form_stays_exact_far_from_zero_and_in_double() -> None:
    """Inputs whose mean is 500 times their spread, the constants near it: the centred (two-pass) statistics keep
    float32 as close to a float64 reference as the padded LayerNorm is."""
    generator = torch.Generator().manual_seed(2)
    constants = 1000 + torch.randn(38, generator=generator)
    norm, small = compact_pair(58, 96, constants, -1)
    x = inputs(64, 58, -1, generator, offset=1000.0)
    with torch.no_grad():
        exact = padded_reference(copy.deepcopy(norm).double(), x.double(), constants.double(), -1)
        padded = padded_reference(norm, x, constants, -1)
        small.closed_form_size = 0
        closed = small(x)
        assert relative(closed, exact) <= max(2 * relative(padded, exact), 1e-6)
        double = copy.deepcopy(small).double()
        assert double(x.double()).dtype == torch.float64 and relative(double(x.double()), exact) <= 1e-12


def test_inference_takes_the_closed_form_on_large_float_cpu_inputs_only(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[tuple[int, ...]] = []
    closed_form = CompactLayerNorm._closed_form

    def counted(self, x, *args):  # type: ignore[no-untyped-def]
        calls.append(tuple(x.shape))
        return closed_form(self, x, *args)

    monkeypatch.setattr(CompactLayerNorm, "_closed_form", counted)
    generator = torch.Generator().manual_seed(3)
    _, small = compact_pair(58, 96, torch.zeros(38), 1)
    large, few = inputs(1024, 58, 1, generator), inputs(16, 58, 1, generator)
    assert 1024 * 96 >= small.closed_form_size > 16 * 96
    with torch.no_grad():
        small(large), small(few), small.half()(large.half())
    with torch.inference_mode():
        small.float()(large)
    small(large).sum().backward()  # autograd: the padded form, differentiated as one layer_norm
    assert calls == [(2, 512, 58), (2, 512, 58)] and small.weight.grad is not None


@pytest.mark.parametrize("dim", [-1, 1])
@pytest.mark.parametrize("nonzero", [False, True])
def test_gradients_match_the_norm_over_the_padded_input(dim: int, nonzero: bool) -> None:
    generator = torch.Generator().manual_seed(4)
    constants = torch.randn(16, generator=generator) if nonzero else torch.zeros(16)
    norm, small = compact_pair(16, 32, constants, dim)  # half of the channels removed
    small.closed_form_size = 0  # autograd takes the padded form whatever the size
    x = inputs(2048, 16, dim, generator).requires_grad_()
    grad = torch.randn(x.shape, generator=generator)
    (small(x) * grad).sum().backward()
    reference_x = x.detach().clone().requires_grad_()
    (padded_reference(norm, reference_x, constants, dim) * grad).sum().backward()
    assert relative(x.grad, reference_x.grad) <= 1e-5
    assert relative(small.weight.grad, norm.weight.grad[:16]) <= 1e-5
    assert relative(small.bias.grad, norm.bias.grad[:16]) <= 1e-5


@pytest.mark.parametrize("form", list(FORMS))
def test_inference_follows_changes_of_parameters_constants_shapes_and_dtypes(form: str) -> None:
    generator = torch.Generator().manual_seed(5)
    constants = torch.zeros(38)
    norm, small = compact_pair(58, 96, constants, -1)
    small.closed_form_size = FORMS[form]
    x = torch.randn(2, 8, 58, generator=generator)
    with torch.no_grad():
        for step in range(4):  # the same shape: what was prepared for it must follow the tensors changed in place
            assert relative(small(x), padded_reference(norm, x, constants, -1)) <= 2e-6, step
            if step == 0:
                norm.weight.mul_(1.5), small.weight.mul_(1.5)
            if step == 1:
                norm.bias[:58].add_(0.1), small.bias.add_(0.1)
            if step == 2:
                constants[:5] = 2.0
                small.removed[:5] = 2.0
                norm.eps = small.eps = 1e-2
        for shape in [(2, 300, 58), (3, 8, 58)]:
            x = torch.randn(shape, generator=generator)
            assert relative(small(x), padded_reference(norm, x, constants, -1)) <= 2e-6, shape
        small.load_state_dict(small.state_dict())  # the non-zero constants come back through the state
        assert relative(small(x), padded_reference(norm, x, constants, -1)) <= 2e-6
        x = torch.randn(2, 400, 58, generator=generator, dtype=torch.float64)
        double = copy.deepcopy(norm).double()
        small.double()
        assert relative(small(x), padded_reference(double, x, constants, -1)) <= 1e-12


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_a_traced_compact_layernorm_follows_the_batch_size() -> None:
    generator = torch.Generator().manual_seed(6)
    constants = torch.randn(38, generator=generator)
    norm, small = compact_pair(58, 96, constants, 1)
    small.closed_form_size = 0
    with torch.no_grad():
        traced = torch.jit.trace(small, inputs(2048, 58, 1, generator))
        x = inputs(64, 58, 1, generator)
        assert relative(traced(x), padded_reference(norm, x, constants, 1)) <= 2e-6
