"""Whether the int8 kernels computed each quantized layer exactly: output codes against integer arithmetic.

An int8 model's agreement with the fake-quantized model mixes two causes. A kernel can compute wrong codes (16-bit
pair sums that saturate on a CPU without VNNI, a wrong scale). Or the network amplifies the float rounding every
engine is allowed: a code whose exact value lies within about 1e-6 of a rounding tie may go either way, and in a
network with squeeze-excitation gates one such code can move whole channels and flip predictions. Only the first is
an export error, so this check separates them.

For every static int8 ``Conv1d/2d/3d`` / ``Linear`` (and their fused ReLU forms) it recomputes the output codes from
the layer's actual quantized input and weight: the integer accumulation exact in float64, the float bias, then
round half to even at the output step (Jacob et al., 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", eq. 7). A code that differs from the kernel's is *near a tie* when the
exact value lies within float32 rounding (plus half a step of an int32 bias) of ``.5``, else *wrong*.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.export.engines import host_summary
from lightning_compress.export.verify import Int8MismatchError

__all__ = ["CHECKED_LAYERS", "check_kernel", "kernel_exactness", "layer_code_errors"]

#: the int8 layers whose codes are recomputed (one input; the ReLU forms clamp at the zero point)
CHECKED_LAYERS: tuple[type[nn.Module], ...] = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nniq.ConvReLU1d, nniq.ConvReLU2d,
                                               nniq.ConvReLU3d, nnq.Linear, nniq.LinearReLU)
_RELU = (nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d, nniq.LinearReLU)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: relative float32 rounding of the requantization (a few operations of eps 1.2e-7 each)
FLOAT_ROUNDING = 1e-6


def _integer_weight(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """The weight as float64 integers (zero points removed) and its per-output-channel scales."""
    weight = cast(Any, layer).weight()  # the int8 modules return their packed weight from a method
    codes = weight.int_repr().double()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales = weight.q_per_channel_scales().double()
        zeros = weight.q_per_channel_zero_points().double()
    else:
        scales = torch.full((codes.shape[0],), weight.q_scale(), dtype=torch.double)
        zeros = torch.full_like(scales, weight.q_zero_point())
    return codes - zeros.view(-1, *([1] * (codes.dim() - 1))), scales


def _accumulate(layer: nn.Module, codes: Tensor, weight: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The exact integer accumulator and the shape that broadcasts a per-channel vector onto it."""
    if isinstance(layer, nnq.Linear):
        return F.linear(codes, weight), (-1,)
    conv: Any = _CONV[weight.dim() - 2]
    settings = cast(Any, layer)
    return conv(codes, weight, None, settings.stride, settings.padding, settings.dilation, settings.groups), \
        (-1,) + (1,) * (weight.dim() - 2)


def layer_code_errors(layer: nn.Module, quantized_input: Tensor, output: Tensor) -> dict[str, float]:
    """Compare one int8 layer's output codes with exact integer arithmetic: codes compared, codes that differ near
    a rounding tie, codes that differ otherwise (``wrong``), and the largest code difference."""
    weight, weight_scales = _integer_weight(layer)
    codes = quantized_input.int_repr().double() - quantized_input.q_zero_point()
    accumulator, shape = _accumulate(layer, codes, weight)
    multiplier = (quantized_input.q_scale() * weight_scales / output.q_scale()).view(shape)
    scaled = accumulator * multiplier
    bias = cast(Any, layer).bias()
    exact = scaled + (bias.double().view(shape) / output.q_scale() if bias is not None else 0.0)
    zero = output.q_zero_point()
    info = torch.iinfo(output.int_repr().dtype)
    low = zero if isinstance(layer, _RELU) else info.min
    reference = (torch.round(exact) + zero).clamp(low, info.max)
    got = output.int_repr().double()
    differs = reference != got
    fraction = exact - torch.floor(exact)
    allowed = FLOAT_ROUNDING * (scaled.abs() + exact.abs() + abs(zero) + 1) + 0.5 * multiplier.abs()
    near_tie = differs & ((fraction - 0.5).abs() <= allowed) & ((reference - got).abs() <= 1)
    return {"codes": differs.numel(), "near_tie": int(near_tie.sum()), "wrong": int((differs & ~near_tie).sum()),
            "max_code_difference": float((reference - got).abs().max()) if differs.any() else 0.0}


def _checkable(layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> bool:
    """One per-tensor quantized input, a quantized output, zero padding."""
    return (len(inputs) == 1 and isinstance(output, Tensor) and output.is_quantized and inputs[0].is_quantized
            and inputs[0].qscheme() == torch.per_tensor_affine and getattr(layer, "padding_mode", "zeros") == "zeros")


@torch.no_grad()
def kernel_exactness(model: nn.Module, args: tuple[Any, ...], samples: int = 4) -> dict[str, Any]:
    """Run the int8 ``model`` (under the engine it was converted for) on ``args`` and check the codes of every
    layer in :data:`CHECKED_LAYERS` on the first ``samples`` samples (:func:`layer_code_errors`).

    Returns ``layers`` (checked), ``codes``, ``near_tie``, ``wrong``, ``max_code_difference`` and ``worst`` (the
    layer with the most wrong codes, or ``None``).
    """
    per_layer: dict[str, dict[str, float]] = {}

    def check(name: str, layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not _checkable(layer, inputs, output):
            return
        result = layer_code_errors(layer, inputs[0][:samples], output[:samples])
        if name in per_layer:  # a layer called more than once
            before = per_layer[name]
            result = {**{k: before[k] + result[k] for k in ("codes", "near_tie", "wrong")},
                      "max_code_difference": max(before["max_code_difference"], result["max_code_difference"])}
        per_layer[name] = result

    hooks = [module.register_forward_hook(lambda layer, i, o, name=name: check(name, layer, i, o))
             for name, module in model.named_modules() if type(module) in CHECKED_LAYERS]
    try:
        model(*args)
    finally:
        for hook in hooks:
            hook.remove()
    totals = {key: sum(r[key] for r in per_layer.values()) for key in ("codes", "near_tie", "wrong")}
    worst = max(per_layer, key=lambda name: per_layer[name]["wrong"], default=None)
    return {"layers": len(per_layer), **totals,
            "max_code_difference": max((r["max_code_difference"] for r in per_layer.values()), default=0.0),
            "worst": worst if worst is not None and per_layer[worst]["wrong"] else None}


def check_kernel(result: dict[str, Any], engine: str) -> None:
    """Raise :class:`~lightning_compress.export.verify.Int8MismatchError` when :func:`kernel_exactness` found
    wrong codes: the engine does not compute this model exactly on this CPU, whatever the agreement says."""
    if result["wrong"]:
        summary = host_summary()
        raise Int8MismatchError(
            f"the {engine!r} int8 kernels computed {result['wrong']} of {result['codes']} output codes differently "
            f"from integer arithmetic (by up to {result['max_code_difference']:.0f}; most in layer "
            f"{result['worst']!r}) on this {summary['capability']} CPU (VNNI: {summary['vnni']}). Use "
            "engine='qnnpack', or quantize with reduce_range=True (7-bit activations); min_agreement=None keeps "
            "the model anyway")
