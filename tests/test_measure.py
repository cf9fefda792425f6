import json

import pytest
import torch
from torch import nn

from lightning_compress.measure import (
    compute_ratios,
    count_macs,
    count_nonzero_parameters,
    count_parameters,
    format_markdown,
    measure_latency,
    measure_model,
    state_size_bytes,
)


def tiny_model() -> nn.Module:
    # conv: 2 filters of 1x3x3 + 2 biases = 20 parameters; on 4x4 with padding: 2*16*9 = 288 multiply-adds.
    # linear: 32*3 + 3 = 99 parameters; 96 multiply-adds.
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


def test_parameters_and_macs_match_hand_counts():
    model = tiny_model()
    assert count_parameters(model) == 119
    assert count_macs(model, torch.zeros(5, 1, 4, 4)) == (384, 384)


def test_conv1d_macs_match_hand_count():
    model = nn.Sequential(nn.Conv1d(3, 4, 5), nn.Flatten(), nn.Linear(4 * 6, 2))
    # conv1d: 4 filters * 6 positions * 3*5 = 360; linear 24*2 = 48.
    assert count_macs(model, torch.zeros(1, 3, 10)) == (408, 408)


def test_nonzero_counts_follow_zeroed_weights():
    model = tiny_model()
    with torch.no_grad():
        model[3].weight[:, :16] = 0  # half the classifier weights
        model[0].weight[0] = 0  # one of two conv filters
    assert count_nonzero_parameters(model) == 119 - 48 - 9
    dense, nonzero = count_macs(model, torch.zeros(1, 1, 4, 4))
    assert dense == 384 and nonzero == 144 + 48


def test_size_matches_the_saved_file(tmp_path):
    model = tiny_model()
    path = tmp_path / "archive.pt"  # torch.save names the zip's root folder after the file ("archive" in memory)
    torch.save(model.state_dict(), path)
    assert state_size_bytes(model) == path.stat().st_size


def test_latency_records_batch_threads_and_restores_state():
    model = tiny_model().train()
    threads = torch.get_num_threads()
    result = measure_latency(model, torch.zeros(7, 1, 4, 4), runs=3, warmup=1, num_threads=1)
    assert result["latency_ms"] > 0 and result["batch_size"] == 7 and result["num_threads"] == 1
    assert model.training and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="runs"):
        measure_latency(model, torch.zeros(1, 1, 4, 4), runs=0)


def test_ratios_against_a_baseline_model():
    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    report = measure_model(small, torch.zeros(4, 1, 4, 4), accuracy=0.9, baseline=tiny_model(),
                           baseline_accuracy=0.95, latency_runs=2, warmup=0)
    # small: conv 9+1, linear 48+3 -> 61 parameters; 144 + 48 = 192 multiply-adds.
    assert report["parameters"] == 61 and report["macs"] == 192
    assert report["ratios"]["parameters"] == pytest.approx(119 / 61)
    assert report["ratios"]["macs"] == pytest.approx(2.0)
    assert report["ratios"]["accuracy_delta"] == pytest.approx(-0.05)
    assert report["baseline"]["parameters"] == 119
    assert json.loads(json.dumps(report)) == report
    table = format_markdown(report)
    assert table.startswith("| metric | model | baseline | vs baseline |")
    assert "| macs | 192 | 384 | 2.00x |" in table and "| accuracy | 0.9000 | 0.9500 | -5.00 points |" in table
    assert "vs baseline: baseline / model for sizes" in table and "model - baseline in points" in table


def test_ratios_skip_missing_values():
    assert compute_ratios({"parameters": 10, "accuracy": None}, {"parameters": 30, "accuracy": 0.5}) == {
        "parameters": 3.0
    }


def _with_frozen_norm() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 3))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model in training mode
    return model


@pytest.mark.parametrize(
    "measure",
    [
        lambda m, x: measure_latency(m, x, runs=1, warmup=0),
        count_macs,
        lambda m, x: measure_model(m, x, latency_runs=1, warmup=0),
        lambda m, x: measure_model(m, x, latency_runs=1, warmup=0, baseline=m),
    ],
    ids=["measure_latency", "count_macs", "measure_model", "measure_model_baseline"],
)
def test_each_submodule_keeps_its_own_mode(measure):
    model = _with_frozen_norm()
    measure(model, torch.zeros(2, 1, 4, 4))
    assert [m.training for m in model] == [True, False, True, True]
    model.eval()
    model[3].train()
    measure(model, torch.zeros(2, 1, 4, 4))
    assert [m.training for m in model] == [False, False, False, True] and not model.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_threads": 0}, "num_threads must be an integer >= 1, got 0"),
        ({"num_threads": 1.5}, "num_threads must be an integer >= 1, got 1.5"),
        ({"runs": 2.5}, "runs must be an integer >= 1, got 2.5"),
        ({"runs": True}, "runs must be an integer >= 1, got True"),
        ({"warmup": -1}, "warmup must be an integer >= 0, got -1"),
    ],
)
def test_latency_settings_must_be_integers(kwargs, message):
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=message):
        measure_latency(tiny_model(), torch.zeros(1, 1, 4, 4), **kwargs)
    assert torch.get_num_threads() == threads


def test_nonzero_macs_of_a_model_that_is_one_layer():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight[:4] = 0  # half of the filters
    # dense: 8 filters * 8*8 positions * 8*3*3 = 36864; half the filters zero: 18432.
    assert count_macs(conv, torch.zeros(2, 8, 8, 8)) == (36864, 18432)
    assert measure_model(conv, torch.zeros(2, 8, 8, 8), latency_runs=1, warmup=0)["nonzero_macs"] == 18432


def _half_zero_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.fill_(0.5)  # every kept weight far from zero at any bit width
            layer.weight[:, : layer.in_features // 2] = 0
    return model


def test_nonzero_macs_of_an_int8_export_follow_its_zero_weights():
    from lightning_compress.export.int8 import export_int8
    from lightning_compress.quantization import quantize_model

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    int8 = export_int8(quantize_model(_half_zero_mlp(), "static", x), x)
    report = measure_model(int8, x, latency_runs=1, warmup=0)
    # dense: 16*32 + 32*4 = 640; half of each weight zero: 256 + 64 = 320.
    assert report["macs"] == 640 and report["nonzero_macs"] == 320


def test_nonzero_macs_of_a_packed_weight_only_export_follow_its_zero_weights():
    from lightning_compress.quantization.packed import export_packed

    packed = export_packed(_half_zero_mlp(), num_bits=4)
    assert count_macs(packed, torch.zeros(3, 16)) == (640, 320)
    assert measure_model(packed, torch.zeros(3, 16), latency_runs=1, warmup=0)["nonzero_macs"] == 320
