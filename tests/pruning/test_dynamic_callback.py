"""DynamicChannelPruning in the Trainer: gates inserted in setup, regulariser in the loss, logs, resume, errors."""

from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.pruning import dynamic
from lightning_compress.pruning.dynamic import FeatureBoostingGates
from lightning_compress.pruning.dynamic_callback import DynamicChannelPruning
from lightning_compress.testing import read_scalars


class Capture(Callback):
    def __init__(self):
        self.losses, self.steps = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.steps += 1


def module(width=8):
    torch.manual_seed(0)
    return ClassifierModule(PlainCNN(width=width), lr=3e-3, lr_scheduler="none")


def test_gates_inserted_trained_logged_and_removable(trainer_factory, tmp_path):
    model = module()
    user_keys = set(model.state_dict())
    callback = DynamicChannelPruning(keep_ratio=0.5, exclude="block1.conv")
    trainer = trainer_factory(max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[callback])
    trainer.fit(model, DigitsDataModule(batch_size=32))
    gates = callback.gates
    assert isinstance(gates, FeatureBoostingGates) and gates.layer_names == ["block2.conv", "block3.conv"]
    extra = set(model.state_dict()) - user_keys
    assert extra == {f"backbone.dynamic_gates.predictors.block{i}__conv.fc.{p}" for i in (2, 3)
                     for p in ("weight", "bias")}
    assert user_keys <= set(model.state_dict())
    assert float(gates.predictors["block2__conv"].fc.bias.detach().sub(1).abs().max()) > 0  # optimised
    assert "training_step" not in model.__dict__  # the wrapper is gone after fit
    scalars = read_scalars(tmp_path)
    for tag in ("dynamic/keep_ratio", "dynamic/saliency_l1", "dynamic/executed_macs", "dynamic/sparsity/block2.conv",
                "dynamic/sparsity/block3.conv"):
        assert len(scalars[tag]) == 2, tag
    assert scalars["dynamic/keep_ratio"][-1][1] <= 0.5 + 1e-6
    sample = torch.randn(4, 1, 8, 8)
    assert scalars["dynamic/executed_macs"][-1][1] == gates.executed_macs(sample)
    # block1 full (1 -> 8, 8x8), block2: 8 of 16 filters over all 8 inputs (8x8), block3 after pooling: 8 of 16
    # filters over block2's 8 kept channels (4x4); predictors 8 x 16 and 16 x 16; classifier 64 -> 10
    macs = 8 * 9 * 64 + (8 * 16) + 8 * 8 * 9 * 64 + (16 * 16) + 8 * 8 * 9 * 16 + 16 * 4 * 10
    assert gates.executed_macs(sample) == macs
    model.eval()
    with torch.no_grad(), mock.patch.object(dynamic, "sparse_gated_conv", wraps=dynamic.sparse_gated_conv) as spy:
        dense = model(sample)
        with gates.sparse_execution(sample):
            assert (model(sample) - dense).abs().max() < 1e-5
    gated = [model.backbone.block2.conv, model.backbone.block3.conv]
    assert [call.args[0] for call in spy.call_args_list] == gated  # the sparse kernel ran, once per gated layer
    callback.remove()
    assert set(model.state_dict()) == user_keys


def test_regulariser_is_added_to_the_training_loss(trainer_factory, tmp_path):
    weight = 0.01
    capture = Capture()
    trainer = trainer_factory(max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                              callbacks=[DynamicChannelPruning(regularization=weight), capture])
    trainer.fit(module(), DigitsDataModule(batch_size=32))
    scalars = read_scalars(tmp_path)
    cross_entropy, l1 = scalars["train/loss"][0][1], scalars["dynamic/saliency_l1"][0][1]
    assert l1 > 1.0
    assert capture.losses[0] == pytest.approx(cross_entropy + weight * l1, rel=1e-5)


def run(tmp_path, epochs, ckpt_path=None, tag="full"):
    pl.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / tag, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[DynamicChannelPruning(0.5, regularization=1e-3), checkpoints],
                         limit_train_batches=4, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, num_sanity_val_steps=0)
    model = module()
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return model


def test_resume_from_an_end_of_epoch_checkpoint_continues_identically(tmp_path):
    full = run(tmp_path, 2)
    resumed = run(tmp_path, 2, ckpt_path=tmp_path / "full" / "epoch=0.ckpt", tag="resumed")
    state = resumed.state_dict()
    assert set(state) == set(full.state_dict())
    for key, value in full.state_dict().items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"keep_ratio": 0.0}, r"keep_ratio must lie in \(0, 1\], got 0.0"),
    ({"keep_ratio": 1.5}, r"keep_ratio must lie in \(0, 1\], got 1.5"),
    ({"regularization": -1.0}, "regularization must be a number >= 0, got -1.0"),
    ({"gate_after": "relu"}, r"gate_after must be one of \('batchnorm', 'conv'\), got 'relu'"),
])
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicChannelPruning(**kwargs)


class ManualModule(ClassifierModule):
    def __init__(self):
        super().__init__(PlainCNN(width=4))
        self.automatic_optimization = False


@pytest.mark.parametrize(("make", "callback", "match"), [
    (module, DynamicChannelPruning(layers="nope"), "'nope' matches no layer"),
    (module, DynamicChannelPruning(layers="classifier"), "'classifier' matches no layer"),
    (module, DynamicChannelPruning(layers="block1.conv", exclude="block1.conv"), "found nothing to gate"),
    (ManualModule, DynamicChannelPruning(), "automatic optimisation"),
])
def test_bad_configuration_fails_before_the_first_step(trainer_factory, make, callback, match):
    capture = Capture()
    trainer = trainer_factory(limit_train_batches=2, limit_val_batches=1, callbacks=[callback, capture])
    with pytest.raises(ValueError, match=match):
        trainer.fit(make(), DigitsDataModule(batch_size=32))
    assert capture.steps == 0


def test_a_second_fit_keeps_the_trained_gates(trainer_factory):
    model = module()
    first = DynamicChannelPruning(keep_ratio=0.5)
    trainer_factory(limit_train_batches=1, limit_val_batches=0, callbacks=[first]).fit(model, DigitsDataModule())
    second = DynamicChannelPruning(keep_ratio=0.5)
    trainer_factory(limit_train_batches=1, limit_val_batches=0, callbacks=[second]).fit(model, DigitsDataModule())
    assert second.gates is first.gates
    with pytest.raises(ValueError, match=r"already carries FBS gates with keep_ratio=0\.5, not 0\.25"):
        trainer_factory(limit_train_batches=1, callbacks=[DynamicChannelPruning(0.25)]).fit(model,
                                                                                             DigitsDataModule())
