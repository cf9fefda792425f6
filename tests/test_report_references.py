"""CompressionReport references: a teacher and a student-alone report compared with the compressed model, in the
JSON (key numbers, ratios reference / this, accuracy points), the Markdown table and the logged scalars."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lightning_compress import CompressionReport
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.measure import compare_with_references, format_markdown, format_references_markdown
from lightning_compress.testing import read_scalars, read_text

FAST = {"batch_size": 8, "latency_runs": 2, "warmup": 0}


def _fit(root, report, width):
    from conftest import make_trainer

    trainer = make_trainer(root, callbacks=[report], limit_train_batches=3, limit_val_batches=2)
    trainer.fit(ClassifierModule(PlainCNN(width=width)), DigitsDataModule(batch_size=32))
    return trainer


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Two reference runs (a wide "teacher", a "student_alone"), then a small model compared with both, and with a
    model reference given in Python."""
    root = tmp_path_factory.mktemp("references")
    files = {}
    for name, width in (("teacher", 16), ("student_alone", 4)):
        _fit(root / name, CompressionReport(output_dir=str(root / name), **FAST), width)
        files[name] = root / name / "compression_report.json"
    report = CompressionReport(output_dir=str(root / "this"), references={k: str(v) for k, v in files.items()},
                               **FAST)
    report.set_reference("wide_model", PlainCNN(width=8), accuracy=0.5)
    trainer = _fit(root / "this", report, 4)
    data = json.loads((root / "this" / "compression_report.json").read_text())
    refs = {name: json.loads(path.read_text()) for name, path in files.items()}
    return SimpleNamespace(root=root, trainer=trainer, report=report, data=data, refs=refs, files=files)


def test_references_section_has_key_numbers_and_ratios(compared):
    data, refs = compared.data, compared.refs
    assert list(data["references"]) == ["teacher", "student_alone", "wide_model"]
    for name, ref in refs.items():
        entry = data["references"][name]
        for key in ("accuracy", "parameters", "size_bytes", "macs", "latency_ms"):
            assert entry[key] == ref[key], (name, key)
        assert entry["source"] == str(compared.files[name])
        assert entry["latency"]["batch_size"] == 8
        ratios = entry["ratios"]
        for key in ("parameters", "size_bytes", "macs", "latency_ms"):
            assert ratios[key] == pytest.approx(ref[key] / data[key])
        assert ratios["accuracy_delta_points"] == pytest.approx(100 * (data["accuracy"] - ref["accuracy"]))
    teacher = data["references"]["teacher"]["ratios"]
    assert teacher["parameters"] > 10 and teacher["macs"] > 10  # width 16 against width 4
    assert data["references"]["student_alone"]["ratios"]["parameters"] == pytest.approx(1.0)
    wide = data["references"]["wide_model"]
    assert wide["accuracy"] == 0.5 and wide["parameters"] == sum(p.numel() for p in PlainCNN(width=8).parameters())
    assert wide["source"] == "model PlainCNN"
    assert "baseline" not in data and "ratios" not in data  # the baseline behaviour is untouched


def test_markdown_has_one_comparison_table(compared):
    text = (compared.root / "this" / "compression_report.md").read_text()
    assert text.startswith("| metric | model |")
    assert text.count("| model | accuracy | parameters | size (bytes) | MACs | latency (ms) |") == 1
    rows = [line for line in text.splitlines() if line.startswith(("| teacher |", "| student_alone |",
                                                                   "| wide_model |", "| **this model** |"))]
    assert len(rows) == 4 and all(row.count("|") == 12 for row in rows)
    teacher = rows[0].split("|")
    ratio = compared.data["references"]["teacher"]["ratios"]["parameters"]
    assert teacher[8].strip() == f"{ratio:.2f}x"
    assert f"{compared.refs['teacher']['parameters']:,}" in rows[0]
    assert read_text(compared.root / "this", "report/table")[0] == text.rstrip("\n")


def test_reference_ratios_are_logged_with_the_report_scalars(compared):
    scalars = read_scalars(compared.root / "this")
    data = compared.data
    assert scalars["report/parameters"][-1][1] == data["parameters"]
    assert scalars["report/reference/teacher/parameters"][-1][1] == pytest.approx(
        data["references"]["teacher"]["ratios"]["parameters"])
    assert scalars["report/reference/student_alone/accuracy_delta_points"][-1][1] == pytest.approx(
        data["references"]["student_alone"]["ratios"]["accuracy_delta_points"], abs=1e-4)


def test_set_reference_replaces_and_overrides_accuracy(compared):
    report = CompressionReport(**FAST)
    report.set_reference("teacher", compared.files["teacher"], accuracy=0.25)
    report.set_reference("teacher", compared.refs["student_alone"])
    assert report.references["teacher"]["parameters"] == compared.refs["student_alone"]["parameters"]
    measured = report._measured_references(None)
    assert measured["teacher"]["accuracy"] == compared.refs["student_alone"]["accuracy"]
    report.set_reference("teacher", compared.files["teacher"], accuracy=0.25)
    assert report._measured_references(None)["teacher"]["accuracy"] == 0.25


@pytest.mark.parametrize(
    ("args", "message"),
    [(("teacher", "missing.json"), "reference 'teacher': report 'missing.json' does not exist"),
     (("", {}), "non-empty name")],
)
def test_bad_references_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        CompressionReport().set_reference(*args)
    if args[0]:
        with pytest.raises(ValueError, match=message):
            CompressionReport(references={args[0]: args[1]})


def test_latency_measured_differently_is_flagged():
    latency = {"batch_size": 64, "num_threads": 1, "runs": 3, "warmup": 1}
    this = {"parameters": 10, "accuracy": 0.8, "latency_ms": 1.0, "latency": latency}
    references = {"teacher": {"parameters": 40, "accuracy": 0.9, "latency_ms": 3.0,
                              "latency": {**latency, "batch_size": 8}}}
    this["references"] = compare_with_references(this, references)
    assert this["references"]["teacher"]["ratios"] == pytest.approx(
        {"parameters": 4.0, "latency_ms": 3.0, "accuracy_delta": -0.1, "accuracy_delta_points": -10.0})
    table = format_references_markdown(this)
    assert "| teacher | 0.9000 | 40 | - | - | 3.000 | -10.00 | 4.00x | - | - | 3.00x |" in table
    assert "Latency of 'teacher' was measured with batch size 8" in table
    assert format_markdown(this).endswith(table)
