"""layernorm_statistics="kept": a pruned LayerNorm takes its statistics over the kept channels, and compaction gives a
plain LayerNorm (the user's class) with the same outputs; through FilterPruning, its checkpoints and resume."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from test_layernorm_compact import LayerNorm2d, TinyConvNeXt, relative
from torch import nn

from lightning_compress import FilterPruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule
from lightning_compress.graph import compact
from lightning_compress.graph.layernorm import CompactLayerNorm
from lightning_compress.graph.layernorm_statistics import (
    kept_layer_norm,
    kept_statistics,
    set_kept_statistics,
)
from lightning_compress.pruning import pruned_architecture
from lightning_compress.pruning.groups import prune_filter_groups
from lightning_compress.pruning.schedules import AGP


@pytest.mark.parametrize("dim", [-1, 1])
def test_kept_layer_norm_is_the_norm_over_the_kept_channels_and_passes_gradients_to_all(dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 6, 3, 3, generator=generator) * 3 + 1).movedim(1, dim).requires_grad_()
    keep = torch.tensor([True, False, True, True, False, True])
    weight = (torch.rand(6, generator=generator) + 0.5).requires_grad_()
    bias = torch.randn(6, generator=generator)
    y = kept_layer_norm(x, keep, weight, bias, 1e-5, dim)
    last = x.detach().movedim(dim, -1)
    reference = F.layer_norm(last[..., keep], (4,), weight.detach()[keep], bias[keep], 1e-5)
    torch.testing.assert_close(y.movedim(dim, -1)[..., keep], reference, atol=1e-5, rtol=0)
    mean, std = last[..., keep].mean(-1, keepdim=True), last[..., keep].var(-1, unbiased=False, keepdim=True)
    removed = (last[..., ~keep] - mean) / (std + 1e-5).sqrt() * weight.detach()[~keep] + bias[~keep]
    torch.testing.assert_close(y.movedim(dim, -1)[..., ~keep], removed, atol=1e-5, rtol=0)
    y.square().sum().backward()
    assert weight.grad is not None and bool(weight.grad[~keep].ne(0).all())  # a soft-pruned channel may regrow


def test_set_kept_statistics_installs_replaces_and_removes_one_hook() -> None:
    norm = nn.LayerNorm(4)
    set_kept_statistics(norm, torch.tensor([True, False, True, True]), -1)
    set_kept_statistics(norm, torch.tensor([False, True, True, True]), -1)
    hook = kept_statistics(norm)
    assert len(norm._forward_hooks) == 1 and hook is not None and hook.keep.tolist() == [False, True, True, True]
    copied = copy.deepcopy(norm)
    assert kept_statistics(copied) is not None and "keep" not in str(list(copied.state_dict()))
    set_kept_statistics(norm, torch.ones(4, dtype=torch.bool), -1)
    assert kept_statistics(norm) is None and len(norm._forward_hooks) == 0


@pytest.mark.parametrize(("norm", "keep", "message"), [
    (nn.LayerNorm(4), torch.zeros(4, dtype=torch.bool), "at least one true entry"),
    (nn.LayerNorm(4), torch.ones(3, dtype=torch.bool), "shape (3,)"),
    (CompactLayerNorm(3, 4, torch.ones(1)), torch.tensor([True, False, True]), "cannot also take them"),
])
def test_set_kept_statistics_refuses_a_mask_it_cannot_apply(norm: nn.LayerNorm, keep: torch.Tensor,
                                                           message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        set_kept_statistics(norm, keep, -1)
    assert kept_statistics(norm) is None


@pytest.mark.parametrize("statistics", ["all", "kept"])
def test_pruned_layernorms_compact_exactly_to_plain_ones_of_the_users_classes(statistics: str) -> None:
    x = torch.randn(4, 1, 8, 8)
    model = TinyConvNeXt().eval()
    with torch.no_grad():
        dense = model(x)
    prune_filter_groups(model, x, 0.5, layernorm_statistics=statistics)
    assert sum(kept_statistics(m) is not None for m in model.modules()) == (3 if statistics == "kept" else 0)
    small, plan = compact(model, x, return_plan=True)
    with torch.no_grad():
        pruned = model(x)
        assert relative(small(x), pruned) <= 1e-5 and plan.skipped == [] and small.stem.out_channels == 4
        assert relative(pruned, dense) > 0.05
    if statistics == "all":
        assert isinstance(small.norm, CompactLayerNorm) and isinstance(small.stem_norm, CompactLayerNorm)
        return
    assert type(small.norm) is nn.LayerNorm and type(small.head_norm) is nn.LayerNorm
    assert type(small.stem_norm) is LayerNorm2d and small.norm.normalized_shape == (4,)
    assert not any(kept_statistics(m) for m in small.modules()) and set(small.state_dict()) == set(model.state_dict())
    with torch.no_grad():  # the "all" model differs: its statistics still count the removed zeros
        other = TinyConvNeXt().eval()
        prune_filter_groups(other, x, 0.5)
        assert relative(other(x), pruned) > 0.05


class Squeezed(nn.Module):
    """Linear -> LayerNorm -> Linear: a LayerNorm whose hook and compaction disagree on purpose."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.norm, self.fc2 = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        with torch.no_grad():
            self.norm.bias.normal_(0, 0.3)
            for layer in (self.fc1, self.norm):
                layer.weight[[1, 2]] = 0
                layer.bias[[1, 2]] = 0
            self.fc1.bias[2] = 0.7  # channel 2 enters the norm as the constant 0.7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


