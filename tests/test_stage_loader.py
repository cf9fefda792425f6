"""utils.data.stage_loader: which loader the callbacks and modules read (data module or trainer, first of a list)."""

from types import SimpleNamespace

import pytest

from lightning_compress.utils.data import first_training_batch, stage_loader


class DataModule:
    def train_dataloader(self):
        return ["datamodule-train"]

    def val_dataloader(self):
        return "datamodule-val"


class NoValidation(DataModule):
    def val_dataloader(self):
        raise NotImplementedError


def trainer(datamodule=None, train=None, val=None, source=None):
    return SimpleNamespace(datamodule=datamodule, train_dataloader=train, val_dataloaders=val,
                           fit_loop=SimpleNamespace(_data_source=source))


class Source:
    def __init__(self, loader, defined=True):
        self.loader, self.defined = loader, defined

    def is_defined(self):
        return self.defined

    def dataloader(self):
        return self.loader


def test_the_data_module_comes_first_unless_the_trainer_is_preferred():
    both = trainer(DataModule(), train=["trainer-train"], val=["trainer-val"])
    assert stage_loader(both, "val") == "datamodule-val"
    assert stage_loader(both, "train") == "datamodule-train"  # the first of a list
    assert stage_loader(both, "val", prefer_trainer=True) == "trainer-val"
    assert stage_loader(both, "train", prefer_trainer=True) == "trainer-train"


def test_falls_back_on_the_trainer_and_on_the_fit_loop_source():
    assert stage_loader(trainer(NoValidation(), val=("trainer-val", "second")), "val") == "trainer-val"
    assert stage_loader(trainer(source=Source(["module-train"])), "train") == "module-train"
    assert stage_loader(trainer(source=Source(["module-train"], defined=False)), "train") is None
    assert stage_loader(trainer(NoValidation()), "val") is None


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="kind must be 'train' or 'val', got 'test'"):
        stage_loader(trainer(), "test")
    with pytest.raises(ValueError, match=r"No training data.*input_shape"):
        first_training_batch(trainer())
    assert first_training_batch(trainer(source=Source([[1, 2]]))) == 1
