"""ConvNeXt-style blocks (Liu et al. 2022) in the int8 export: a LayerNorm over channels written as permute ->
``F.layer_norm`` -> permute (torchvision's ``LayerNorm2d``), ``torch.permute`` calls, and a per-channel
``layer_scale * x`` added to the residual stream. torch.ao stores the LayerNorm's output in 8 bits, requantizes
after a ``torch.permute`` (a function it does not list as sharing its input's grid) and quantizes the layer scale
itself to 8 bits per tensor; the fake-quantized model now rounds the LayerNorm's output where the int8 graph does,
and the export keeps the permutes and a flatten on their input's grid and computes the scaled sum in float, rounded
once at the addition's grid, as the fake-quantized model does. Swin-style: an addend computed in float (attention
through a layer's weight) is rounded at a range of its own in both, the functional layer stays float in both, and
an activation read through a dropout is stored at the next layer's step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.export.engines import exact_engines
from lightning_compress.export.int8 import export_int8
from lightning_compress.quantization import quantize_model
from lightning_compress.quantization.residual import ResidualQuantizer, hook_residual_quantizer, residual_quantizers
from lightning_compress.testing import digits_trained


class LayerNorm2d(nn.LayerNorm):
    """torchvision's: a LayerNorm over the channels of an NCHW tensor (traced through: not a torch.nn leaf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """depthwise 3x3 -> LayerNorm (channels last) -> Linear -> GELU -> Linear, times a learned per-channel scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.up, self.act, self.down = nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels)
        self.layer_scale = nn.Parameter(torch.linspace(0.05, 1.0, channels).reshape(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.down(self.act(self.up(self.norm(torch.permute(self.dwconv(x), (0, 2, 3, 1))))))
        return self.layer_scale * torch.permute(branch, (0, 3, 1, 2)) + x


class TinyConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 2, stride=2), LayerNorm2d(16))
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.LayerNorm(16), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@pytest.fixture(scope="module")
def convnext_models() -> tuple[list, torch.Tensor, nn.Module]:
    batches, test, model = digits_trained(TinyConvNeXt, 3)
    return batches, test, quantize_model(model, "static", batches, reduce_range=True, residual_quantizers=True)


def test_layernorm_outputs_that_reach_an_addition_get_a_point(convnext_models):
    kinds = {name: (q.kind, q.consumers) for name, q in residual_quantizers(convnext_models[2]).items()}
    # the stem's LayerNorm2d output feeds the first depthwise conv and the residual stream: stored once, at the
    # conv's input step, and hooked on the LayerNorm2d module (its F.layer_norm is followed by a permute back)
    assert kinds["stem.1"] == ("consumers", ("blocks.0.dwconv",))
    assert "blocks.0.norm" not in kinds  # read by the Linear only, which rounds it alike


@pytest.mark.parametrize("engine", list(torch.backends.quantized.supported_engines))
def test_int8_convnext_blocks_follow_the_fake_quantized_model(convnext_models, engine):
    batches, test, fake = convnext_models
    if engine not in exact_engines(127) or engine == "none":
        pytest.skip(f"{engine} cannot compute 7-bit activations exactly on this host")
    int8 = export_int8(fake, batches[0][0], engine=engine, check_inputs=test, min_agreement=None)
    graph = int8.model.graph
    assert not [node for node in graph.nodes if node.target is torch.ops.quantized.mul]  # layer_scale in float
    assert not [node for node in graph.nodes if node.target is torch.permute]  # x.permute: the input's grid
    assert not [node for node in graph.nodes if node.op == "call_module" and "head.1" in str(node.target)]
    check = int8.verification
    # measured (2026-12-06, x86 with VNNI), agreement / relative error on every engine: 1.000 / 0.0029-0.0033;
    # with the layer scale quantized (torch.ao's quantized::mul) 0.967 / 0.048, with torch.permute requantized
    # 0.957 / 0.056, with the stem's LayerNorm output left float in the fake-quantized model 0.962 / 0.056, with
    # the nn.Flatten requantized on a grid of its own 0.995 / 0.014
    assert check["agreement"] >= 0.995, (engine, check)
    assert check["relative_error"] <= 0.006, (engine, check)