@pytest.mark.parametrize(("keep", "constants", "hook"), [
    ([True, False, True, True, True, True], [0.7], None),  # dead channel 2 stays in the statistics as 0.7
    ([True, False, False, True, True, False], [], [True, True, True, False]),  # live channel 5 stays outside
])
def test_removed_channels_inside_the_statistics_stay_constants_and_kept_ones_outside_keep_a_hook(
        keep: list[bool], constants: list[float], hook: list[bool] | None) -> None:
    model = Squeezed().eval()
    set_kept_statistics(model.norm, torch.tensor(keep), -1)
    x = torch.randn(8, 5)
    small = compact(model, x)
    with torch.no_grad():
        assert relative(small(x), model(x)) <= 1e-5
    assert small.norm.normalized_shape == (4,) and getattr(small.norm, "removed", torch.zeros(0)).tolist() == \
        pytest.approx(constants)
    assert (kept_statistics(small.norm).keep.tolist() if hook else None) == hook
    assert isinstance(small.norm, CompactLayerNorm) == bool(constants)


def test_a_layernorm_that_would_need_constants_and_a_hook_is_refused() -> None:
    model = Squeezed().eval()
    set_kept_statistics(model.norm, torch.tensor([True, False, True, True, True, False]), -1)
    with pytest.raises(ValueError, match=r"removes channels \[2\] that its statistics include and keeps channels "
                                         r"\[5\]"):
        compact(model, torch.randn(8, 5))


def run(tmp_path, statistics: str, epochs: int = 4, ckpt_path=None, tag: str = "full"):  # type: ignore[no-untyped-def]
    pl.seed_everything(0, verbose=False)
    pruning = FilterPruning(sparsity=0.5, mode="hard", schedule=AGP(start=0, end=3), compact_every_epoch=True,
                            recalibration_batches=0, layernorm_statistics=statistics)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / tag, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[pruning, checkpoints], limit_train_batches=4,
                         limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True, num_sanity_val_steps=0)
    module = ClassifierModule(TinyConvNeXt(width=16), lr=3e-3, lr_scheduler="none")
    trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_filter_pruning_with_kept_statistics_compacts_every_epoch_and_resumes_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    full = run(tmp_path, "kept").backbone
    assert type(full.norm) is nn.LayerNorm and type(full.stem_norm) is LayerNorm2d
    assert full.norm.normalized_shape == (8,) and full.stem.out_channels == 8
    assert not any(kept_statistics(m) for m in full.modules())
    resumed = run(tmp_path, "kept", ckpt_path=tmp_path / "full" / "epoch=1.ckpt", tag="resumed").backbone
    assert type(resumed.norm) is nn.LayerNorm
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="layernorm_statistics='kept'"):
        run(tmp_path, "all", ckpt_path=tmp_path / "full" / "epoch=1.ckpt", tag="mismatch")


def test_soft_pruning_with_kept_statistics_compacts_at_fit_end_to_plain_layernorms(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(TinyConvNeXt(), lr=3e-3, lr_scheduler="none")
    pruning = FilterPruning(sparsity=0.5, mode="soft", recalibration_batches=0, compact_on_fit_end=True,
                            layernorm_statistics="kept")
    seen = []

    class Spy(pl.Callback):  # the masked network in training: hooks on the three LayerNorms of the stream
        def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            seen.append(sorted(n for n, m in pl_module.compression_target.named_modules() if kept_statistics(m)))

        def on_fit_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]  # before FilterPruning's
            seen.append(copy.deepcopy(pl_module.compression_target).eval())

    trainer = pl.Trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[Spy(), pruning])
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert seen[-2] == ["head_norm", "norm", "stem_norm"]
    small, masked, x = module.compression_target.eval(), seen[-1], torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert relative(small(x), masked(x)) <= 1e-5
    assert small.stem.out_channels == 4 and type(small.norm) is nn.LayerNorm and type(small.stem_norm) is LayerNorm2d
    assert not any(kept_statistics(m) for m in small.modules())


def test_the_pruned_architecture_of_a_convnext_has_plain_layernorms() -> None:
    small = pruned_architecture(TinyConvNeXt(), 0.5, torch.randn(2, 1, 8, 8), seed=0)
    assert type(small.norm) is nn.LayerNorm and type(small.stem_norm) is LayerNorm2d
    assert small.norm.normalized_shape == (4,) and not any(kept_statistics(m) for m in small.modules())


def test_an_unknown_layernorm_statistics_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match=r"layernorm_statistics must be one of \('all', 'kept'\).*'mean'"):
        FilterPruning(layernorm_statistics="mean")
    with pytest.raises(ValueError, match="'mean'"):
        prune_filter_groups(TinyConvNeXt(), torch.randn(2, 1, 8, 8), 0.5, layernorm_statistics="mean")
