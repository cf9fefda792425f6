"""Edits of an exported ONNX graph that let onnxruntime fuse convolutions into integer kernels without changing what
the graph computes.

onnxruntime turns ``DequantizeLinear -> Conv -> QuantizeLinear`` into one ``QLinearConv``; in a fake-quantized
network the convolution's output is float and reaches the next layer's ``QuantizeLinear`` through ``Relu``,
``MaxPool``, a clip and reshapes. :func:`quantize_conv_outputs` copies that next ``QuantizeLinear`` /
``DequantizeLinear`` pair (same scale and zero point) right after the convolution. Every operator on the way is
monotone and maps points of the grid ``k * scale`` to points of it (the clips are at multiples of the scale), so
rounding to the grid first changes nothing the second rounding would not; the copy saturates at the stored type's
range, which holds the quantizer's narrower one. Only inputs stored as ``uint8`` in ``[0, 127]`` are handled (the
range onnxruntime's x86 kernels compute exactly on every CPU), and with ``full_range`` also full 8-bit ``uint8``
inputs with zero point 0 (an unsigned 8-bit quantizer after a ReLU; exact on VNNI hosts only), where onnxruntime
then chains ``QLinearConv`` -> ``QLinearConv`` with the ReLU folded into the output's saturation.
"""

from __future__ import annotations

from typing import Any

__all__ = ["quantize_conv_outputs"]

#: operators that commute with rounding to the grid of the following QuantizeLinear
_GRID_PRESERVING = {"Relu", "MaxPool", "Max", "Min", "Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze",
                    "Transpose"}


def _zero_point(graph: Any, node: Any, full_range: bool = False) -> Any:
    """The ``uint8`` zero-point tensor of a QuantizeLinear stored in ``[0, 127]`` (or, with ``full_range``, in
    ``[0, 255]`` with zero point 0), else ``None``."""
    from onnx import TensorProto, numpy_helper

    if len(node.input) < 3:
        return None
    name = node.input[2]
    tensor = next((t for t in graph.initializer if t.name == name), None)
    if tensor is None:
        tensor = next((n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.output[0] == name), None)
    if tensor is None or tensor.data_type != TensorProto.UINT8:
        return None
    zero = int(numpy_helper.to_array(tensor))
    clipped = any(n.op_type == "Min" and n.output[0] == node.input[0] for n in graph.node)
    return tensor if zero == 64 or (zero == 0 and (clipped or full_range)) else None


def quantize_conv_outputs(model: Any, full_range: bool = False) -> int:
    """Insert a copy of the next ``QuantizeLinear -> DequantizeLinear`` after each convolution that reaches it only
    through grid-preserving operators (in place); returns how many were inserted. ``full_range``: also before
    full 8-bit unsigned inputs (for hosts with VNNI)."""
    from onnx import helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    inserted = 0
    for node in list(graph.node):
        zero = _zero_point(graph, node, full_range) if node.op_type == "QuantizeLinear" else None
        if zero is None:
            continue
        current = producers.get(node.input[0])
        while current is not None and current.op_type in _GRID_PRESERVING:
            current = producers.get(current.input[0])
        if current is None or current.op_type != "Conv" or consumers.get(current.output[0], 0) != 1:
            continue
        source = current.output[0]
        quantized, restored, zero_name = f"{source}_q", f"{source}_qdq", f"{source}_zero_point"
        copy = graph.initializer.add()
        copy.CopyFrom(zero)
        copy.name = zero_name
        scale = node.input[1]  # an initializer (the input quantizer's scale buffer)
        q = helper.make_node("QuantizeLinear", [source, scale, zero_name], [quantized], name=f"{current.name}_Q")
        dq = helper.make_node("DequantizeLinear", [quantized, scale, zero_name], [restored], name=f"{current.name}_DQ")
        for other in graph.node:
            for index, name in enumerate(other.input):
                if name == source:
                    other.input[index] = restored
        position = list(graph.node).index(current) + 1
        graph.node.insert(position, dq)
        graph.node.insert(position, q)
        consumers[source] = 1
        inserted += 1
    return inserted
