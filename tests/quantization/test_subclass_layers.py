"""Layers that subclass Conv2d / Linear only to construct themselves (Hugging Face's EfficientNetDepthwiseConv2d)
quantize, export and come back as their own class; a subclass with its own forward is refused by name; string
padding reaches torch.ao's int8 convolutions as integers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.export import export_int8
from lightning_compress.export.int8_graph import explicit_padding
from lightning_compress.quantization import quantize_model, quantized_layers, remove_quantizers


class DepthwiseConv(nn.Conv2d):
    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding="same", groups=channels, bias=False)


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding="valid"), nn.ReLU(), DepthwiseConv(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_a_construction_only_subclass_quantizes_exports_and_is_restored() -> None:
    x = torch.randn(16, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    quantized = quantize_model(_net(), "static", x, reduce_range=True)
    assert set(quantized_layers(quantized)) == {"0", "2", "6"}
    int8 = export_int8(quantized, x)  # string padding: "valid" -> 0, "same" -> 1
    assert int8.verification["agreement"] == 1.0 and int8.verification["relative_error"] < 0.02
    remove_quantizers(quantized)
    assert type(quantized[2]) is DepthwiseConv and not quantized_layers(quantized)
    with torch.no_grad():
        assert torch.equal(quantized(x), _net()(x))


def test_a_subclass_with_its_own_forward_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 2))
    with pytest.raises(ValueError, match=r"cannot quantize layers \{'1': 'ScaledLinear'\}.*keep their forward"):
        quantize_model(model, "static", torch.randn(4, 4))


def test_string_padding_becomes_the_integers_it_stands_for() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding="same", dilation=2), nn.Conv2d(2, 2, (1, 5), padding="same"),
                          nn.Conv2d(2, 2, 3, padding="valid"), nn.Conv2d(2, 2, 2, padding="same"))
    x = torch.randn(1, 2, 12, 12)
    with torch.no_grad():
        expected = model[:3](x)
        assert explicit_padding(model) == ["3"]  # an even kernel needs unequal padding: left and named
        assert [m.padding for m in model[:3]] == [(2, 2), (0, 2), (0, 0)]
        assert torch.equal(model[:3](x), expected)
