import lightning.pytorch as pl
import torch

from lightning_compress.demo import MLP, ClassifierModule, DigitsDataModule
from lightning_compress.testing import read_scalars, read_tags, read_text
from lightning_compress.utils import log_histogram, log_image, log_scalars, log_text


class LogEverything(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        step = trainer.current_epoch
        log_scalars(trainer, {"demo/scalar": torch.tensor(1.5 + step)}, step=step)
        log_histogram(trainer, "demo/hist", torch.arange(10.0), step=step)
        log_image(trainer, "demo/image", torch.rand(4, 6), step=step)
        log_text(trainer, "demo/text", f"epoch {step}", step=step)


def test_every_kind_is_read_back_once_per_epoch(trainer_factory, tmp_path):
    trainer = trainer_factory(callbacks=[LogEverything()], max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(ClassifierModule(MLP(hidden=(8,))), DigitsDataModule(batch_size=16))
    scalars = read_scalars(tmp_path)
    assert scalars["demo/scalar"] == [(0, 1.5), (1, 2.5)]
    assert [step for step, _ in scalars["val/acc"]] == [1, 3]  # one point per epoch, at its last step
    tags = read_tags(tmp_path)
    assert "demo/hist" in tags["histograms"] and "demo/image" in tags["images"]
    assert read_text(tmp_path, "demo/text") == ["epoch 0", "epoch 1"]


def test_helpers_are_silent_without_tensorboard(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    trainer = pl.Trainer(logger=CSVLogger(str(tmp_path)), callbacks=[LogEverything()], max_epochs=1,
                         limit_train_batches=1, limit_val_batches=0, enable_progress_bar=False,
                         enable_checkpointing=False)
    trainer.fit(ClassifierModule(MLP(hidden=(8,))), DigitsDataModule(batch_size=16))
    assert "demo/scalar" in (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
