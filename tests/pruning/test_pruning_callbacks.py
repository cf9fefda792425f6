"""MagnitudePruning and FilterPruning in a real Trainer: targets, schedules, regrowth, logging, errors."""

import itertools

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.pruning.schedules import AGP, Constant, Linear
from lightning_compress.testing import read_scalars, read_tags


def fit(trainer_factory, callback, backbone=None, epochs=2, batches=4, **kwargs):
    trainer = trainer_factory(callbacks=[callback], max_epochs=epochs, limit_train_batches=batches,
                              limit_val_batches=2, **kwargs)
    module = ClassifierModule(backbone or PlainCNN(width=8), lr=3e-3)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return trainer, module.backbone


def zero_fraction(tensor):
    return 1.0 - float(torch.count_nonzero(tensor)) / tensor.numel()


def test_layer_magnitude_pruning_hits_the_target_in_every_layer_but_the_classifier(trainer_factory):
    _, model = fit(trainer_factory, MagnitudePruning(sparsity=0.7, scope="layer"))
    for name in ("block1.conv", "block2.conv", "block3.conv"):
        weight = model.get_submodule(name).weight
        assert abs(zero_fraction(weight) - 0.7) <= 1 / weight.numel()
    assert zero_fraction(model.classifier.weight) == 0.0
    assert zero_fraction(model.block1.bn.weight) == 0.0


def test_global_scope_reaches_the_global_target(trainer_factory):
    callback = MagnitudePruning(sparsity=0.6, scope="global")
    _, model = fit(trainer_factory, callback)
    weights = [model.get_submodule(n).weight for n in ("block1.conv", "block2.conv", "block3.conv")]
    total = sum(w.numel() for w in weights)
    zeros = sum(w.numel() - int(torch.count_nonzero(w)) for w in weights)
    assert zeros == round(0.6 * total)
    assert len({round(zero_fraction(w), 2) for w in weights}) > 1  # layers differ under a global ranking


def test_agp_schedule_is_followed_epoch_by_epoch(trainer_factory, tmp_path):
    fit(trainer_factory, MagnitudePruning(sparsity=0.8, schedule=AGP(start=0, end=3)), epochs=4)
    targets = [value for _, value in read_scalars(tmp_path)["prune/target"]]
    expected = [0.8 * (1 - (1 - t / 3) ** 3) for t in (1, 2, 3, 3)]
    assert targets == pytest.approx(expected, abs=1e-6)
    sparsity = [value for _, value in read_scalars(tmp_path)["prune/sparsity"]]
    assert sparsity == pytest.approx(expected, abs=2e-3)


def test_step_schedule_updates_every_n_steps(trainer_factory):
    callback = MagnitudePruning(sparsity=0.5, schedule=Linear(start=0, end=6, frequency=2, unit="step"))
    updates = []
    original = callback.compute_masks
    callback.compute_masks = lambda modules, sparsity, position: updates.append((position, sparsity)) or original(
        modules, sparsity, position)
    fit(trainer_factory, callback, epochs=1, batches=8)
    assert [position for position, _ in updates] == [0, 2, 4, 6, 8]
    assert [sparsity for _, sparsity in updates] == pytest.approx([0.0, 0.5 / 3, 1 / 3, 0.5, 0.5])


def test_threshold_method_prunes_below_the_threshold(trainer_factory):
    callback = MagnitudePruning(method="threshold", threshold=0.05)
    first = {}
    original = callback.compute_masks

    def spy(modules, sparsity, position):
        masks = original(modules, sparsity, position)
        first.setdefault("weight", modules["block2.conv"].weight.detach().clone())
        first.setdefault("mask", masks["block2.conv"].clone())
        return masks

    callback.compute_masks = spy
    _, model = fit(trainer_factory, callback, epochs=1)
    # before the first step: exactly the weights with |w| < threshold are pruned
    assert torch.equal(first["mask"], first["weight"].abs() >= 0.05)
    weight = model.block2.conv.weight.detach()
    # at the end (the epoch-end update, no step after it): the same rule on the trained weights
    assert torch.equal(callback.masks["block2.conv"], weight != 0)
    assert float(weight[weight != 0].abs().min()) >= 0.05
    assert zero_fraction(weight) > 0.2


