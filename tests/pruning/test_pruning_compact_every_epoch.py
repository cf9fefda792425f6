"""Hard filter pruning made physical after every epoch: layers shrink, the optimizer follows, resume replays."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import FilterPruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.pruning.schedules import AGP


class RecordWidths(pl.Callback):
    def __init__(self):
        self.widths = []

    def on_train_epoch_start(self, trainer, pl_module):
        backbone = pl_module.backbone
        layer = backbone.block2.conv if hasattr(backbone, "block2") else backbone.stage2[0].conv1
        self.widths.append(layer.out_channels)


def run(tmp_path, epochs=4, ckpt_path=None, tag="full", backbone=PlainCNN):
    pl.seed_everything(0, verbose=False)
    pruning = FilterPruning(sparsity=0.5, mode="hard", schedule=AGP(start=0, end=3), compact_every_epoch=True,
                            recalibration_batches=0)
    widths = RecordWidths()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / tag, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[pruning, widths, checkpoints], limit_train_batches=4,
                         limit_val_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True, num_sanity_val_steps=0)
    module = ClassifierModule(backbone(width=8), lr=3e-3, lr_scheduler="none")
    trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return module, trainer, widths.widths


def test_layers_shrink_every_epoch_and_the_optimizer_holds_the_new_parameters(tmp_path):
    module, trainer, widths = run(tmp_path)
    # AGP towards 8 of 16 filters: 0 -> 16*0.5*(1-(2/3)^3)=5.6 -> 6, 16*0.5*(1-(1/3)^3)=7.7 -> 8, then 8.
    assert widths == [16, 10, 8, 8]
    assert module.backbone.block2.conv.out_channels == 8 and module.backbone.block3.conv.in_channels == 8
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.backbone.parameters()} <= optimizer_params
    state = trainer.optimizers[0].state[module.backbone.block2.conv.weight]
    assert state["exp_avg"].shape == module.backbone.block2.conv.weight.shape


def test_resume_replays_the_compactions_and_continues_exactly(tmp_path):
    full, _, _ = run(tmp_path)
    resumed, _, widths = run(tmp_path, ckpt_path=tmp_path / "full" / "epoch=1.ckpt", tag="resumed")
    assert widths == [8, 8]
    for key, value in full.backbone.state_dict().items():
        torch.testing.assert_close(resumed.backbone.state_dict()[key], value, atol=1e-6, rtol=0)


def test_residual_network_shrinks_too(tmp_path):
    module, _, _ = run(tmp_path, epochs=2, backbone=ResidualCNN)
    assert module.backbone.stage2[0].conv1.out_channels < 16


def test_needs_hard_mode():
    with pytest.raises(ValueError, match="mode='hard'"):
        FilterPruning(mode="soft", compact_every_epoch=True)
