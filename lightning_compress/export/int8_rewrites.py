"""Graph rewrites that make torch.ao's int8 graph compute what the fake-quantized model computes where torch.ao would
round once more: before ``prepare_fx`` (:func:`shared_grid_calls`) and after ``convert_fx``
(:func:`constant_products_in_float`). Used by :func:`lightning_compress.export.int8.export_int8`."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from lightning_compress.quantization.fx_ops import is_inference_identity

__all__ = ["constant_products_in_float", "shared_grid_calls"]

#: functions torch.ao does not list as sharing their input's quantization, and the tensor method it does list
_AS_METHODS = {torch.permute: "permute", torch.reshape: "reshape"}
#: and the other way round
_AS_FUNCTIONS = {"flatten": torch.flatten}


def shared_grid_calls(traced: torch.fx.GraphModule) -> None:
    """Remove the eval-mode stochastic depths (:func:`~lightning_compress.quantization.fx_ops.is_inference_identity`),
    call ``torch.permute`` / ``torch.reshape`` as tensor methods, and ``x.flatten(...)``
    and an ``nn.Flatten`` as ``torch.flatten``. torch.ao lists none of them as sharing its input's quantization: it
    would run each in float between a dequantize and a requantize on a grid of its own (an observer of the output's
    range), a second rounding the fake-quantized model does not have (EfficientNet, ConvNeXt, Swin; ``nn.Flatten``
    before a classifier)."""
    changed = False
    for node in list(traced.graph.nodes):
        if is_inference_identity(node):
            node.replace_all_uses_with(node.args[0])
            traced.graph.erase_node(node)
            changed = True
        elif node.op == "call_function" and node.target in _AS_METHODS:
            node.op, node.target, changed = "call_method", _AS_METHODS[node.target], True
        elif node.op == "call_method" and node.target in _AS_FUNCTIONS:
            node.op, node.target, changed = "call_function", _AS_FUNCTIONS[str(node.target)], True
        elif node.op == "call_module" and type(flatten := traced.get_submodule(str(node.target))) is nn.Flatten:
            node.op, node.target, changed = "call_function", torch.flatten, True
            node.args = (node.args[0], flatten.start_dim, flatten.end_dim)
    if changed:
        traced.recompile()


def _quantized_constant(node: Any) -> bool:
    """Whether ``node`` quantizes a parameter or buffer of the model (``quantize_per_tensor(get_attr, ...)``)."""
    return (getattr(node, "op", None) == "call_function" and node.target is torch.quantize_per_tensor
            and getattr(node.args[0], "op", None) == "get_attr")


def constant_products_in_float(converted: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A ``quantized::mul`` by a constant (ConvNeXt's ``layer_scale * x``: torch.ao quantizes the parameter per
    tensor to 8 bits and rounds the product on a grid of its own) as the float product of the parameter and the
    dequantized tensor, which the fake-quantized model computes; where its only reader is a ``quantized::add``, the
    sum in float too, rounded once at the addition's grid (the residual quantizer of the addition)."""
    graph = converted.graph
    changed = False
    for mul in list(graph.nodes):
        if not (mul.op == "call_function" and mul.target is torch.ops.quantized.mul):
            continue
        constants = [arg for arg in mul.args[:2] if _quantized_constant(arg)]
        if len(constants) != 1:
            continue
        constant = constants[0]
        tensor = mul.args[1] if mul.args[0] is constant else mul.args[0]
        with graph.inserting_before(mul):
            product = graph.call_function(operator.mul, (constant.args[0], graph.call_method("dequantize", (tensor,))))
        readers = list(mul.users)
        rounded, grid = mul, mul.args[2:4]
        if len(readers) == 1 and readers[0].target is torch.ops.quantized.add and readers[0].args[:2].count(mul) == 1:
            rounded = readers[0]
            other = rounded.args[1] if rounded.args[0] is mul else rounded.args[0]
            grid = rounded.args[2:4]
            with graph.inserting_before(rounded):
                product = graph.call_function(operator.add, (product, graph.call_method("dequantize", (other,))))
        with graph.inserting_before(rounded):
            quantized = graph.call_function(torch.quantize_per_tensor, (product, *grid, torch.quint8))
        rounded.replace_all_uses_with(quantized)
        for node in dict.fromkeys((rounded, mul, constant)):
            if not node.users:
                graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        converted.recompile()
    return converted