class TokenMixer(nn.Module):
    """Swin-style: a projection called through its weight (left float by quantize_model) on softmaxed tokens."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.softmax(-1), self.proj.weight, self.proj.bias)


class Residual(nn.Module):
    def __init__(self, norm: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.norm, self.body = norm, body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(self.norm(x))


class TinyMixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 2, stride=2)
        self.mix = Residual(nn.LayerNorm(16), TokenMixer(16))
        self.mlp = Residual(nn.LayerNorm(16), nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1),
                                                           nn.Linear(32, 16)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(1), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.mlp(self.mix(tokens)).transpose(1, 2))


def test_float_addends_round_where_the_int8_addition_does_and_functional_layers_stay_float():
    batches, test, model = digits_trained(TinyMixer, 3)
    fake = quantize_model(model, "static", batches, reduce_range=True, residual_quantizers=True)
    assert residual_quantizers(fake)["mix.body"].kind == "range"  # the float projection's output, at its own range
    checks = {engine: export_int8(fake, batches[0][0], engine=engine, check_inputs=test, min_agreement=None)
              .verification for engine in exact_engines(127) if engine != "none"}
    # measured (2026-12-06, x86 with VNNI), agreement / relative error on every engine: 1.000 / 0.0000; without the
    # point (torch.ao rounds the addend on a range of its own) 0.986 / 0.020; with the F.linear quantized by
    # torch.ao (the fake-quantized model leaves it float) 0.991 / 0.017; with `x.flatten(2)` requantized 0.953 / 0.038;
    # with the GELU's output on a range of its own before the dropout (not the next layer's step) 0.967 / 0.033
    assert checks and all(c["agreement"] >= 0.995 and c["relative_error"] <= 0.005 for c in checks.values()), checks


class SwinStyleBlock(nn.Module):
    """Two residual additions in one forward: the first sum is no module's output (torchvision's Swin block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(channels), TokenMixer(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ShiftedNorm(nn.Module):
    """A LayerNorm on a tensor computed in float by an op torch.ao does not quantize (Swin's patch merging pads in a
    function): torch.ao quantizes the LayerNorm's input at a range of its own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(channels), nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(torch.roll(x, 1, 1)))


class TinySwin(TinyMixer):
    def __init__(self) -> None:
        super().__init__()
        self.mix, self.mlp = SwinStyleBlock(16), ShiftedNorm(16)


def test_tensors_no_module_returns_are_rounded_in_place_by_their_first_reader(tmp_path):
    batches, test, model = digits_trained(TinySwin, 3)
    fake = quantize_model(model, "static", batches, reduce_range=True, residual_quantizers=True)
    quantizers = residual_quantizers(fake)
    assert quantizers["mix.norm2:input"].kind == "range"  # x + mixer(...), read by norm2 and the second addition
    assert quantizers["mlp.norm:input"].kind == "range"  # torch.roll's output, read by the LayerNorm
    checks = {engine: export_int8(fake, batches[0][0], engine=engine, check_inputs=test, min_agreement=None)
              .verification for engine in exact_engines(127) if engine != "none"}
    # measured (2026-12-06, x86 with VNNI), agreement / relative error: 1.000 / 0.0004-0.0006; with the sum and the
    # rolled tensor left float in the fake-quantized model (no module returns them) 0.991 / 0.035
    assert checks and all(c["agreement"] >= 0.995 and c["relative_error"] <= 0.005 for c in checks.values()), checks
    pytest.importorskip("onnxruntime")
    from lightning_compress import export_onnx

    deployed = export_onnx(fake, batches[0][0], tmp_path / "swin.onnx", check_inputs=test, min_agreement=0.995)
    assert deployed["relative_error"] <= 0.005, deployed


def test_an_input_quantizer_rounds_in_place_only_where_that_is_safe():
    layer = nn.LayerNorm(4)
    quantizer = ResidualQuantizer("range", ())
    quantizer.set_qparams(0.5, 128)
    hook_residual_quantizer(layer, quantizer, on_input=True)
    x = torch.tensor([[0.3, 0.7, -0.2, 1.1]])
    rounded = torch.tensor([[0.5, 0.5, 0.0, 1.0]])
    expected = F.layer_norm(rounded, (4,), layer.weight, layer.bias)
    with torch.no_grad():
        fresh = x.clone()
        assert torch.allclose(layer(fresh), expected) and torch.equal(fresh, rounded)  # later readers see it rounded
        base = x.clone()
        assert torch.allclose(layer(base[:, :]), expected) and torch.equal(base, x)  # a view's base is left alone
    tracked = x.clone().requires_grad_(True) * 1
    assert torch.allclose(layer(tracked), expected) and torch.equal(tracked.detach(), x)  # autograd's tensor too
