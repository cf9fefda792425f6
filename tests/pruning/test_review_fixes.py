"""Regression tests of reviewed pruning bugs: LayerPruning resume, BatchNorm without affine parameters, compaction
without a compression target, channel scores of dead channels, and arguments refused before training."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import FilterPruning, LayerPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.graph.compact import compact
from lightning_compress.pruning.filter_final import record_origins, to_original_shapes
from lightning_compress.pruning.groups import PrunableGroup, group_scores, pruned_channel_masks
from lightning_compress.pruning.schedules import AGP, Constant, Linear


class FailOnStep(ClassifierModule):
    def training_step(self, batch, batch_idx):
        raise AssertionError("a training step ran")


class NoTarget(ClassifierModule):
    """A LightningModule without a compression target: callbacks compress the whole module."""

    compression_target = None


def _fails_before_training(trainer_factory, callback, backbone, message):
    before = copy.deepcopy(backbone.state_dict())
    trainer = trainer_factory(callbacks=[callback], limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=message):
        trainer.fit(FailOnStep(backbone), DigitsDataModule(batch_size=16))
    assert trainer.global_step == 0
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- 1. LayerPruning resumes from its own checkpoint -----------------------------------------------------------------
def _layer_run(tmp_path, mode, epochs=3, ckpt_path=None, tag="full", layers=None):
    pl.seed_everything(0, verbose=False)
    callback = LayerPruning(sparsity=0.5, mode=mode, schedule=Linear(start=0, end=2), layers=layers)
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=1, logger=False,
                         callbacks=[callback, ModelCheckpoint(dirpath=tmp_path / tag, save_top_k=-1,
                                                              filename="{epoch}")],
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         num_sanity_val_steps=0)
    module = ClassifierModule(ResidualCNN(width=4, depth=2), lr=3e-3, lr_scheduler="none")
    trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return module.backbone, callback, dict(trainer.callback_metrics)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_layer_pruning_resume_equals_an_uninterrupted_run(tmp_path, mode):
    full, full_callback, full_metrics = _layer_run(tmp_path, mode)
    resumed, callback, metrics = _layer_run(tmp_path, mode, ckpt_path=tmp_path / "full" / "epoch=0.ckpt",
                                            tag="resumed")
    assert callback.masks == full_callback.masks and len(callback.removed()) == 2
    assert callback.position == full_callback.position
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=0)
    assert set(metrics) == set(full_metrics)
    for key, value in full_metrics.items():
        torch.testing.assert_close(metrics[key], value, atol=1e-6, rtol=0)


def test_layer_pruning_refuses_a_checkpoint_of_other_blocks(tmp_path):
    _layer_run(tmp_path, "hard", epochs=1, layers=r"stage1\..*")
    callback = LayerPruning(sparsity=0.5, mode="hard")
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False, callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"masks for the blocks \['stage1.0', 'stage1.1'\].*'stage2.1'"):
        trainer.fit(FailOnStep(ResidualCNN(width=4, depth=2)), DigitsDataModule(batch_size=32),
                    ckpt_path=tmp_path / "full" / "epoch=0.ckpt")


# -- 2. BatchNorm without affine parameters ---------------------------------------------------------------------------
class NoAffineNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def test_pruned_channel_masks_skip_a_batchnorm_without_parameters():
    net = NoAffineNet()
    modules = dict(net.named_modules())
    group = PrunableGroup({"c1": torch.arange(8)}, batchnorms={"bn1": torch.arange(8)})
    pairs = pruned_channel_masks(group, modules, torch.arange(8) % 2 == 0, batchnorm=True)
    assert [tensor for tensor, _ in pairs] == [net.c1.weight, net.c1.bias]


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_filter_pruning_and_compaction_with_batchnorm_without_affine(trainer_factory, tiny_input, mode):
    callback = FilterPruning(sparsity=0.5, mode=mode, compact_on_fit_end=True, recalibration_batches=2)
    masked = {}

    class Snapshot(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            masked["net"] = copy.deepcopy(pl_module.backbone).eval()

    trainer = trainer_factory(callbacks=[Snapshot(), callback], max_epochs=2, limit_train_batches=3,
                              limit_val_batches=1)
    module = ClassifierModule(NoAffineNet(), lr=3e-2)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    small = module.backbone.eval()
    assert small.c1.out_channels == small.c2.out_channels == 4 and callback.compaction["skipped"] == []
    assert small.bn1.num_features == 4 and small.bn1.running_mean.shape == small.bn2.running_var.shape == (4,)
    torch.testing.assert_close(small(tiny_input), masked["net"](tiny_input), atol=1e-5, rtol=0)


def test_origins_of_an_affine_free_batchnorm_restore_its_statistics(tiny_input):
    net = NoAffineNet().eval()
    with torch.no_grad():
        net.c1.weight[[1, 4]] = 0
        net.c1.bias[[1, 4]] = 0
        net.bn1.running_mean.copy_(torch.arange(8.0) * (torch.arange(8) % 3 != 1))
    full = copy.deepcopy(net.state_dict())
    _, plan = compact(net, tiny_input, inplace=True, return_plan=True)
    assert net.bn1.num_features == 6
    origins = {}
    record_origins(origins, plan, dict(net.named_modules()))
    state = net.state_dict()
    to_original_shapes(state, origins)
    assert torch.equal(state["bn1.running_mean"], full["bn1.running_mean"])
    assert state["bn1.running_var"].shape == (8,)


# -- 3. compact_on_fit_end without a compression_target ----------------------------------------------------------
def test_compact_on_fit_end_without_a_compression_target_compacts_the_module_in_place(trainer_factory, tiny_input):
    callback = FilterPruning(sparsity=0.5, compact_on_fit_end=True, recalibration_batches=2)
    masked = {}

    class Snapshot(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            masked["net"] = copy.deepcopy(pl_module.backbone).eval()

    module = NoTarget(PlainCNN(width=8), lr=3e-3)
    trainer = trainer_factory(callbacks=[Snapshot(), callback], max_epochs=2, limit_train_batches=3,
                              limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert callback.compacted and module.backbone.block1.conv.out_channels == 4
    module.eval()
    torch.testing.assert_close(module(tiny_input), masked["net"](tiny_input), atol=1e-4, rtol=0)


def test_layer_pruning_compact_on_fit_end_without_a_compression_target(trainer_factory):
    callback = LayerPruning(sparsity=0.5, compact_on_fit_end=True)
    module = NoTarget(ResidualCNN(width=4, depth=2), lr=3e-3)
    trainer = trainer_factory(callbacks=[callback], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert callback.compacted and len(callback.removed()) == 2
    for name in callback.removed():
        assert isinstance(module.get_submodule(name), nn.Identity)


# -- 4. channel granularity: a dead channel is pruned already ------------------------------------------------------
def test_channel_scores_of_a_channel_with_zero_producers_are_zero():
    producer, consumer = nn.Linear(4, 3), nn.Linear(3, 2)
    with torch.no_grad():
        producer.weight[1] = 0
        producer.bias[1] = 0
        consumer.weight.fill_(1.0)
    group = PrunableGroup({"p": torch.arange(3)}, consumers={"c": [[0], [1], [2]]})
    scores = group_scores(group, {"p": producer, "c": consumer}, p=2, granularity="channel")
    assert scores.tolist() == pytest.approx([2**0.5, 0.0, 2**0.5])


class MLP(nn.Module):
    """The reviewer's model: a channel zeroed by an early soft update never regrows behind BatchNorm and ReLU."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, 64), nn.BatchNorm1d(64)
        self.fc2, self.out = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.out(F.relu(self.fc2(F.relu(self.bn1(self.fc1(x.flatten(1)))))))


