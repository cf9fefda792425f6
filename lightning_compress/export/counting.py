"""Parameters, bytes and multiply-adds of an int8 model, counted from its packed weights.

``torch.utils.flop_counter`` counts nothing for ``torch.ao`` quantized modules and their ``parameters()`` is empty
(the weights are packed), so :func:`quantized_counts` reads the packed weights themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["quantized_counts"]


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)


def _packed_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    for name, module in model.named_modules():
        if hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            yield name, module


def _weight_packed_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    for name, module in model.named_modules():
        if callable(getattr(module, "payload_bytes", None)) and callable(getattr(module, "dequantized_weight", None)):
            yield name, module


def _packed_macs(module: Any, output: Any) -> int:
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, Tensor) or out.dim() == 0:
        return 0
    weight = module.weight()
    per_output = weight[0].numel()  # in_channels / groups * kernel, or in_features
    return int(out.numel() // max(out.shape[0], 1) * per_output) if out.dim() > 1 else int(out.numel() * per_output)


def quantized_counts(model: nn.Module, example_inputs: Any | None = None) -> dict[str, int]:
    """Parameters, bytes and multiply-adds of a model with ``torch.ao`` quantized (packed-weight) layers.

    Packed layers (quantized ``Conv*``, ``Linear``, their fused ``...ReLU`` variants) count their int8 weight
    elements and float bias from ``module.weight()`` / ``module.bias()``; the weight-only packed layers of
    :func:`~lightning_compress.quantization.packed.export_packed` count their original weight elements and their
    packed payload (codes and decoding table; their float bias counts as a float parameter); float parameters
    elsewhere count as usual. Multiply-adds are for ONE sample (like
    :func:`lightning_compress.measure.count_macs`): the packed layers from their output shapes (forward hooks), the
    float rest from ``torch.utils.flop_counter``.

    Returns:
        ``{"parameters", "quantized_parameters", "nonzero_parameters", "weight_bytes", "macs"}`` (non-zero:
        integer weights other than their zero point, e.g. pruned entries stay pruned); ``weight_bytes`` is the payload
        (1 byte per int8 weight, 4 per float bias, scale and zero point per channel, 4 bytes per float
        parameter); ``macs`` is 0 without ``example_inputs``.
    """
    quantized = bytes_ = nonzero = 0
    for _, module in _packed_layers(model):
        weight, bias = module.weight(), module.bias()
        quantized += weight.numel() + (bias.numel() if bias is not None else 0)
        nonzero += int(torch.count_nonzero(weight.int_repr() - weight.q_per_channel_zero_points().view(
            -1, *([1] * (weight.dim() - 1))) if weight.qscheme() in _PER_CHANNEL else weight.int_repr()
            - weight.q_zero_point()))
        nonzero += int(torch.count_nonzero(bias)) if bias is not None else 0
        bytes_ += weight.numel() * weight.element_size() + (bias.numel() * 4 if bias is not None else 0)
        bytes_ += 8 * weight.shape[0] if weight.qscheme() in _PER_CHANNEL else 8
    for _, module in _weight_packed_layers(model):  # packed low-bit layers (packed.py): bias is a float parameter
        quantized += module.weight_numel()
        nonzero += int(torch.count_nonzero(module.dequantized_weight()))
        bytes_ += module.payload_bytes()
    floats = sum(p.numel() for p in model.parameters())
    counts = {"parameters": quantized + floats, "quantized_parameters": quantized,
              "nonzero_parameters": nonzero + sum(int(torch.count_nonzero(p.detach())) for p in model.parameters()),
              "weight_bytes": bytes_ + 4 * floats, "macs": 0}
    if example_inputs is None:
        return counts
    packed_macs: list[int] = []
    handles = [m.register_forward_hook(lambda mod, _i, out: packed_macs.append(_packed_macs(mod, out)))
               for _, m in _packed_layers(model)]
    args = tuple(a[:1] if isinstance(a, Tensor) else a for a in _as_args(example_inputs))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    counts["macs"] = sum(packed_macs) + counter.get_total_flops() // 2
    return counts
