"""Bias rounding: the int32 bias of integer-arithmetic inference, simulated in the fake-quantized model.

An int8 convolution or linear layer accumulates ``sum(x_q * w_q)`` in int32, with ``x_q`` at the input step ``s_x``
and ``w_q`` at the weight step ``s_w[c]`` of output channel ``c``. Integer-only inference (Jacob et al. 2018,
section 2.4) stores the bias as int32 at the accumulator's step, ``round(b / (s_x * s_w[c]))``; torch's ``qnnpack``
kernels do so, with the batch norm folded into the layer (bias ``b[c] = beta + a[c] * (b_conv[c] - mu[c])``,
weight step ``s_w[c] * |a[c]|``, ``a = gamma / sqrt(var + eps)``). The ``x86`` / ``fbgemm`` / ``onednn`` kernels add
the float bias instead. A fake-quantized model that keeps the bias in float therefore differs from a ``qnnpack``
model by up to half an accumulator step per channel, which flips output codes near rounding ties (0.1-0.6% of the
codes of a MobileNetV3's layers, 10-25x as many in its depthwise convolutions, where few products make a coarse
accumulator step), and a deep network amplifies the flips.

A :class:`BiasRounding` forward hook on a quantized layer adds, to its output (before its batch norm), the constant
per-channel shift that moves the folded bias onto that grid: the fake-quantized model then computes what every
engine computes once the export (:func:`rounded_biases`) stores the rounded bias, which the float-bias engines use
as is and ``qnnpack`` re-quantizes exactly. ``quantize_model(..., residual_quantizers=True)`` attaches them (with
the other int8-graph simulations of :mod:`~lightning_compress.quantization.residual`); they hold no state (the shift
follows the layer's current scales and the batch norm's current statistics), so the state dict is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BiasRounding", "bias_shift", "has_bias_rounding", "hook_bias_rounding", "remove_bias_rounding",
           "rounded_biases"]


def _bn_affine(bn: Any, channels: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, beta, mu)`` of an eval-mode batch norm (ones / zeros without affine parameters)."""
    var, mean = bn.running_var.detach().to(like), bn.running_mean.detach().to(like)
    gamma = bn.weight.detach().to(like) if bn.weight is not None else torch.ones(channels).to(like)
    beta = bn.bias.detach().to(like) if bn.bias is not None else torch.zeros(channels).to(like)
    return gamma / torch.sqrt(var + bn.eps), beta, mean


@torch.no_grad()
def bias_shift(layer: Any, bn: nn.Module | None) -> Tensor | None:
    """The per-channel constant to add to ``layer``'s output (before ``bn``) so that the bias of the folded layer
    lies on its int32 accumulator grid ``s_x * s_w[c] * |a[c]|`` (rounded half to even); ``None`` when the layer has
    no bias to round (no bias and no batch norm) or no static input step.

    >>> from lightning_compress.quantization import quantize_model
    >>> layer = quantize_model(nn.Sequential(nn.Linear(4, 2)), "static", torch.randn(16, 4))[0]
    >>> shift = bias_shift(layer, None)
    >>> step = layer.input_quantizer.amax / 127 * layer.weight_quantizer.amax / 127
    >>> bool(((layer.bias + shift) / step - torch.round(layer.bias / step)).abs().max() < 1e-3)
    True
    """
    inq, wq = layer.input_quantizer, layer.weight_quantizer
    if not inq.enabled or inq.calibrating or inq.dynamic or not wq.enabled:
        return None
    channels = layer.weight.shape[0]
    like = layer.weight.detach().double()
    x_step = inq.current_amax().detach().double().reshape(()) / inq.qmax
    w_step = (wq.current_amax(layer.weight).detach().double().reshape(-1) / wq.qmax).expand(channels)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(channels, dtype=torch.double)
    if bn is None:
        if layer.bias is None:
            return None
        factor, folded = torch.ones_like(bias), bias
    else:
        factor, beta, mean = _bn_affine(bn, channels, like)
        folded = beta + factor * (bias - mean)
    step = x_step * w_step * factor.abs()
    usable = (step > 0) & (factor != 0)
    safe = torch.where(usable, step, torch.ones_like(step))
    delta = torch.where(usable, torch.round(folded / safe) * safe - folded, torch.zeros_like(step))
    shift = delta / torch.where(usable, factor, torch.ones_like(factor))
    return shift.to(layer.weight.dtype)


class BiasRounding:
    """The forward hook that adds :func:`bias_shift` to a quantized layer's output (picklable; ``bn``: the batch
    norm torch.ao folds into the layer, or ``None``)."""

    def __init__(self, bn: nn.Module | None = None) -> None:
        self.bn = bn

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        shift = bias_shift(module, self.bn)
        if shift is None or not isinstance(output, Tensor):
            return output
        view = [1] * output.dim()
        view[1 if output.dim() > 2 and not isinstance(module, nn.Linear) else -1] = -1
        return output + shift.to(output.device).view(view)


def _hooks(module: nn.Module) -> list[Any]:
    return [key for key, hook in module._forward_hooks.items() if isinstance(hook, BiasRounding)]


def hook_bias_rounding(layer: nn.Module, bn: nn.Module | None) -> None:
    """Attach a :class:`BiasRounding` to ``layer`` (replacing an earlier one)."""
    for key in _hooks(layer):
        del layer._forward_hooks[key]
    layer.register_forward_hook(BiasRounding(bn), prepend=True)  # before a residual quantizer on the same layer


def has_bias_rounding(layer: nn.Module) -> BiasRounding | None:
    """The :class:`BiasRounding` hook of ``layer``, if any."""
    hook = layer._forward_hooks[_hooks(layer)[0]] if _hooks(layer) else None
    return hook if isinstance(hook, BiasRounding) else None


def remove_bias_rounding(model: nn.Module) -> list[str]:
    """Delete every :class:`BiasRounding` hook of ``model``; returns the names of the layers that had one."""
    names = []
    for name, module in model.named_modules():
        keys = _hooks(module)
        for key in keys:
            del module._forward_hooks[key]
        if keys:
            names.append(name)
    return names


@torch.no_grad()
def rounded_biases(model: nn.Module) -> list[str]:
    """For an export: give every layer of ``model`` with a :class:`BiasRounding` hook the bias plus its shift (a
    bias of zeros where it had none) and remove the hook, so that the layer folded with its batch norm carries the
    rounded bias (the float-bias kernels then compute what the fake-quantized model computes, and ``qnnpack``'s
    int32 re-quantization of it is exact). Call it before the quantizers are removed; returns the layers changed."""
    changed = []
    for name, module in model.named_modules():
        hook = has_bias_rounding(module)
        if hook is None:
            continue
        layer: Any = module
        shift = bias_shift(layer, hook.bn)
        if shift is not None:
            if layer.bias is None:
                layer.bias = nn.Parameter(shift.clone())
            else:
                layer.bias.add_(shift)
            changed.append(name)
        for key in _hooks(module):
            del module._forward_hooks[key]
    return changed
