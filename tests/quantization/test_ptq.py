"""Post-training quantization: quantize_model modes and the PostTrainingQuantization callback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import PostTrainingQuantization
from lightning_compress.demo import MLP, ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.quantization import quantize_model
from lightning_compress.quantization.calibrators import compute_amax
from lightning_compress.quantization.functional import fake_quantize
from lightning_compress.quantization.quantizers import QuantLinear, quantized_layers
from lightning_compress.testing import read_scalars


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(in_features=16, hidden=(8,), num_classes=3)


def _accuracy(model: nn.Module, loader) -> float:  # type: ignore[no-untyped-def]
    """Top-1 accuracy of ``model`` over every batch of ``loader``, counted here."""
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for inputs, targets in loader:
            correct += int((model(inputs).argmax(1) == targets).sum())
            total += len(targets)
    return correct / total


def _batches(n: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(32, 16, generator=generator) for _ in range(n)]


def test_static_max_matches_hand_computed_amax_and_leaves_model_alone() -> None:
    model, data = _mlp(), _batches()
    keys = list(model.state_dict())
    qmodel = quantize_model(model, "static", data)
    assert list(model.state_dict()) == keys and not quantized_layers(model)
    fc1 = qmodel.layers.fc1
    assert isinstance(fc1, QuantLinear) and not qmodel.training
    assert float(fc1.input_quantizer.amax) == pytest.approx(float(torch.cat(data).abs().max()))
    hidden = torch.relu(model.layers.fc1(torch.cat(data))).detach()
    assert float(qmodel.classifier.input_quantizer.amax) == pytest.approx(float(hidden.abs().max()), rel=1e-6)
    assert torch.equal(fc1.weight_quantizer.amax, fc1.weight.detach().abs().amax(dim=1))
    x = data[0]
    expected_in = fake_quantize(x, fc1.input_quantizer.amax)
    expected_w = fake_quantize(fc1.weight, fc1.weight_quantizer.amax, axis=0)
    with torch.no_grad():
        assert torch.allclose(fc1(x), nn.functional.linear(expected_in, expected_w, fc1.bias))


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_static_histogram_methods_match_compute_amax(method: str) -> None:
    model, data = _mlp(), _batches(1)
    qmodel = quantize_model(model, "static", data, calibration=method, percentile=99.0)
    expected = compute_amax(data[0], method, percentile=99.0)
    assert float(qmodel.layers.fc1.input_quantizer.amax) == pytest.approx(float(expected), rel=1e-6)


def test_weight_only_dynamic_and_global() -> None:
    model, data = _mlp(), _batches(1)
    x = data[0]
    weight_only = quantize_model(model, "weight_only", bit_widths={"classifier": 4})
    fc1 = weight_only.layers.fc1
    with torch.no_grad():
        w = fake_quantize(fc1.weight, fc1.weight.abs().amax(dim=1), axis=0)
        assert torch.allclose(fc1(x), nn.functional.linear(x, w, fc1.bias))
    assert weight_only.classifier.weight_quantizer.num_bits == 4
    dynamic = quantize_model(model, "dynamic")
    dfc1 = dynamic.layers.fc1
    with torch.no_grad():
        expected = nn.functional.linear(fake_quantize(x, x.abs().max()), w, dfc1.bias)
        assert torch.allclose(dfc1(x), expected)
        assert torch.allclose(dfc1(2 * x), nn.functional.linear(fake_quantize(2 * x, 2 * x.abs().max()), w,
                                                                  dfc1.bias))
    per_tensor = quantize_model(model, "weight_only", per_channel=False)
    assert float(per_tensor.layers.fc1.weight_quantizer.amax) == float(fc1.weight.abs().max())
    fixed = quantize_model(model, "static", calibration="global", amax={"layers.fc1": 1.5, "class.*": 4.0})
    assert float(fixed.layers.fc1.input_quantizer.amax) == 1.5
    assert float(fixed.classifier.input_quantizer.amax) == 4.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "int4"}, "Unknown mode 'int4'"),
        ({"mode": "static"}, "needs calibration_data"),
        ({"mode": "static", "calibration": "global", "amax": -1.0}, "amax -1.0"),
        ({"mode": "static", "calibration_data": [torch.full((2, 16), float("nan"))]}, "layer 'layers.fc1'"),
        ({"mode": "weight_only", "num_bits": 17}, "num_bits=17"),
        ({"mode": "weight_only", "layers": ["nothing"]}, "'nothing' matches no layer"),
    ],
)
def test_quantize_model_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_model(_mlp(), **kwargs)


def test_callback_at_fit_end_and_through_validate(trainer_factory, tmp_path) -> None:
    dm = DigitsDataModule(batch_size=64, seed=0)
    torch.manual_seed(0)
    module = ClassifierModule(PlainCNN(width=4), lr=3e-3)
    callback = PostTrainingQuantization(modes=["weight_only", "static", "dynamic"], calibration="entropy")
    trainer = trainer_factory(callbacks=[callback], limit_train_batches=8, limit_val_batches=4)
    trainer.fit(module, datamodule=dm)
    assert set(callback.results) == {"fp32", "weight_only", "static", "dynamic"}
    assert all(abs(callback.results[m] - callback.results["fp32"]) < 0.1 for m in callback.results)
    assert not quantized_layers(module)  # the trained model is untouched
    # each result is the accuracy of a really quantized copy on the whole validation split (not the float model's)
    backbone = module.backbone
    assert callback.results["fp32"] == _accuracy(backbone, dm.val_dataloader())
    inputs = next(iter(dm.val_dataloader()))[0]
    for mode in ("weight_only", "static", "dynamic"):
        quantized = callback.models[mode]
        assert set(quantized_layers(quantized)) == {"block1.conv", "block2.conv", "block3.conv", "classifier"}, mode
        assert callback.results[mode] == _accuracy(quantized, dm.val_dataloader()), mode
        with torch.no_grad():
            assert not torch.equal(quantized.eval()(inputs), backbone.eval()(inputs)), mode
    # static: calibrated with the entropy method on the validation loader
    expected = quantize_model(backbone, "static", dm.val_dataloader(), calibration="entropy")
    with torch.no_grad():
        assert torch.equal(callback.models["static"](inputs), expected(inputs))
    scalars = read_scalars(tmp_path)
    for mode, accuracy in callback.results.items():
        assert scalars[f"ptq/{mode}/acc"][-1][1] == pytest.approx(accuracy), mode
    other = PostTrainingQuantization(modes="static", num_bits=4)
    trainer_factory(callbacks=[other], limit_val_batches=2).validate(module, datamodule=dm)
    assert set(other.results) == {"fp32", "static"}
    assert {layer.input_quantizer.num_bits for layer in quantized_layers(other.models["static"]).values()} == {4}
    assert other.results["static"] == _accuracy(other.models["static"], dm.val_dataloader())


def test_callback_rejects_bad_mode() -> None:
    with pytest.raises(ValueError, match="Unknown mode 'fp8'"):
        PostTrainingQuantization(modes=["static", "fp8"])
