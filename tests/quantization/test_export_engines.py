"""The int8 export under every quantized engine this host offers: exact where the engine can compute the model, a
clear refusal where it would saturate, on the demo models, a Conv1d network, a network whose activations outgrew
their calibrated range during QAT, and a Linear -> BatchNorm1d -> ReLU head; full-range signed, full-range unsigned
after ReLUs (``unsigned="auto"``) and 7-bit activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.demo import MLP, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.export.engines import exact_engines, host_summary
from lightning_compress.export.int8 import export_int8
from lightning_compress.quantization import quantize_model
from lightning_compress.quantization.quantizers import quantized_layers
from lightning_compress.testing import Conv1dNet, LinearBatchNormHead, noisy_sines, train_briefly

ENGINES = list(torch.backends.quantized.supported_engines)
MIN_AGREEMENT = 0.995
LAYOUTS = {"full-range": {}, "reduce-range": {"reduce_range": True}, "unsigned-auto": {"unsigned": "auto"}}


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[list, torch.Tensor]]:
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    digits_test = torch.cat([batch[0] for batch in dm.test_dataloader()])
    signals, labels = noisy_sines(1024, 0)
    signal_batches = list(zip(signals[:768].split(64), labels[:768].split(64), strict=True))
    return {"digits": (list(dm.train_dataloader()), digits_test), "signals": (signal_batches, signals[768:])}


MODELS = {
    "ResidualCNN": ("digits", lambda: ResidualCNN(width=8)),
    "PlainCNN": ("digits", lambda: PlainCNN(width=16)),
    "MLP": ("digits", lambda: MLP()),
    "Conv1dNet": ("signals", lambda: Conv1dNet()),
    "LinearBatchNormHead": ("digits", lambda: LinearBatchNormHead()),
    "outgrown-QAT": ("digits", lambda: PlainCNN(width=16)),
}


@pytest.fixture(scope="module")
def quantized(data) -> dict[tuple[str, str], tuple[nn.Module, torch.Tensor, int]]:
    """Every model fake-quantized (8 bits, entropy calibration) in every layout, with the largest activation code of
    its int8 export."""
    built = {}
    for name, (kind, make) in MODELS.items():
        batches, test = data[kind]
        for layout, options in LAYOUTS.items():
            torch.manual_seed(0)
            if name == "outgrown-QAT":  # calibrate the untrained network, then train with fake quantization
                model = quantize_model(make(), "static", batches[:2], calibration="max", **options)
                before = {n: float(layer.input_quantizer.amax) for n, layer in quantized_layers(model).items()}
                train_briefly(model, batches, 2)
                with torch.no_grad():  # the activations now reach past the ranges calibrated before training
                    grown = {n: float(layer.input_quantizer.amax) for n, layer in quantized_layers(
                        quantize_model(model, "static", [test], calibration="max")).items()}
                assert max(grown[n] / before[n] for n in before) > 1.5
            else:
                model = quantize_model(train_briefly(make(), batches, 2), "static", batches, calibration="entropy",
                                       **options)
            signs = [layer.input_quantizer.unsigned for layer in quantized_layers(model).values()]
            assert any(signs) == (layout != "full-range"), (name, layout, signs)  # after ReLUs: unsigned
            code = export_int8(model, test[:256], min_agreement=None).verification["max_activation_code"]
            built[(name, layout)] = (model, test, code)
    return built


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_reproduces_the_fake_quantized_model_or_refuses(quantized, model_name, layout, engine):
    model, test, code = quantized[(model_name, layout)]
    assert code <= (127 if layout == "reduce-range" else 255)
    if engine not in exact_engines(code):
        assert layout != "reduce-range" or engine == "onednn"  # 7-bit activations are exact under x86 on every CPU
        with pytest.raises(ValueError, match="saturate"):
            export_int8(model, test[:256], engine=engine)
        return
    int8 = export_int8(model, test[:256], engine=engine, check_inputs=test)
    result = int8.verification
    assert int8.engine == result["engine"] == engine
    assert result["agreement"] >= MIN_AGREEMENT, (engine, host_summary(), result)
    assert result["relative_error"] < 0.02, result
    with torch.no_grad():
        expected, got = model(test), int8(test)
    assert torch.equal(got.argmax(1), int8(test).argmax(1))  # deterministic
    assert float((got - expected).abs().max()) == pytest.approx(result["max_abs_diff"], rel=1e-5)


def test_reduced_range_inputs_stay_within_the_codes_that_x86_computes_without_vnni(quantized, monkeypatch):
    """Machine independent: on a CPU without VNNI, x86 is allowed only where every quantized kernel's input codes stay
    within [0, 127], and the exported model keeps them there (measured on the integers it runs on)."""
    import lightning_compress.export.engines as engines

    monkeypatch.setattr(engines, "has_vnni", lambda: False)
    monkeypatch.setattr(engines, "_is_x86", lambda: True)
    model, test, _ = quantized[("ResidualCNN", "reduce-range")]
    int8 = export_int8(model, test[:256], engine="x86", check_inputs=test)
    codes: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: codes.append(int(args[0].int_repr().max())))
             for m in int8.modules() if hasattr(m, "_packed_params") or (type(m).__name__.startswith("Conv")
             and type(m).__module__.startswith("torch.ao.nn.quantized"))]
    with torch.no_grad():
        int8(test)
    for hook in hooks:
        hook.remove()
    assert codes and max(codes) <= 127
    full, _, _ = quantized[("ResidualCNN", "full-range")]
    with pytest.raises(ValueError, match="without VNNI"):
        export_int8(full, test[:256], engine="x86")
    assert export_int8(full, test[:256]).engine == "qnnpack"  # auto falls back to the exact engine


def test_with_vnni_full_range_uses_x86(quantized, monkeypatch):
    import lightning_compress.export.engines as engines

    monkeypatch.setattr(engines, "has_vnni", lambda: True)
    monkeypatch.setattr(engines, "_is_x86", lambda: True)
    assert engines.choose_engine(255) == "x86"
    monkeypatch.setattr(engines, "has_vnni", lambda: False)
    assert engines.choose_engine(127) == "x86" and engines.choose_engine(255) == "qnnpack"
    monkeypatch.setattr(engines, "_is_x86", lambda: False)  # ARM
    assert engines.choose_engine(255) == "qnnpack"


@pytest.mark.parametrize(("unsigned", "clips"), [(False, 2), ("auto", 1)])
def test_activations_beyond_amax_are_clipped_like_the_fake_quantized_model(unsigned, clips):
    """A ReLU output 3x past the next layer's amax: the int8 model clips it at amax, as fake quantization does (an
    unsigned 8-bit input needs no clip: quantizing to quint8 clamps it alike)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    calibration = torch.randn(256, 8) * 0.3
    model = quantize_model(net, "static", [calibration], calibration="max", unsigned=unsigned)
    big = torch.randn(256, 8) * 3.0  # far outside the calibrated ranges
    for engine in exact_engines(255):
        int8 = export_int8(model, calibration, engine=engine, check_inputs=big)
        assert int8.verification["agreement"] == 1.0, (engine, int8.verification)
        assert sum(n.target is torch.ops.aten.hardtanh for n in int8.model.graph.nodes) == clips
        with torch.no_grad():
            torch.testing.assert_close(int8(big), model(big), atol=0.05 * float(model(big).abs().max()), rtol=0)
