"""Bias rounding (:mod:`~lightning_compress.quantization.bias_rounding`): integer kernels that store the bias as
int32 at the accumulator's step (``qnnpack``; Jacob et al. 2018) compute what the fake-quantized model computes once
``quantize_model(..., residual_quantizers=True)`` simulates that rounding and the export stores the rounded bias;
the float-bias engines (``x86``, ``fbgemm``, ``onednn``) still agree, and the hooks hold no state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress.export.engines import exact_engines
from lightning_compress.export.int8 import export_int8
from lightning_compress.quantization import float_state_dict, quantize_model, remove_quantizers
from lightning_compress.quantization.bias_rounding import bias_shift, has_bias_rounding


def _block(cin: int, cout: int, kernel: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU()]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*_block(3, 16, 3), *_block(16, 16, 3, groups=16), *_block(16, 24, 1),
                                      nn.Conv2d(24, 24, 1), nn.ReLU())
        self.classifier = nn.Linear(24 * 12 * 12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _model() -> nn.Module:
    """Stem, depthwise and pointwise convolutions with batch norms of nonzero statistics, a biased 1x1 convolution
    without a batch norm, and a classifier over every position (an output layer, computed in float by the export:
    a flipped code anywhere changes the logits)."""
    torch.manual_seed(0)
    model = _Net()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.weight.data = 0.5 + torch.rand(channels)
            module.bias.data = torch.randn(channels)
            module.running_mean.data = 0.3 * torch.randn(channels)
            module.running_var.data = 0.5 + torch.rand(channels)
    return model.eval()


@pytest.fixture(scope="module")
def quantized() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    model = _model()
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(64, 3, 12, 12, generator=generator)
    test = torch.randn(128, 3, 12, 12, generator=generator)
    fake = quantize_model(model, "static", calibration, reduce_range=True, residual_quantizers=True)
    return model, fake, calibration, test


def test_hooks_on_layers_with_an_int32_bias_only(quantized):
    _, fake, _, _ = quantized
    hooked = {name for name, module in fake.named_modules() if has_bias_rounding(module) is not None}
    assert hooked == {f"features.{i}" for i in (0, 3, 6, 9)}  # not the classifier: the export computes it in float
    features = fake.features
    assert has_bias_rounding(features[0]).bn is features[1] and has_bias_rounding(features[9]).bn is None
    plain = quantize_model(quantized[0], "static", quantized[2], reduce_range=True)
    assert not any(has_bias_rounding(module) for module in plain.modules())


def test_shift_puts_the_folded_bias_on_the_accumulator_grid(quantized):
    features = quantized[1].features
    for conv, bn in ((features[3], features[4]), (features[9], None)):
        shift = bias_shift(conv, bn).double()
        x_step = float(conv.input_quantizer.amax) / conv.input_quantizer.qmax
        w_step = conv.weight_quantizer.amax.double() / conv.weight_quantizer.qmax
        bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.double)
        factor, folded = torch.ones_like(w_step), bias + shift
        if bn is not None:
            factor = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            folded = bn.bias.double() + factor * (folded - bn.running_mean.double())
        step = x_step * w_step * factor.abs()
        codes = folded / step
        assert (codes - codes.round()).abs().max() < 1e-3
        assert (shift * factor).abs().max() <= 0.5 * step.max() + 1e-9  # moved to the nearest grid point


@pytest.mark.parametrize("engine", list(torch.backends.quantized.supported_engines))
def test_int8_model_computes_the_fake_quantized_model_on_every_engine(quantized, engine):
    _, fake, calibration, test = quantized
    if engine not in exact_engines(127) or engine == "none":
        pytest.skip(f"{engine} cannot compute 7-bit activations exactly on this host")
    int8 = export_int8(fake, calibration, engine=engine, check_inputs=test, min_agreement=None)
    with torch.no_grad():
        expected, got = fake(test), int8(test)
    # every layer's codes equal those of the fake-quantized model up to float rounding ties, so the logits (a float
    # layer over the same codes) too. Measured (2026-12-06, x86 with VNNI): without the bias rounding qnnpack differs
    # on 122/128 samples (max |difference| 1.2e-3, relative error 1.7e-3), x86 / fbgemm / onednn on 4/128 (ties,
    # max 3.6e-4); with it, 0/128 on every engine
    differs = (got - expected).abs().amax(1) > 1e-4
    assert float(differs.float().mean()) <= 0.05, (engine, int(differs.sum()), float((got - expected).abs().max()))
    assert int8.verification["agreement"] >= 0.99 and int8.verification["relative_error"] < 1e-3, int8.verification


def test_hooks_hold_no_state_and_go_with_the_quantizers(quantized):
    model, fake, _, test = quantized
    assert float_state_dict(fake.state_dict()).keys() == model.state_dict().keys()
    assert not any("bias" in key for key in fake.state_dict() if key.startswith("features.0."))
    with torch.no_grad():
        copied = copy.deepcopy(fake)
        assert torch.equal(copied(test), fake(test))
        remove_quantizers(copied)
        assert not any(has_bias_rounding(module) for module in copied.modules())
        torch.testing.assert_close(copied(test), model(test))
