import json

import pytest
import torch

from lightning_compress import CompressionReport
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
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
    trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=32))
    assert report.report["accuracy"] is None and report.report["macs"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"latency_runs": 0}, "latency_runs"),
        ({"warmup": -1}, "warmup"),
        ({"num_threads": 0}, "num_threads"),
        ({"baseline": "missing.json"}, "'missing.json'"),
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