@pytest.mark.parametrize("granularity", ["vector", "kernel"])
def test_vector_and_kernel_granularity_zero_whole_units(trainer_factory, granularity):
    _, model = fit(trainer_factory, MagnitudePruning(sparsity=0.5, granularity=granularity, scope="layer"), epochs=1)
    weight = model.block2.conv.weight
    units = weight.flatten(0, 2) if granularity == "vector" else weight.flatten(0, 1).flatten(1)
    zero_units = (units == 0).all(dim=1)
    assert zero_units.float().mean().item() == pytest.approx(0.5, abs=1 / len(zero_units))
    assert zero_fraction(weight) == pytest.approx(zero_units.float().mean().item())


def test_splicing_revives_weights_and_keeps_dense_copy(trainer_factory, tmp_path):
    callback = MagnitudePruning(method="splicing", c=0.3, gamma=0.0)
    _, model = fit(trainer_factory, callback, epochs=2, batches=8)
    assert sum(value for _, value in read_scalars(tmp_path)["prune/revived"]) > 0
    assert set(callback.dense) == {"block1.conv", "block2.conv", "block3.conv"}
    for name, dense in callback.dense.items():
        weight = model.get_submodule(name).weight.detach()
        torch.testing.assert_close(weight, dense * callback.masks[name])
        a, b = callback.thresholds[name]
        assert torch.all(dense.abs()[~callback.masks[name]] < b) and torch.all(dense.abs()[callback.masks[name]] >= a)


def test_soft_filter_pruning_zeros_filters_lets_them_regrow_then_finalizes(trainer_factory):
    class WatchRegrowth(FilterPruning):
        regrown = 0

        def after_step(self, trainer):
            super().after_step(trainer)
            for name, keep in self.masks.items():
                weight = self._modules[name].weight.detach()
                self.regrown += int((weight[~keep].abs().sum(dim=tuple(range(1, weight.dim()))) > 0).sum())

    # A dense first epoch moves BN shifts off 0: a zeroed filter feeding BN(beta=0) -> ReLU gets no gradient.
    callback = WatchRegrowth(sparsity=0.4, mode="soft", recalibration_batches=2, schedule=Constant(start=1))
    _, model = fit(trainer_factory, callback, epochs=3)
    assert callback.regrown > 0 and callback.finalized
    for name in ("block1.conv", "block2.conv", "block3.conv"):
        conv, bn = model.get_submodule(name), model.get_submodule(name.replace("conv", "bn"))
        dead = (conv.weight.flatten(1) == 0).all(dim=1)
        assert int(dead.sum()) == round(0.4 * conv.out_channels)
        assert torch.all(bn.weight[dead] == 0) and torch.all(bn.bias[dead] == 0)


def test_hard_filter_pruning_never_revives(trainer_factory):
    callback = FilterPruning(sparsity=0.5, mode="hard", schedule=Linear(start=0, end=2))
    history = []

    trainer = trainer_factory(callbacks=[callback], max_epochs=3, limit_train_batches=3, limit_val_batches=1)
    module = ClassifierModule(PlainCNN(width=8), lr=3e-3)
    original = callback.compute_masks

    def spy(modules, progress, position):
        masks = original(modules, progress, position)
        history.append({k: v.clone() for k, v in masks.items()})
        return masks

    callback.compute_masks = spy
    trainer.fit(module, DigitsDataModule(batch_size=32))
    # updates along the schedule, pruning more: the pairs below compare growing masks
    counts = [int((~masks["block2.conv"]).sum()) for masks in history]
    assert counts[0] == 0 and 0 < counts[1] < 8 and counts[-1] == 8, counts
    for before, after in itertools.pairwise(history):
        for name in before:
            assert not torch.any(after[name] & ~before[name])
    assert int((~history[-1]["block2.conv"]).sum()) == 8


def test_residual_network_and_linear_layers(trainer_factory):
    _, model = fit(trainer_factory, FilterPruning(sparsity=0.25, types=["Conv2d"]), backbone=ResidualCNN(width=8))
    dead = (model.stage2[0].conv1.weight.flatten(1) == 0).all(dim=1)
    assert int(dead.sum()) == 4
    from lightning_compress.demo import MLP

    _, mlp = fit(trainer_factory, FilterPruning(sparsity=0.5), backbone=MLP(hidden=(16, 8)))
    assert int((mlp.layers.fc1.weight == 0).all(dim=1).sum()) == 8


