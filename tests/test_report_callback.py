import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import CompressionReport
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.testing import read_scalars, read_text

REQUIRED_KEYS = {"parameters", "nonzero_parameters", "size_bytes", "macs", "latency_ms", "accuracy"}


def _fit(trainer_factory, report, width=4):
    trainer = trainer_factory(callbacks=[report], limit_train_batches=3, limit_val_batches=2)
    module = ClassifierModule(PlainCNN(width=width))
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return trainer, module


def test_report_files_scalars_and_text(trainer_factory, tmp_path):
    report = CompressionReport(batch_size=16, latency_runs=3, warmup=1)
    trainer, module = _fit(trainer_factory, report)
    directory = tmp_path / "run" / "version_0"
    data = json.loads((directory / "compression_report.json").read_text())
    assert data.keys() >= REQUIRED_KEYS and "ratios" not in data
    assert data["parameters"] == sum(p.numel() for p in module.backbone.parameters())
    assert data["latency"]["batch_size"] == 16 and data["latency"]["num_threads"] == 1
    assert data["accuracy"] == pytest.approx(float(trainer.callback_metrics["val/acc"]))
    assert data["accuracy_metric"] == "val/acc"
    assert (directory / "compression_report.md").read_text().startswith("| metric | model |")
    scalars = read_scalars(tmp_path)
    assert scalars["report/parameters"][0][1] == data["parameters"]
    assert scalars["report/macs"][0][1] == data["macs"]
    assert "| parameters |" in read_text(tmp_path, "report/table")[0]


def test_report_against_an_earlier_report(trainer_factory, tmp_path):
    first = CompressionReport(batch_size=8, latency_runs=2, warmup=0, output_dir=str(tmp_path / "big"))
    _fit(trainer_factory, first, width=8)
    second = CompressionReport(batch_size=8, latency_runs=2, warmup=0, output_dir=str(tmp_path / "small"),
                               baseline=str(tmp_path / "big" / "compression_report.json"))
    _fit(trainer_factory, second, width=4)
    data = json.loads((tmp_path / "small" / "compression_report.json").read_text())
    assert data["ratios"]["parameters"] == pytest.approx(data["baseline"]["parameters"] / data["parameters"])
    assert data["ratios"]["macs"] > 3  # halving the width quarters the convolutions' work
    assert "accuracy_delta" in data["ratios"]


def test_report_against_a_baseline_model(trainer_factory):
    report = CompressionReport(batch_size=8, latency_runs=2, warmup=0)
    report.set_baseline(PlainCNN(width=8))
    _fit(trainer_factory, report, width=4)
    assert report.report["baseline"]["parameters"] == sum(p.numel() for p in PlainCNN(width=8).parameters())


def test_report_without_validation_data_records_no_accuracy(trainer_factory, tmp_path):
    report = CompressionReport(batch_size=8, latency_runs=2, warmup=0)
    trainer = trainer_factory(callbacks=[report], limit_train_batches=2, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"never logs 'val/acc'; the metrics logged are \[.*'train/loss'"):
        trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=32))
    assert report.report["accuracy"] is None and report.report["macs"] > 0


def test_a_monitor_the_module_never_logs_fails_after_the_first_validation_naming_the_logged_metrics(
        trainer_factory):
    report = CompressionReport(monitor="val/accuracy", batch_size=8, latency_runs=2, warmup=0)
    trainer = trainer_factory(callbacks=[report], max_epochs=3, limit_train_batches=2, limit_val_batches=1)
    with pytest.raises(ValueError, match=r"monitor='val/accuracy'.*never logs 'val/accuracy'; the metrics logged "
                                         r"are \[.*'val/acc'"):
        trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=32))
    assert trainer.global_step == 2 and report.report is None  # after the first epoch, not at the end of fit


def test_monitor_none_reports_no_accuracy_without_a_warning(trainer_factory, recwarn):
    report = CompressionReport(monitor=None, batch_size=8, latency_runs=2, warmup=0)
    trainer_factory(callbacks=[report], limit_train_batches=2, limit_val_batches=1).fit(
        ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=32))
    assert report.report["accuracy"] is None and report.report["accuracy_metric"] is None
    assert not [w for w in recwarn if "never logs" in str(w.message)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"latency_runs": 0}, "latency_runs"),
        ({"warmup": -1}, "warmup"),
        ({"num_threads": 0}, "num_threads"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
        ({"latency_runs": 1.0}, "latency_runs must be an integer >= 1, got 1.0"),
        ({"warmup": 0.5}, "warmup must be an integer >= 0, got 0.5"),
        ({"num_threads": 1.5}, "num_threads must be an integer >= 1, got 1.5"),
        ({"baseline": "missing.json"}, "'missing.json'"),
        ({"monitor": ""}, "monitor must be a metric name or None"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionReport(**kwargs)


def test_measures_the_compression_target_not_the_whole_module(trainer_factory):
    class WithTeacher(ClassifierModule):
        def __init__(self):
            super().__init__(PlainCNN(width=4))
            self.teacher = PlainCNN(width=16)

    report = CompressionReport(batch_size=8, latency_runs=2, warmup=0)
    trainer = trainer_factory(callbacks=[report], limit_train_batches=2, limit_val_batches=1)
    module = WithTeacher()
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert report.report["parameters"] == sum(p.numel() for p in module.backbone.parameters())
    assert torch.is_tensor(trainer.callback_metrics["val/acc"])


def _pairs(count=32, features=4):
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(count, features, generator=generator),
                         torch.randint(0, 2, (count,), generator=generator))


class _Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _OwnLoader(_Linear):
    def train_dataloader(self):
        return DataLoader(_pairs(), batch_size=8)


class _TrainOnly(pl.LightningDataModule):
    """No val_dataloader: LightningDataModule's default raises MisconfigurationException."""

    def train_dataloader(self):
        return DataLoader(_pairs(), batch_size=8)


@pytest.mark.parametrize(
    "fit",
    [
        lambda trainer: trainer.fit(_Linear(), datamodule=_TrainOnly()),
        lambda trainer: trainer.fit(_Linear(), DataLoader(_pairs(), batch_size=8)),
        lambda trainer: trainer.fit(_OwnLoader()),
    ],
    ids=["datamodule_without_val", "fit_with_train_loader_only", "module_own_train_dataloader"],
)
def test_without_a_validation_loader_the_training_loader_gives_the_inputs(trainer_factory, fit):
    report = CompressionReport(batch_size=4, latency_runs=1, warmup=0)
    fit(trainer_factory(callbacks=[report]))
    # Linear(4, 2): 8 weights + 2 biases; 8 multiply-adds per sample.
    assert report.report["parameters"] == 10 and report.report["macs"] == 8
    assert report.report["latency"]["batch_size"] == 4


@pytest.mark.filterwarnings("ignore:Found 1 module.s. in eval mode")
def test_the_report_leaves_a_frozen_submodule_in_eval_mode(trainer_factory):
    class FrozenNorm(ClassifierModule):
        def on_fit_start(self):
            self.backbone.stem.bn.eval()  # the user freezes the first BatchNorm's statistics

    class Check(pl.Callback):
        def on_fit_end(self, trainer, pl_module):  # runs after CompressionReport's
            self.frozen = not pl_module.backbone.stem.bn.training

    check = Check()
    trainer = trainer_factory(callbacks=[CompressionReport(batch_size=8, latency_runs=1, warmup=0), check],
                              limit_train_batches=2, limit_val_batches=0)
    trainer.fit(FrozenNorm(ResidualCNN(width=4)), DigitsDataModule(batch_size=32))
    assert check.frozen
