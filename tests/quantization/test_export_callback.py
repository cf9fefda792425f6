"""Int8Export: the int8 file loads back with torch alone and reproduces the model; accuracy, agreement and size are
logged; CompressionReport measures the int8 model whatever the callback order; without quantization it fails
before the first step."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from lightning_compress import CompressionReport, Int8Export, QuantizationAwareTraining
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.export.int8 import deterministic_off
from lightning_compress.measure import state_size_bytes
from lightning_compress.quantization import export_callback, quantized_counts
from lightning_compress.testing import read_scalars

VAL_BATCHES = 3


def _val_batches():
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup()
    return [batch for _, batch in zip(range(VAL_BATCHES), datamodule.val_dataloader(), strict=False)]


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """One short QAT fit of a ResidualCNN with the report BEFORE the export in the callback list."""
    from conftest import make_trainer

    root = tmp_path_factory.mktemp("int8")
    calls = []
    original = export_callback.export_int8

    def counting_export(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_callback, "export_int8", counting_export)
        torch.manual_seed(0)
        exporter = Int8Export(batch_size=128)
        report = CompressionReport(batch_size=16, latency_runs=3, warmup=1)
        trainer = make_trainer(root, max_epochs=2, limit_train_batches=20, limit_val_batches=VAL_BATCHES,
                               callbacks=[QuantizationAwareTraining(calibration_batches=3), report, exporter])
        module = ClassifierModule(ResidualCNN(width=8), lr=3e-3)
        trainer.fit(module, DigitsDataModule(batch_size=64))
    return SimpleNamespace(root=root, run_dir=root / "run" / "version_0", trainer=trainer, module=module,
                           exporter=exporter, report=report, export_calls=len(calls))


def test_file_loads_with_torch_alone_and_reproduces_the_int8_model(qat_run, tmp_path):
    exporter = qat_run.exporter
    path = qat_run.run_dir / "model_int8.pt"
    assert exporter.results["path"] == str(path) and path.is_file()
    assert exporter.results["size_bytes"] == path.stat().st_size
    assert exporter.results["format"] == "torchscript (script)" and exporter.results["identical_after_load"]
    inputs = torch.cat([x for x, _ in _val_batches()])
    with deterministic_off(), torch.no_grad():
        expected = exporter.model(inputs)
    torch.save(inputs, tmp_path / "inputs.pt")
    metadata = json.loads(path.with_suffix(".json").read_text())
    assert metadata["engine"] == exporter.results["engine"] == exporter.model.engine
    assert export_callback.int8_metadata(path) == metadata  # recorded inside the file too
    script = textwrap.dedent(f"""
        import json, sys, torch
        torch.backends.quantized.engine = json.load(open({str(path.with_suffix(".json"))!r}))["engine"]
        model = torch.jit.load({str(path)!r})
        out = model(torch.load({str(tmp_path / "inputs.pt")!r}))
        torch.save(out, {str(tmp_path / "out.pt")!r})
        assert not any(name.startswith(("lightning_compress", "lightning")) for name in sys.modules), "imported"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)  # bit-identical after the round trip
    assert expected.dtype == torch.float32 and expected.shape == (len(inputs), 10)


def test_accuracy_agreement_and_size_are_logged(qat_run):
    trainer, exporter = qat_run.trainer, qat_run.exporter
    results = exporter.results
    correct = agree = total = 0
    backbone = qat_run.module.backbone.eval()
    with deterministic_off(), torch.no_grad():
        for inputs, targets in _val_batches():
            int8, fake = exporter.model(inputs).argmax(1), backbone(inputs).argmax(1)
            correct += int((int8 == targets).sum())
            agree += int((int8 == fake).sum())
            total += len(targets)
    assert results["samples"] == total == 3 * 64
    assert results["acc"] == pytest.approx(correct / total)
    assert results["agreement"] == pytest.approx(agree / total) and results["agreement"] >= 0.9
    # the fake-quantized model on the same batches is what the validation loop measured
    assert results["fake_quant_acc"] == pytest.approx(float(trainer.callback_metrics["val/acc"]), abs=1e-6)
    assert float(trainer.callback_metrics["export/acc"]) == pytest.approx(results["acc"])
    scalars = read_scalars(qat_run.root)
    assert scalars["export/acc"][-1][1] == pytest.approx(results["acc"])
    assert scalars["export/agreement"][-1][1] == pytest.approx(results["agreement"])
    assert scalars["export/size_bytes"][-1][1] == results["size_bytes"]
    assert results["quantized_layers"] == 10
    kernel = results["verification"]["kernel"]  # every int8 layer's codes checked, none wrong on an exact engine
    assert kernel["codes"] > 0 and kernel["wrong"] == 0 and scalars["export/kernel_wrong_codes"][-1][1] == 0


