"""The README's main command in full: examples/configs/pipeline.yaml distills, prunes, compacts, quantizes and
exports in one fit, and its report compares the int8 student with the teacher and the student trained alone."""

import json

import pytest
import torch

from lightning_compress.testing import read_scalars

EPOCHS, SCHEDULE_END, QAT_START, FREEZE = 30, 10, 18, 26


@pytest.fixture(scope="module")
def report(pipeline_run):
    return json.loads((pipeline_run / "compression_report.json").read_text())


@pytest.mark.slow
def test_report_compares_the_int8_student_with_teacher_and_student_alone(report):
    teacher, alone = report["references"]["teacher"], report["references"]["student_alone"]
    assert report["accuracy_metric"] == "export/acc" and report["int8_export"]["agreement"] >= 0.99
    assert report["onnx"]["agreement"] >= 0.995 and report["onnx"]["quantized_layers"] > 0  # model.onnx, QDQ
    assert report["accuracy"] >= 0.97 and teacher["accuracy"] >= 0.97 and alone["accuracy"] >= 0.97
    assert report["accuracy"] >= alone["accuracy"] - 0.02  # at most 2 points (7 of 359 images) below
    assert teacher["ratios"]["parameters"] >= 8 and teacher["ratios"]["size_bytes"] >= 8
    assert alone["ratios"]["parameters"] >= 2.2
    # int8 on top of pruning: the bytes shrink more than the parameter count (a float export: about equally; the
    # per-channel scales and zero points of these small layers keep the int8 gain near 1.25x, not 4x)
    assert alone["ratios"]["size_bytes"] >= 1.15 * alone["ratios"]["parameters"]
    assert teacher["ratios"]["macs"] >= 8 and teacher["ratios"]["latency_ms"] > 1


@pytest.mark.slow
def test_every_family_logs_each_epoch_and_the_phases_follow_the_config(pipeline_run):
    scalars = read_scalars(pipeline_run)
    for tag in ["val/acc", "train/acc", "distill/soft", "distill/hard", "distill/total", "prune/sparsity",
                "prune/progress", "prune/compacted", "prune/sparsity/stem.conv", "quant/phase"]:
        assert len(scalars[tag]) == EPOCHS, tag
    for tag in ["quant/amax/stem.conv", "quant/weight_amax/fc", "quant/error/stage2.0.conv1"]:
        assert len(scalars[tag]) == EPOCHS - QAT_START, tag
    compacted = [value for _, value in scalars["prune/compacted"]]
    assert compacted == [0.0] * (SCHEDULE_END - 1) + [1.0] * (EPOCHS - SCHEDULE_END + 1)
    phases = [value for _, value in scalars["quant/phase"]]
    assert phases == [-1.0] * QAT_START + [1.0] * (FREEZE - QAT_START) + [2.0] * (EPOCHS - FREEZE)
    assert scalars["prune/sparsity"][-1][1] == pytest.approx(0.39, abs=0.02)
    for tag in ["val/teacher_acc", "export/acc", "export/agreement", "report/parameters", "report/latency_ms"]:
        assert len(scalars[tag]) == 1, tag


@pytest.mark.slow
def test_the_int8_file_runs_alone_and_the_checkpoint_holds_the_compact_student(pipeline_run, report):
    int8 = torch.jit.load(str(pipeline_run / "model_int8.pt"))
    inputs = torch.randn(4, 1, 8, 8)
    torch.use_deterministic_algorithms(False)
    assert int8(inputs).shape == (4, 10)
    checkpoint = torch.load(pipeline_run / "checkpoints" / "last.ckpt", weights_only=False)
    weight = checkpoint["state_dict"]["student.stem.conv.weight"]
    assert weight.shape[0] == 5 and "student.stem.conv.input_quantizer.amax" in checkpoint["state_dict"]
    assert report["parameters"] < 0.45 * report["references"]["student_alone"]["parameters"]
