"""Where an int8 graph stores tensors in 8 bits that a fake-quantized model keeps float (see
:mod:`~lightning_compress.quantization.residual`), found on a ``torch.fx`` trace.

The rules follow torch.ao's FX graph mode: a quantized layer is fused with the BatchNorm and the ReLU right after it
and its output is requantized, unless it reaches the model's output (then it computes in float); an addition is
quantized (with the ReLU after it); pooling, flattening, reshapes, dropout and ReLUs share the quantization of their
input (so does an eval-mode stochastic depth, which the export drops), and a concatenation quantizes its inputs at
its output's grid; sigmoid, hardsigmoid and tanh quantize their output with fixed parameters, and other activations
(hardswish, SiLU, GELU, ...) requantize theirs; a product of two quantized tensors is computed on their codes and
requantized (``quantized::mul``). A tensor so quantized whose value reaches only quantized layers (through ops that
keep its grid) needs nothing more: those layers' input quantizers round it alike, unless one is an output layer
(computed in float), whose input grid torch.ao would observe instead of taking the layer's.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from lightning_compress.quantization.bias_rounding import hook_bias_rounding
from lightning_compress.quantization.fx_ops import (
    ACTIVATION_CALLS,
    ACTIVATION_MODULES,
    ADD_CALLS,
    CAT_CALLS,
    CONTAINERS,
    FIXED,
    MUL_CALLS,
    NORM_CALLS,
    NORM_MODULES,
    POOL_MODULES,
    RELU_CALLS,
    RELU_MODULES,
    RESAMPLING_CALLS,
    RESAMPLING_MODULES,
    ROUNDING_CALLS,
    ROUNDING_MODULES,
    is_op,
    keeps_grid,
    module_of,
)
from lightning_compress.quantization.quantizers import is_quantized
from lightning_compress.quantization.residual import (
    INPUT,
    ResidualQuantizer,
    hook_residual_quantizer,
    remove_residual_quantizers,
)

__all__ = ["ModuleOutputTracer", "Point", "attach_bias_rounding", "attach_residual_quantizers", "find_points",
           "set_residual_quantizers"]

class ModuleOutputTracer(torch.fx.Tracer):
    """A ``torch.fx`` tracer that records, for each module call, the node of its output (:attr:`outputs`, innermost
    module first) and how often each module is called (:attr:`calls`). ``leaves``: more module types to keep as
    leaves (besides torch.nn's layers)."""

    def __init__(self, leaf: Any = None) -> None:
        super().__init__()
        self.leaf = leaf
        self.outputs: dict[torch.fx.Node, list[str]] = {}
        self.calls: Counter[str] = Counter()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (self.leaf is not None and self.leaf(m)) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        self.calls[name] += 1
        if isinstance(out, torch.fx.Proxy):
            self.outputs.setdefault(out.node, []).append(name)
        return out

    def module_node(self, name: str) -> torch.fx.Node | None:
        """The node of the output of module ``name`` when it is called once, else ``None``."""
        if self.calls[name] != 1:
            return None
        return next((node for node, names in self.outputs.items() if name in names), None)


@dataclass(frozen=True)
class Point:
    """A tensor to quantize: the output of ``module`` (or its first input); ``kind`` and ``consumers`` as in
    ``ResidualQuantizer``."""

    module: str
    kind: str
    consumers: tuple[str, ...]
    relu: bool
    fixed: tuple[float, int] | None = None
    operands: tuple[str, ...] = ()
    on_input: bool = False  # the first input of ``module`` instead (a tensor no module returns)

    @property
    def key(self) -> str:
        """Its key in :func:`~lightning_compress.quantization.residual.residual_quantizers`."""
        return self.module + INPUT if self.on_input else self.module


def _group_output(layer: torch.fx.Node, root: nn.Module) -> torch.fx.Node:
    """The layer's node followed by the BatchNorm and the ReLU torch.ao fuses into it."""
    node = layer
    for kinds, calls in (((nn.modules.batchnorm._BatchNorm,), ()), (RELU_MODULES, RELU_CALLS)):
        users = list(node.users)
        if len(users) == 1 and is_op(users[0], root, kinds, calls) and users[0].args[0] is node:
            node = users[0]
    return node


def _reach(value: torch.fx.Node, root: nn.Module,
           layers: set[str]) -> tuple[list[str], bool, bool, list[torch.fx.Node]]:
    """Follow a quantized value through the ops that share its quantization: ``(consuming layers, reaches another
    op, reaches the output, the ops passed that round again)``."""
    consumers: list[str] = []
    rounding: list[torch.fx.Node] = []
    other = output = False
    frontier, seen = [value], {value}
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            first = user.args[0] if user.args else None
            if user.op == "call_module" and user.target in layers and first is node:
                consumers.append(str(user.target))
            elif is_op(user, root, (), CAT_CALLS) and isinstance(first, (list, tuple)) and node in first:
                continue  # quantized at the concatenation's grid: the concatenation is a value of its own
            elif first is node and (keeps_grid(user, root) or is_op(user, root, ROUNDING_MODULES, ROUNDING_CALLS)):
                if is_op(user, root, ROUNDING_MODULES, ROUNDING_CALLS) and user not in rounding:
                    rounding.append(user)
                if user not in seen:
                    seen.add(user)
                    frontier.append(user)
            else:
                other, output = True, output or user.op == "output"
    return consumers, other, output, rounding


def _fixed_qparams(node: torch.fx.Node, root: nn.Module) -> tuple[float, int] | None:
    """The fixed output ``(scale, zero_point)`` torch.ao gives ``node``'s op, if any."""
    if node.op == "call_module":
        module = module_of(root, node)
        return next((v for k, v in FIXED.items() if isinstance(k, type) and isinstance(module, k)), None)
    if node.op in ("call_function", "call_method"):
        return next((v for k, v in FIXED.items() if not isinstance(k, type) and k == node.target), None)
    return None


def _float_inputs(graph: torch.fx.Graph, root: nn.Module, quantized: set[torch.fx.Node]) -> list[torch.fx.Node]:
    """Values computed in float (no quantized value seen back through ops that keep a grid) that an addition or a
    normalization reads: torch.ao quantizes them at a range of their own first (Swin's attention, called as a
    function, and the output of its patch merging's padding function, read by a LayerNorm)."""
    found: list[torch.fx.Node] = []
    for node in graph.nodes:
        if is_op(node, root, (), ADD_CALLS):
            operands = node.args[:2]
        elif is_op(node, root, NORM_MODULES, NORM_CALLS):
            operands = node.args[:1]
        else:
            continue
        for operand in operands:
            source = operand
            while isinstance(source, torch.fx.Node) and source not in quantized and source.args and (
                    keeps_grid(source, root) or is_op(source, root, ROUNDING_MODULES + RESAMPLING_MODULES,
                                                      ROUNDING_CALLS + RESAMPLING_CALLS)):
                source = source.args[0]  # ops that torch.ao computes on their input's grid
            computed = getattr(source, "op", None) in ("call_module", "call_function", "call_method")
            if computed and source not in quantized and source not in found:
                found.append(source)  # before the ops that keep its grid: there it is some module's output
    return found


def _hook_module(node: torch.fx.Node, root: nn.Module, tracer: ModuleOutputTracer) -> str | None:
    """The innermost module, called once and not a container, whose output is ``node`` (or, for a ReLU that is its
    input's only user, its input's: a quantizer with zero point 0 applies that ReLU itself); else that of the only
    op reading ``node`` if it keeps the grid (a permute back, as in torchvision's ``LayerNorm2d``)."""
    candidates = list(tracer.outputs.get(node, []))
    source = node.args[0] if node.args else None
    if (is_op(node, root, RELU_MODULES, RELU_CALLS) and isinstance(source, torch.fx.Node)
            and len(source.users) == 1):
        candidates += tracer.outputs.get(source, [])
    found = next((name for name in candidates if name and tracer.calls[name] == 1
                  and not isinstance(root.get_submodule(name), CONTAINERS)), None)
    users = list(node.users)
    if found is None and len(users) == 1 and users[0].args and users[0].args[0] is node and keeps_grid(users[0], root):
        return _hook_module(users[0], root, tracer)  # the same grid after a move (torchvision's LayerNorm2d)
    return found


def _first_reader(value: torch.fx.Node, root: nn.Module, tracer: ModuleOutputTracer,
                  order: dict[torch.fx.Node, int]) -> str | None:
    """The module called once (a leaf, not a container) that reads ``value`` as its first input before any other
    op reads it (``order``: each node's position in the graph), if any: a forward pre-hook on it can round ``value``
    in place for every reader."""
    first = min(value.users, key=order.__getitem__, default=None)
    if first is None or first.op != "call_module" or not first.args or first.args[0] is not value:
        return None
    name = str(first.target)
    return name if tracer.calls[name] == 1 and not isinstance(root.get_submodule(name), CONTAINERS) else None


def _grid_module(node: Any, grids: dict[torch.fx.Node, str], root: nn.Module) -> str | None:
    """The module whose residual quantizer gives ``node``'s value its grid, seen back through ops that keep it."""
    while isinstance(node, torch.fx.Node) and node not in grids:
        if not (node.args and keeps_grid(node, root)):
            return None
        node = node.args[0]
    return grids.get(node) if isinstance(node, torch.fx.Node) else None


def _describe(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r} (node {node.name!r})"


def _trace_quantized(model: nn.Module, what: str) -> tuple[ModuleOutputTracer, torch.fx.Graph, set[str]]:
    """``model`` traced with its quantized layers as leaves, and their names; a ``ValueError`` naming ``what``
    needs the trace when ``torch.fx`` fails."""
    tracer = ModuleOutputTracer(leaf=is_quantized)
    try:
        graph = tracer.trace(model)
    except Exception as error:
        raise ValueError(f"{what} traces the model with torch.fx, which fails on {type(model).__name__} "
                         f"({type(error).__name__}: {error})") from error
    return tracer, graph, {name for name, module in model.named_modules() if is_quantized(module)}


def find_points(model: nn.Module) -> tuple[list[Point], list[str]]:
    """The :class:`Point` s of ``model`` (quantized layers attached) and the descriptions of those that are no
    module's output (they cannot be hooked).

    Raises:
        ValueError: ``torch.fx`` cannot trace ``model``.
    """
    tracer, graph, layers = _trace_quantized(model, "residual_quantizers=True")
    values: list[tuple[torch.fx.Node, bool]] = []  # (quantized value, is a layer's output)
    fixed: dict[torch.fx.Node, tuple[float, int]] = {}
    products: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layers:
            values.append((_group_output(node, model), True))
        elif is_op(node, model, ACTIVATION_MODULES, CAT_CALLS + ACTIVATION_CALLS):
            values.append((node, False))
        elif (qparams := _fixed_qparams(node, model)) is not None and node.users:
            fixed[node] = qparams
            values.append((node, False))
        elif is_op(node, model, (), ADD_CALLS) and any(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            users = list(node.users)
            relu = len(users) == 1 and is_op(users[0], model, RELU_MODULES, RELU_CALLS)
            values.append((users[0] if relu else node, False))
        elif is_op(node, model, (), MUL_CALLS) and all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            products.add(node)
            values.append((node, False))
    values += [(operand, False) for operand in _float_inputs(graph, model, {value for value, _ in values})]
    points, unhookable, done = [], [], set()
    order = {node: index for index, node in enumerate(graph.nodes)}
    grids: dict[torch.fx.Node, str] = {}  # value -> the module whose quantizer gives its grid
    # output layers compute in float in the int8 graph, on an input whose grid torch.ao observes unless a point
    # gives it (MobileNetV3's classifier: hardswish -> dropout -> the last Linear)
    output_layers = {str(node.target) for node in graph.nodes
                     if node.op == "call_module" and node.target in layers and _reaches_output(node, layers)}
    for value, from_layer in values:
        consumers, other, output, rounding = _reach(value, model, layers)
        if from_layer and output:
            continue  # an output layer: torch.ao computes it in float, nothing is requantized
        if (consumers and not (other or rounding) and value not in fixed and value not in products
                and not output_layers.intersection(consumers)):
            continue  # only quantized layers read it, and they round it alike
        if not consumers and not other and value not in fixed:
            continue
        module = _hook_module(value, model, tracer)
        operands = tuple(_grid_module(arg, grids, model) for arg in value.args[:2]) if value in products else ()
        if value in products and (module is None or None in operands or module in done):
            continue  # a product of tensors without a known grid (or no module of its own) stays float
        # (not a concatenation: torch.ao shares one observer among its inputs and the concatenations reading them)
        reader = (_first_reader(value, model, tracer, order)
                  if module is None and value not in fixed and not is_op(value, model, (), CAT_CALLS) else None)
        if module is None and reader is None:
            unhookable.append(_describe(value))
            continue
        if (module or f"{reader}{INPUT}") in done:
            continue
        done.add(module or f"{reader}{INPUT}")
        relu = is_op(value, model, RELU_MODULES, RELU_CALLS)
        if module is None:  # rounded in place on its way into the module that reads it first
            points.append(Point(str(reader), "consumers" if consumers else "range", tuple(consumers), relu,
                                on_input=True))
        elif value in fixed:
            points.append(Point(module, "fixed", (), False, fixed[value]))
        elif value in products:
            points.append(Point(module, "mul", tuple(consumers), False, operands=operands))  # type: ignore[arg-type]
        else:
            points.append(Point(module, "consumers" if consumers else "range", tuple(consumers), relu))
        if module is not None:
            grids[value] = module
        for pool in rounding:  # averaged on the codes of this grid, as torch.ao's quantized pooling
            name = str(pool.target)
            if isinstance(module_of(model, pool), POOL_MODULES) and tracer.calls[name] == 1 and name not in done:
                done.add(name)
                points.append(Point(name, "pool", (points[-1].key if module is None else module,), False))
    return points, unhookable


def set_residual_quantizers(model: nn.Module, enabled: bool) -> dict[str, ResidualQuantizer]:
    """Fresh residual quantizers recording min / max (:func:`attach_residual_quantizers`) if ``enabled``, else none:
    those of an earlier quantization are removed, as their scales belong to it."""
    if enabled:
        return attach_residual_quantizers(model, calibrating=True)
    remove_residual_quantizers(model)
    return {}


def attach_residual_quantizers(model: nn.Module, calibrating: bool = False) -> dict[str, ResidualQuantizer]:
    """Trace ``model`` (with quantized layers attached) and put a fresh :class:`ResidualQuantizer` on every point
    the int8 graph stores in 8 bits (replacing earlier ones), recording min / max if ``calibrating`` (until
    :func:`finish_residual_quantizers`); returns ``{key: quantizer}`` (the module name, with ``":input"`` for a
    quantizer of its input). A point that is neither the output of a module called once nor first read by one
    stays float, with a warning naming the operation.

    Raises:
        ValueError: ``torch.fx`` cannot trace the model.
    """
    remove_residual_quantizers(model)
    points, unhookable = find_points(model)
    if unhookable:
        warnings.warn(f"residual_quantizers: the int8 graph stores {unhookable} in 8 bits, but no module called once "
                      "returns them or reads them first, so they stay float in the fake-quantized model (the int8 "
                      "model can differ there); return them from a module's forward to quantize them", stacklevel=3)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    attach_bias_rounding(model)
    attached = {}
    for point in points:
        quantizer = ResidualQuantizer(point.kind, point.consumers, point.relu, point.fixed, point.operands).to(device)
        quantizer.calibrating = calibrating
        hook_residual_quantizer(model.get_submodule(point.module), quantizer, point.on_input)
        attached[point.key] = quantizer
    return attached


def _reaches_output(layer: torch.fx.Node, layers: set[str]) -> bool:
    """Whether ``layer``'s output reaches the model's output without passing another quantized layer (torch.ao then
    computes the layer in float: no int32 bias)."""
    frontier, seen = list(layer.users), set()
    while frontier:
        user = frontier.pop()
        if user in seen or (user.op == "call_module" and user.target in layers):
            continue
        seen.add(user)
        if user.op == "output":
            return True
        frontier.extend(user.users)
    return False


def attach_bias_rounding(model: nn.Module) -> list[str]:
    """Hook a :class:`~lightning_compress.quantization.bias_rounding.BiasRounding` on every quantized layer that
    the int8 graph computes with an int32 bias (not an output layer), with the batch norm torch.ao folds into it
    (the layer's only reader); returns the names of the layers hooked.

    Raises:
        ValueError: ``torch.fx`` cannot trace ``model``.
    """
    tracer, graph, layers = _trace_quantized(model, "bias rounding")
    hooked = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers or tracer.calls[str(node.target)] != 1:
            continue
        if _reaches_output(node, layers):
            continue
        users = list(node.users)
        bn = None
        if (len(users) == 1 and is_op(users[0], model, (nn.modules.batchnorm._BatchNorm,), ())
                and users[0].args[0] is node and tracer.calls[str(users[0].target)] == 1):
            bn = model.get_submodule(str(users[0].target))
        layer = model.get_submodule(str(node.target))
        if bn is None and getattr(layer, "bias", None) is None:
            continue
        hook_bias_rounding(layer, bn)
        hooked.append(str(node.target))
    return hooked
