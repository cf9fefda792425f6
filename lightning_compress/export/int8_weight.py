"""Layers that keep an int8 weight with a float scale per output channel and compute in float (TorchScript-able).

The int8 export uses them for its output layers: the logits are computed from the quantized input and the integer
weight exactly as the fake-quantized layer computes them, instead of being requantized to a range observed on
example inputs. ``weight = int8 * scale`` (per output channel), then the float op.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Int8WeightConv1d", "Int8WeightConv2d", "Int8WeightLinear", "int8_weight_layer"]


class _Int8Weight(nn.Module):
    """Buffers ``weight_int8`` (int8) and ``scale`` (float32 per output channel); the float ``bias`` parameter."""

    weight_int8: Tensor
    scale: Tensor

    def _store(self, weight: Tensor, bias: Tensor | None, amax: Tensor, qmax: int) -> None:
        scale = (amax.detach().float().reshape(-1).expand(weight.shape[0]) / qmax).clamp_min(1e-12)
        view = scale.view(-1, *([1] * (weight.dim() - 1))).to(weight.device)
        codes = torch.round(weight.detach().float() / view).clamp(-qmax, qmax)
        self.register_buffer("weight_int8", codes.to(torch.int8))
        self.register_buffer("scale", scale.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def dequantized_weight(self) -> Tensor:
        """The float weight the layer computes with."""
        shape = [-1] + [1] * (self.weight_int8.dim() - 1)
        return self.weight_int8.float() * self.scale.view(shape)

    def weight_numel(self) -> int:
        return self.weight_int8.numel()

    def payload_bytes(self) -> int:
        """One byte per weight and four per channel scale (the bias counts as a float parameter)."""
        return self.weight_int8.numel() + 4 * self.scale.numel()


class Int8WeightLinear(_Int8Weight):
    """``nn.Linear`` with an int8 weight."""

    def __init__(self, layer: nn.Linear, amax: Tensor, qmax: int = 127) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._store(layer.weight, layer.bias, amax, qmax)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


class Int8WeightConv1d(_Int8Weight):
    """``nn.Conv1d`` (zero padding) with an int8 weight."""

    def __init__(self, layer: nn.Conv1d, amax: Tensor, qmax: int = 127) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation = layer.stride[0], layer.padding[0], layer.dilation[0]
        self.groups = layer.groups
        self._store(layer.weight, layer.bias, amax, qmax)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class Int8WeightConv2d(_Int8Weight):
    """``nn.Conv2d`` (zero padding) with an int8 weight."""

    def __init__(self, layer: nn.Conv2d, amax: Tensor, qmax: int = 127) -> None:
        super().__init__()
        self.stride: list[int] = list(layer.stride)
        self.padding: list[int] = list(layer.padding)  # type: ignore[arg-type]
        self.dilation: list[int] = list(layer.dilation)
        self.groups = layer.groups
        self._store(layer.weight, layer.bias, amax, qmax)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


_CLASSES: dict[type, type] = {nn.Linear: Int8WeightLinear, nn.Conv1d: Int8WeightConv1d, nn.Conv2d: Int8WeightConv2d}


def int8_weight_layer(layer: nn.Module, amax: Tensor, qmax: int = 127) -> nn.Module:
    """The int8-weight version of a ``Linear`` / ``Conv1d`` / ``Conv2d`` (zero padding) with per-channel ``amax``.

    Raises:
        ValueError: another layer type, or a convolution with a padding mode other than zeros or string padding.
    """
    kind = _CLASSES.get(type(layer))
    if kind is None or getattr(layer, "padding_mode", "zeros") != "zeros" or isinstance(
            getattr(layer, "padding", 0), str):
        raise ValueError(f"{type(layer).__name__} cannot keep an int8 weight here (Linear, Conv1d, Conv2d with zero "
                         "numeric padding only)")
    return kind(layer, amax, qmax).train(False)