def test_report_measures_the_int8_model_and_the_export_runs_once(qat_run):
    trainer, exporter = qat_run.trainer, qat_run.exporter
    assert qat_run.export_calls == 1  # the report asked first; Int8Export.on_fit_end found it done
    data = json.loads((qat_run.run_dir / "compression_report.json").read_text())
    assert data == qat_run.report.report
    counts = quantized_counts(exporter.model)
    assert data["model"] == "Int8Model" and data["parameters"] == counts["parameters"] > 0
    assert data["accuracy"] == pytest.approx(exporter.results["acc"]) and data["accuracy_metric"] == "export/acc"
    assert data["fake_quant_accuracy"] == pytest.approx(float(trainer.callback_metrics["val/acc"]))
    assert data["fake_quant_accuracy_metric"] == "val/acc"
    assert data["int8_export"]["path"] == exporter.results["path"]
    assert data["int8_export"]["agreement"] == pytest.approx(exporter.results["agreement"])
    float_bytes = state_size_bytes(ResidualCNN(width=8))
    assert data["size_bytes"] < 0.6 * float_bytes  # int8 weights (per-channel scales and zip overhead on top)
    assert "int8 model written by Int8Export" in (qat_run.run_dir / "compression_report.md").read_text()
    assert read_scalars(qat_run.root)["report/accuracy"][-1][1] == pytest.approx(exporter.results["acc"])


def test_export_is_idempotent(qat_run):
    exporter = qat_run.exporter
    model, results = exporter.model, dict(exporter.results)
    assert exporter.export(qat_run.trainer, qat_run.module) is model and exporter.results == results


def test_without_quantization_it_fails_before_the_first_step(trainer_factory, tmp_path):
    exporter = Int8Export(output_dir=str(tmp_path / "out"))
    trainer = trainer_factory(callbacks=[exporter], limit_train_batches=2, limit_val_batches=1)
    module = ClassifierModule(PlainCNN(width=4))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="Int8Export needs a quantized network"):
        trainer.fit(module, DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0 and not (tmp_path / "out").exists()
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_quantization_starting_after_the_last_epoch_warns_early_and_skips(trainer_factory):
    exporter = Int8Export()
    report = CompressionReport(batch_size=8, latency_runs=2, warmup=0)
    qat = QuantizationAwareTraining(start_epoch=3)
    trainer = trainer_factory(callbacks=[qat, exporter, report], limit_train_batches=2, limit_val_batches=1)
    module = ClassifierModule(PlainCNN(width=4))
    with pytest.warns(UserWarning, match=r"starts after the last epoch \(max_epochs=1\)"):
        trainer.fit(module, DigitsDataModule(batch_size=32))
    assert exporter.model is None and "no quantized layers" in exporter.results["skipped"]
    assert report.report["accuracy_metric"] == "val/acc" and "int8_export" not in report.report
    assert report.report["parameters"] == sum(p.numel() for p in module.backbone.parameters())


def test_uncalibrated_quantizers_are_skipped_with_the_reason(trainer_factory):
    exporter = Int8Export()
    qat = QuantizationAwareTraining(calibration_batches=50)  # calibration still running at the end of fit
    trainer = trainer_factory(callbacks=[qat, exporter], limit_train_batches=2, limit_val_batches=1)
    with pytest.warns(UserWarning, match="no static input scale"):
        trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=32))
    assert exporter.model is None


def test_traced_file_when_scripting_fails_is_identical_too(qat_run, tmp_path, monkeypatch):
    inputs = torch.cat([x for x, _ in _val_batches()])

    def refuse(*args, **kwargs):
        raise RuntimeError("not scriptable")

    monkeypatch.setattr(torch.jit, "script", refuse)
    path = tmp_path / "traced.pt"
    assert export_callback.save_int8(qat_run.exporter.model, path, inputs[:64]) == "trace"
    with deterministic_off(), torch.no_grad():  # traced at batch size 64, run at 192 and 5
        for batch in (inputs, inputs[:5]):
            assert torch.equal(export_callback.load_int8(path)(batch), qat_run.exporter.model(batch))


@pytest.mark.parametrize(
    ("limit_val_batches", "eval_batches", "expected"),
    [(1.0, None, 10), (0.5, None, 5), (3, None, 3), (3, 2, 2), (1.0, 0, 0), (0, None, 0)],
)
def test_evaluation_follows_the_validation_limit(limit_val_batches, eval_batches, expected):
    assert export_callback._batch_limit(range(10), limit_val_batches, eval_batches) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"filename": ""}, "filename"), ({"batch_size": 0}, "batch_size"), ({"eval_batches": -1}, "eval_batches")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Int8Export(**kwargs)


def test_wrong_kernel_codes_fail_the_run_whatever_the_agreement(trainer_factory, tmp_path, monkeypatch):
    """An engine whose kernels compute codes integer arithmetic does not give (as saturating kernels do) fails the
    export even where the agreement passes: nothing is written, and the count is logged first."""
    import lightning_compress.export.int8 as int8_module

    def saturated(model, args):
        return {"layers": 3, "codes": 600, "near_tie": 0, "wrong": 17, "max_code_difference": 40.0, "worst": "conv"}

    monkeypatch.setattr(int8_module, "kernel_exactness", saturated)
    exporter = Int8Export(output_dir=str(tmp_path / "out"), min_agreement=0.0)
    qat = QuantizationAwareTraining(calibration_batches=1)
    trainer = trainer_factory(callbacks=[qat, exporter], limit_train_batches=3, limit_val_batches=1)
    with pytest.raises(ValueError, match="17 of 600 output codes differently from integer arithmetic"):
        trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=32))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pt"))
    assert exporter.results["verification"]["kernel"]["wrong"] == 17
