"""Layers called through their weights (Swin's F.linear on qkv.weight, MultiheadAttention's out_proj): found by
the trace, left float with a reason by post-training quantization, and NonDynamicallyQuantizableLinear quantized
where it is called as a layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_compress.graph import called_through_weights, trace
from lightning_compress.quantization import quantize_model


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.attn = nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = NonDynamicallyQuantizableLinear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.qkv.weight, self.qkv.bias)
        y, _ = self.attn(y, y, y)
        return self.out(y).mean(1)


def test_layers_called_through_their_weights_are_found_and_left_float_with_a_reason() -> None:
    model, x = Attention().eval(), torch.randn(4, 5, 8)
    assert called_through_weights(model, trace(model, x)) == {"qkv": "linear", "attn.out_proj": "MultiheadAttention"}
    with pytest.warns(UserWarning, match=r"\['attn.out_proj', 'qkv'\] in float: its forward never ran"):
        quantized = quantize_model(model, "static", x)
    assert type(quantized.qkv) is nn.Linear and type(quantized.attn.out_proj) is NonDynamicallyQuantizableLinear
    assert type(quantized.out).__name__ == "QuantNonDynamicallyQuantizableLinear"
    assert float(quantized.out.input_quantizer.amax) > 0
    with torch.no_grad():
        reference, out = model(x), quantized(x)
    assert float((out - reference).norm() / reference.norm()) < 0.05