def _digits_loader():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:256], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:256], dtype=torch.long)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False)


def test_soft_channel_granularity_prunes_dead_channels_first(trainer_factory):
    torch.manual_seed(0)
    module = ClassifierModule(MLP(), optimizer="sgd", lr=0.05, lr_scheduler="none")
    callback = FilterPruning(sparsity=0.5, granularity="channel", schedule=AGP(start=0, end=2),
                             recalibration_batches=2)
    trainer = trainer_factory(callbacks=[callback], max_epochs=2, limit_train_batches=4, limit_val_batches=0)
    loader = _digits_loader()
    trainer.fit(module, loader)
    fc1, keep = module.backbone.fc1, callback.masks["fc1"]
    zero = (fc1.weight.abs().sum(1) == 0) & (fc1.bias == 0)
    assert torch.equal(zero, ~keep)  # no dead channel is kept, no live one pruned
    small = compact(module.backbone.eval(), next(iter(loader))[0][:2])
    assert small.fc1.out_features == 32 and small.fc2.out_features == 16
    assert float(trainer.callback_metrics["prune/sparsity"]) == pytest.approx(1 - (32 + 16) / (64 + 32))


# -- 5. arguments refused at construction, or before the first step -------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: MagnitudePruning(method="splicing", gamma=-1.0), "gamma=-1.0"),
        (lambda: MagnitudePruning(method="splicing", power=-1.0), "power=-1.0"),
        (lambda: MagnitudePruning(method="splicing", gamma=float("nan")), "gamma=nan"),
        (lambda: MagnitudePruning(method="threshold", threshold=0.05, schedule=AGP(start=0, end=3)),
         "method='threshold'.*schedule=AGP"),
        (lambda: MagnitudePruning(method="threshold", threshold=float("nan")), "threshold=nan"),
        (lambda: FilterPruning(sparsity={"conv[": 0.5}), r"sparsity key 'conv\[' is not a valid regular"),
        (lambda: FilterPruning(recalibration_batches=1.5), "recalibration_batches must be an integer >= 0, got 1.5"),
        (lambda: FilterPruning(recalibration_batches=None), "recalibration_batches .* got None"),
        (lambda: Linear(start=0, end=4, frequency=1.5), "frequency must be an integer, got frequency=1.5"),
        (lambda: Linear(start=0, end=float("inf")), "end must be an integer, got end=inf"),
        (lambda: AGP(start=float("nan"), end=4), "start must be an integer, got start=nan"),
        (lambda: Constant(start="1"), "start must be an integer, got start='1'"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize(
    ("callback", "backbone", "message"),
    [
        (FilterPruning(sparsity={"nomatch": 0.5}), PlainCNN(width=4), "sparsity pattern 'nomatch' matches no"),
        (LayerPruning(sparsity=0.9), ResidualCNN(width=4, depth=1),
         r"would remove every removable block \(round\(0.9 \* 1\) = 1 of 1"),
    ],
)
def test_bad_models_fail_before_the_first_step_and_stay_untouched(trainer_factory, callback, backbone, message):
    _fails_before_training(trainer_factory, callback, backbone, message)