def test_tags_written_every_epoch(trainer_factory, tmp_path):
    fit(trainer_factory, FilterPruning(sparsity=0.4), epochs=2)
    scalars = read_scalars(tmp_path)
    for tag in ("prune/sparsity", "prune/progress", "prune/sparsity/block2.conv", "prune/filters_alive/block2.conv",
                "prune/revived_filters"):
        assert len(scalars[tag]) == 2, tag
    assert scalars["prune/filters_alive/block1.conv"][-1][1] == 5
    assert "prune/layer_sparsity" in read_tags(tmp_path)["histograms"]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: MagnitudePruning(sparsity=1.0), "sparsity must be a number in \\[0, 1\\), got 1.0"),
        (lambda: MagnitudePruning(sparsity=-0.1), "got -0.1"),
        (lambda: MagnitudePruning(method="random"), "'random'"),
        (lambda: MagnitudePruning(method="splicing", a=0.5, b=0.2), "a=0.5, b=0.2"),
        (lambda: MagnitudePruning(method="splicing", a=0.5), "both"),
        (lambda: MagnitudePruning(method="threshold"), "threshold=None"),
        (lambda: FilterPruning(p=3), "3"),
        (lambda: FilterPruning(mode="medium"), "'medium'"),
        (lambda: FilterPruning(sparsity={"block1.conv": 1.2}), "1.2"),
        (lambda: MagnitudePruning(schedule=AGP(start=5, end=2)), "ends before it starts"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


class FailOnStep(ClassifierModule):
    def training_step(self, batch, batch_idx):
        raise AssertionError("a training step ran")


@pytest.mark.parametrize(
    ("callback", "backbone", "message"),
    [
        (MagnitudePruning(layers=["block9.conv"]), PlainCNN(width=4), "'block9.conv'"),
        (FilterPruning(sparsity=0.9), PlainCNN(width=4), "would remove every filter"),
        (MagnitudePruning(types=["Conv2d"]), nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "nothing to prune"),
        (MagnitudePruning(types=["Linear"]), PlainCNN(width=4), "only selected layer is the final classifier"),
    ],
)
def test_bad_models_fail_before_the_first_step_and_stay_untouched(trainer_factory, callback, backbone, message):
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainer = trainer_factory(callbacks=[callback], limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=message):
        trainer.fit(FailOnStep(backbone), DigitsDataModule(batch_size=16))
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_compact_on_fit_end_replaces_the_network_and_fine_tuning_goes_on(trainer_factory, tiny_input):
    from lightning_compress import CompressionReport

    callback = FilterPruning(sparsity=0.4, compact_on_fit_end=True, recalibration_batches=2)
    report = CompressionReport(batch_size=8, latency_runs=2, warmup=0)
    trainer = trainer_factory(callbacks=[callback, report], max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    module = ClassifierModule(ResidualCNN(width=8), lr=3e-3)
    dense_parameters = sum(p.numel() for p in module.backbone.parameters())
    masked = None

    class Snapshot(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            nonlocal masked
            masked = pl_module.backbone

    trainer.callbacks.insert(0, Snapshot())
    trainer.fit(module, DigitsDataModule(batch_size=32))
    compact_model = module.backbone
    assert compact_model is not masked and callback.compacted
    assert compact_model.stage2[0].conv1.out_channels == 10  # 16 - round(0.4 * 16)
    assert report.report["parameters"] == callback.compaction["parameters_after"] < 0.45 * dense_parameters
    masked.eval(), compact_model.eval()
    torch.testing.assert_close(compact_model(tiny_input), masked(tiny_input), atol=1e-4, rtol=0)
    # Fine-tune the compact model with the same callback list: the optimizer is built over the new parameters.
    again = trainer_factory(callbacks=[callback], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    again.fit(module, DigitsDataModule(batch_size=32))
    optimizer_params = {id(p) for group in again.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in compact_model.parameters()} <= optimizer_params
    assert compact_model.stage2[0].conv1.out_channels == 10


def test_chosen_layers_keep_their_last_one_when_it_is_not_the_classifier(trainer_factory):
    """prune_classifier=False leaves out the network's last layer, not the last of the chosen ones."""
    callback = MagnitudePruning(sparsity=0.5, layers=["block1.conv", "block2.conv"], scope="layer")
    _, model = fit(trainer_factory, callback)
    for name in ("block1.conv", "block2.conv"):
        assert float((model.get_submodule(name).weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
    assert float((model.classifier.weight == 0).float().mean()) == 0.0
