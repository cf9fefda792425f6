"""Residual quantizers on squeeze-excitation networks (MobileNetV3, EfficientNet, RegNet): the int8 graph also stores
in 8 bits the outputs of hardswish / SiLU (at the grid of the layer reading them), of the sigmoid gates (torch.ao's
fixed 1/256), and averages the codes of a pooled tensor (ties rounded half to even); the fake-quantized model does
the same, so both agree."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress.export.engines import exact_engines
from lightning_compress.export.int8 import export_int8
from lightning_compress.quantization import quantize_model
from lightning_compress.quantization.residual import ResidualQuantizer, residual_quantizers
from lightning_compress.testing import digits_trained


class SqueezeExcitation(nn.Module):
    """torchvision's block: pool -> 1x1 conv -> ReLU -> 1x1 conv -> gate, times the input."""

    def __init__(self, channels: int, gate: nn.Module) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.activation = nn.Conv2d(channels, channels // 2, 1), nn.ReLU()
        self.fc2, self.scale_activation = nn.Conv2d(channels // 2, channels, 1), gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


def _conv(cin: int, cout: int, kernel: int, act: type[nn.Module] | None, groups: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class InvertedSE(nn.Module):
    """MobileNetV3's / EfficientNet's block: expand, depthwise, squeeze-excitation, project, add the input."""

    def __init__(self, channels: int, act: type[nn.Module], gate: nn.Module) -> None:
        super().__init__()
        self.block = nn.Sequential(_conv(channels, 2 * channels, 1, act),
                                   _conv(2 * channels, 2 * channels, 3, act, groups=2 * channels),
                                   SqueezeExcitation(2 * channels, gate), _conv(2 * channels, channels, 1, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + x


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(1, 16, 3, nn.Hardswish)
        self.block1 = InvertedSE(16, nn.Hardswish, nn.Hardsigmoid())
        self.block2 = InvertedSE(16, nn.SiLU, nn.Sigmoid())
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.block2(self.block1(self.stem(x)))), 1))


@pytest.fixture(scope="module")
def se_models() -> tuple[list, torch.Tensor, nn.Module, nn.Module]:
    batches, test, model = digits_trained(SENet, 3)
    fake = quantize_model(model, "static", batches, reduce_range=True, residual_quantizers=True)
    return batches, test, model, fake


def test_se_points_are_found(se_models):
    kinds = {name: (q.kind, q.consumers) for name, q in residual_quantizers(se_models[3]).items()}
    for block in ("block1", "block2"):
        se = f"{block}.block.2"
        assert kinds[f"{se}.scale_activation"] == ("fixed", ())  # the gate: torch.ao's fixed 1/256
        assert kinds[f"{block}.block.1.2"] == ("consumers", (f"{se}.fc1",))  # hardswish / SiLU read by pool and mul
        assert kinds[f"{se}.avgpool"] == ("pool", (f"{block}.block.1.2",))  # averaged on that grid's codes
        assert kinds[f"{se}.fc2"] == ("range", ())  # the gate's input
        assert kinds[se] == ("mul", (f"{block}.block.3.0",))  # gate times input, on the projection's grid
        assert residual_quantizers(se_models[3])[se].operands == (f"{se}.scale_activation", f"{block}.block.1.2")
    gates = [q for name, q in residual_quantizers(se_models[3]).items() if q.kind == "fixed"]
    assert all(float(q.scale) == 1 / 256 and int(q.zero_point) == 0 for q in gates)


def test_pool_quantizer_rounds_ties_half_to_even_on_codes():
    quantizer = ResidualQuantizer("pool", ("x",))
    quantizer.set_qparams(0.1, 0)
    pool = nn.AdaptiveAvgPool2d(1)
    x = torch.tensor([1.0, 2.0, 2.0, 2.0]).reshape(1, 1, 2, 2) * 0.1  # mean code 1.75 -> 2; codes 1, 2 -> 1.5 -> 2
    assert torch.allclose(quantizer.pool(pool, x, pool(x)), torch.tensor(0.2))
    ties = torch.tensor([0.5, 0.5, 0.5, 0.5]).reshape(1, 1, 2, 2)  # codes 5 -> 5
    half = torch.tensor([0.5, 0.5, 0.6, 0.6]).reshape(1, 1, 2, 2)  # mean code 5.5 -> 6 (even)
    assert torch.allclose(quantizer.pool(pool, ties, pool(ties)), torch.tensor(0.5))
    assert torch.allclose(quantizer.pool(pool, half, pool(half)), torch.tensor(0.6))


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_mul_quantizer_requantizes_as_quantized_mul(engine):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"{engine} is not in this torch build")
    generator = torch.Generator().manual_seed(0)
    gate_codes = torch.randint(0, 256, (20000,), generator=generator, dtype=torch.uint8)
    input_codes = torch.randint(0, 256, (20000,), generator=generator, dtype=torch.uint8)
    mismatched_float = 0
    for step, zero in ((0.05, 64), (0.0371, 0)):  # output on the input's grid (ties on 1/256 gates), and another
        gate = torch._make_per_tensor_quantized_tensor(gate_codes, 1 / 256, 0)
        x = torch._make_per_tensor_quantized_tensor(input_codes, 0.05, 64)
        quantizer = ResidualQuantizer("mul", ("next",), operands=("gate", "x"))
        quantizer.set_qparams(step, zero)
        quantizer.operand_scales.copy_(torch.tensor([1 / 256, 0.05]))
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            expected = torch.ops.quantized.mul(gate, x, step, zero).dequantize()
        finally:
            torch.backends.quantized.engine = previous
        product = gate.dequantize() * x.dequantize()
        assert torch.equal(quantizer(product), expected)
        mismatched_float += int((torch.fake_quantize_per_tensor_affine(product, step, zero, 0, 255) != expected).sum())
    assert mismatched_float > 0  # a float product rounds ties at random (measured: 23 of the 20000 on the grid of x)


@pytest.mark.parametrize("engine", list(torch.backends.quantized.supported_engines))
def test_int8_se_network_follows_the_fake_quantized_model(se_models, engine):
    batches, test, _, fake = se_models
    if engine not in exact_engines(127) or engine == "none":
        pytest.skip(f"{engine} cannot compute 7-bit activations exactly on this host")
    int8 = export_int8(fake, batches[0][0], engine=engine, check_inputs=test, min_agreement=None)
    check = int8.verification
    # measured (2026-12-06, x86 with VNNI): agreement 0.967 -> 1.000, relative error 0.114 -> 0.0013 (x86, onednn;
    # fbgemm 0.0000; qnnpack 0.974 -> 0.993 and 0.114 -> 0.019), where "before" had residual quantizers at layer
    # outputs and additions only; without any: 0.964 and 0.167. With the int32 bias rounding (bias_rounding) and
    # the products on codes ("mul"): 1.000 on every engine, relative error 0.0017 (x86, onednn), 0.0008 (fbgemm),
    # 0.0000 (qnnpack; 0.019 before: its int32 biases)
    assert check["agreement"] >= 0.995, (engine, check)
    assert check["relative_error"] <= 0.005, (engine, check)


def test_gradients_pass_the_pool_and_mul_quantizers(se_models):
    """The pooled average and the gate product round like the int8 kernels forward and pass the gradient straight
    through backward, as fake quantization does: training the fake-quantized network (fine-tuning after PTQ) still
    reaches the stem (with a zero gradient there, fine-tuning would silently train the head alone)."""
    fake = copy.deepcopy(se_models[3])
    test = se_models[1]
    with_points = [key for key, q in residual_quantizers(fake).items() if q.kind in ("pool", "mul")]
    assert len(with_points) >= 4, with_points
    x = test[:32].clone().requires_grad_(True)
    fake(x).logsumexp(1).sum().backward()
    stem = fake.stem[0].weight.grad
    assert x.grad is not None and float(x.grad.abs().sum()) > 0 and stem is not None
    plain = quantize_model(se_models[2], "static", se_models[0], reduce_range=True)
    plain(test[:32]).logsumexp(1).sum().backward()
    cosine = torch.nn.functional.cosine_similarity(stem.flatten(), plain.stem[0].weight.grad.flatten(), dim=0)
    assert float(cosine) > 0.5, float(cosine)  # the same direction as without the residual points
