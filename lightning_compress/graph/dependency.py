"""Channel dependency analysis: which channels of which layers must shrink together (DepGraph, Fang et al. 2023).

Every channel of every traced tensor is a *channel variable*; a tensor knows which of its dimensions index its
channels (dimension 1, the last one after a channels-last ``permute``, several after a channel-shuffle ``view``).
Producers (conv, linear, ``F.linear`` on a ``Linear``'s own parameters) create fresh variables; BatchNorm,
activations, pooling, stochastic depth, depthwise convolutions and pure moves (view, reshape, permute, flatten, ...,
see :mod:`~lightning_compress.graph.channel_moves`) carry them; elementwise ops of traced tensors (residual
additions, squeeze-excitation products) unite them position by position; a grouped convolution with as many inputs as
outputs ties input ``i`` to output ``i``; concatenation along channels appends. Distinct channels that may only go
together (the same position in every group of a channel shuffle's ``view``) and the pieces of an equal ``chunk`` or
``split`` (which must lose equally many channels) are constraints beside the union, kept per group in
:class:`~lightning_compress.graph.channel_ties.ChannelTies`. Stateless modules are followed call by call (a ReLU
reused across a ResNet block); a module with state called twice ties its calls and is blocked. A union-find turns
united variables into one channel.

Alongside, each tensor channel carries its *value* when it is provably constant over batch and positions
(``nan`` otherwise): a zero filter gives its bias, eval-mode BatchNorm gives ``beta - gamma * mu / sigma`` for a
constant input, activations map constants to constants. A channel may be removed only where every consumer reads
it as zero or as a constant that folds exactly into the consumer's bias (always for ``Linear``; for convolutions
only without padding, since zero padding makes a constant channel's contribution vary at the borders).

A LayerNorm module over the channel dimension carries its channels and records their constant inputs (removed
channels stay in its statistics, see :mod:`~lightning_compress.graph.layernorm`). Channels are blocked (kept) where
they meet something the analysis does not model, with the reason in the group's ``blocked``: the model's inputs and
outputs, other norms over channels (GroupNorm, ``F.layer_norm`` outside a LayerNorm module: removing a channel changes
the others' statistics), transposed or other grouped convolutions, slices at fixed channel positions, reductions over
channels and any unknown operation. Not detected: control flow on channel counts, parameters shared between layers.

>>> import torch.nn.functional as F
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 2)
...     def forward(self, x):
...         return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1), 1))
>>> groups = filter_groups(Net(), torch.randn(2, 1, 5, 5))
>>> [(g.producers, g.consumers, g.blocked) for g in groups]
[({'conv': [0, 1, 2, 3]}, {'fc': [[0], [1], [2], [3]]}, []), ({'fc': [0, 1]}, {}, ['model output'])]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.graph.channel_groups import ChannelGroup, ChannelInfo, collect_groups
from lightning_compress.graph.channel_moves import MOVES, moved_channels
from lightning_compress.graph.channel_ops import (
    CONCATS,
    ELEMENTWISE,
    REDUCTIONS,
    bn_affine,
    has_padding,
    has_state,
    keeps_batch_and_channels,
    nan_values,
    unpadded,
)
from lightning_compress.graph.channel_routes import attach_routes
from lightning_compress.graph.channel_ties import group_ties
from lightning_compress.graph.channel_vars import ChannelVariables
from lightning_compress.graph.layernorm import visit_layernorm
from lightning_compress.graph.tracing import Call, Trace, eval_mode, tensors_in, trace

__all__ = ["ChannelGroup", "DependencyGraph", "build_graph", "filter_groups"]


class DependencyGraph(ChannelVariables):
    """The result of :func:`build_graph`: channel variables, their members, reads, values and blocks."""

    def __init__(self, model: nn.Module, recorded: Trace) -> None:
        super().__init__()
        self.model, self.trace = model, recorded
        self.calls_per_module: dict[str, int] = {}
        self.grouped: dict[str, tuple[int, int]] = {}  # grouped convolution -> (groups, channels)
        self.parameter_owner = {id(p): name for name, p in model.named_parameters()}
        self.modules = dict(model.named_modules())
        for call in recorded.calls:
            if call.module is not None:
                self.calls_per_module[call.name] = self.calls_per_module.get(call.name, 0) + 1
        for x in recorded.inputs:
            self._set(x, self._fresh(x.shape[1] if x.dim() >= 2 else 0, "model input"), nan_values(x))
        for call in recorded.calls:
            self._visit(call)
        for x in recorded.outputs:
            self._block(self._get(x), "model output")

    def groups(self, merged: dict[int, ChannelInfo] | None = None) -> list[ChannelGroup]:
        """Channel groups: connected sets of producers (and what they tie), in order of first appearance
        (``merged``: :meth:`merged`, when the caller has it already)."""
        ties = {(a, b) for a, b in ((self.find(a), self.find(b)) for a, b in self.ties) if a != b}
        balances = [([self.find(v) for v in first], [self.find(v) for v in second]) for first, second in self.balances]
        links = [list(pair) for pair in ties] + [first + second for first, second in balances]
        groups = collect_groups(self.merged() if merged is None else merged, links)
        for group in groups:
            convs = [name for name in group.producers if name in self.grouped]
            if convs:
                width = self.grouped[convs[0]][1] // self.grouped[convs[0]][0]  # channels per conv group
                indices = [i for i in group.producers[convs[0]] if i is not None]
                if len(indices) == group.size:
                    group.segments = [(i // width, i % width) for i in indices]
            group.ties = group_ties(group, ties, balances, self.grouped)
            attach_routes(self, group)
        return groups

    def _opaque(self, call: Call, reason: str) -> None:
        inputs = [(x, t) for x in tensors_in((call.args, call.kwargs)) if (t := self._get(x)) is not None]
        for _, t in inputs:
            self._block(t, reason)
        for y in tensors_in(call.output):
            # an output shaped like an input keeps its channel layout (a channels-last LayerNorm stays channels-last)
            dims = next((t.dims for x, t in inputs if x.dim() == y.dim() > max(t.dims) and all(
                x.shape[d] == y.shape[d] for d in t.dims)), None)
            if dims is None:  # channels-last in, channels-last out (blocked either way: only the layout matters)
                last = inputs and all(t.dims == (x.dim() - 1,) and x.dim() == y.dim() for x, t in inputs)
                dims = (y.dim() - 1,) if last and y.dim() > 2 else (1,)
            n = math.prod(y.shape[d] for d in dims) if y.dim() >= 2 else 0
            self._set(y, self._fresh(n, reason), torch.full((n,), torch.nan, dtype=torch.float64), dims)

    # visiting calls -------------------------------------------------------------------------------------------
    def _visit(self, call: Call) -> None:
        traced = [self._get(x) for x in tensors_in((call.args, call.kwargs))]
        if not any(t is not None for t in traced):
            return  # computed from parameters and constants only
        outputs = tensors_in(call.output)
        if not outputs:
            return  # sizes, shapes and other non-tensor results
        module, op = call.module, call.op
        if module is not None and self.calls_per_module.get(call.name, 0) > 1 and has_state(module):
            return self._opaque(call, f"module {call.name!r} is called more than once")
        if op == "getitem" and not isinstance(call.args[0], Tensor) and all(
                self._get(y) is not None for y in outputs):
            return  # an element of a traced tuple (e.g. a chunk) is that traced tensor itself
        if op in MOVES:
            return self._move(call)
        if len(outputs) != 1:
            return self._opaque(call, f"{call.name} ({call.op}) has {len(outputs)} tensor outputs")
        name = call.name
        if op == "linear" and (owner := self._weight_owner(call)) is not None:
            name, module = owner
        if isinstance(module, nn.Linear):
            return self._linear(call, module, name)
        if isinstance(module, nn.LayerNorm):  # a LayerNorm without children is a leaf
            return visit_layernorm(self, call, module)
        if op in ELEMENTWISE:
            return self._elementwise(call)
        layouts = {t.dims for t in traced if t is not None}
        if layouts != {(1,)}:
            norm = "LayerNorm normalizes over them, removing one changes the statistics of the others" if (
                "norm" in op.lower()) else f"unsupported operation {call.name!r} ({op})"
            return self._opaque(call, f"{norm}: channels in dimensions {sorted(layouts)}")
        if isinstance(module, nn.modules.conv._ConvNd):
            return self._conv(call, module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self._batchnorm(call, module)
        if op == "pad" or (module is not None and op.endswith(("Pad1d", "Pad2d", "Pad3d"))):
            return self._pad(call)
        if "pool" in op.lower() or op in ("interpolate", "upsample", "Upsample"):
            return self._pool(call)
        if op in REDUCTIONS:
            return self._reshape(call)
        if op in CONCATS:
            return self._concat(call)
        if "norm" in op.lower():
            return self._opaque(call, f"{op} {call.name!r} normalizes over channels: removing one changes the others")
        return self._opaque(call, f"unsupported operation {call.name!r} ({op})")

    def _weight_owner(self, call: Call) -> tuple[str, nn.Linear] | None:
        """``F.linear(x, layer.weight, layer.bias)`` on an ``nn.Linear``'s own parameters: treated as that layer."""
        weight = call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")
        bias = call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")
        owner = self.parameter_owner.get(id(weight), "")
        module = self.modules.get(owner.rpartition(".")[0])
        if owner.endswith("weight") and isinstance(module, nn.Linear) and bias is module.bias:
            return owner.rpartition(".")[0], module
        return None

    def _move(self, call: Call) -> None:
        x = call.args[0] if call.args else None
        t = self._get(x)
        others = [y for y in tensors_in((call.args[1:], call.kwargs)) if self._get(y) is not None]
        if t is None or others or not isinstance(x, Tensor):
            return self._opaque(call, f"{call.op} of several traced tensors")
        layouts = moved_channels(call, x, t.dims)
        if isinstance(layouts, str):
            return self._opaque(call, layouts)
        pieces = [positions for _, positions in layouts]
        if any(set(p) != set(range(len(t.vars))) for p in pieces):  # a split, chunk or channel slice
            if sorted(q for p in pieces for q in p) != list(range(len(t.vars))) or len({len(p) for p in pieces}) > 1:
                return self._opaque(call, f"{call.op} selects channels by position (the positions shift when "
                                          "channels are removed)")
            for p in pieces[1:]:  # the compacted tensor is cut at its new middle: every piece loses equally many
                self.balances.append(([t.vars[q] for q in pieces[0]], [t.vars[q] for q in p]))
        for y, (dims, positions) in zip(tensors_in(call.output), layouts, strict=True):
            if len(dims) > 1:  # channels split into (groups, per group): the same position goes from every group
                self._tie_split(y, dims, [t.vars[p] for p in positions])
            self._set(y, [t.vars[p] for p in positions], t.value[positions], dims)

    def _tie_split(self, y: Tensor, dims: tuple[int, ...], variables: list[int]) -> None:
        """A view of the channels as ``(groups, per group)`` (a channel shuffle): the smaller dimension is taken for
        the fixed number of groups, and the channels at one position of the others are tied across it: distinct
        channels, pruned together (a unit of :class:`~lightning_compress.graph.channel_ties.ChannelTies`)."""
        sizes = [y.shape[d] for d in dims]
        fixed = sizes.index(min(sizes))
        grid = torch.arange(len(variables)).view(sizes).movedim(fixed, 0).reshape(sizes[fixed], -1)
        for row in grid[1:]:
            for a, b in zip(grid[0].tolist(), row.tolist(), strict=True):
                self.ties.add((variables[a], variables[b]))

    def _conv(self, call: Call, conv: nn.modules.conv._ConvNd) -> None:
        x, y = call.args[0], call.output
        t = self._get(x)
        if isinstance(conv, nn.modules.conv._ConvTransposeNd) or t is None:
            return self._opaque(call, f"unsupported layer {call.name!r} ({type(conv).__name__})")
        bias = conv.bias.detach().cpu().double() if conv.bias is not None else torch.zeros(conv.out_channels,
                                                                                               dtype=torch.float64)
        no_padding = unpadded(conv)
        zero_filter = conv.weight.detach().flatten(1).eq(0).all(1).cpu()
        if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1:  # depthwise, multiplier 1
            for i, v in enumerate(t.vars):
                self.vars[v].members.append((call.name, "depthwise", i))
            c = t.value
            sums = conv.weight.detach().flatten(1).double().sum(1).cpu()
            through = torch.where((c == 0) | torch.tensor(no_padding), c * sums, torch.nan)
            value = torch.where(zero_filter, bias, through + bias)
            return self._set(y, list(t.vars), value)
        if conv.groups != 1 and conv.in_channels == conv.out_channels:  # channel i in and out pruned together
            self.grouped[call.name] = (conv.groups, conv.out_channels)
            for i, (v, c) in enumerate(zip(t.vars, t.value.tolist(), strict=True)):
                self.vars[v].reads.append((call.name, i, c, False))
                self.vars[v].members.append((call.name, "producer", i))
            return self._set(y, list(t.vars), torch.where(zero_filter, bias, torch.nan))
        if conv.groups != 1:
            return self._opaque(call, f"grouped convolution {call.name!r} (groups={conv.groups}) with "
                                      f"{conv.in_channels} inputs and {conv.out_channels} outputs is kept intact")
        for i, (v, c) in enumerate(zip(t.vars, t.value.tolist(), strict=True)):
            self.vars[v].reads.append((call.name, i, c, no_padding))
        out = self._fresh(conv.out_channels)
        for o, v in enumerate(out):
            self.vars[v].members.append((call.name, "producer", o))
        self._set(y, out, torch.where(zero_filter, bias, torch.nan))

    def _linear(self, call: Call, linear: nn.Linear, name: str) -> None:
        x, y = call.args[0], call.output
        t = self._get(x)
        if t is None or t.dims != (x.dim() - 1,):
            where = "none" if t is None else list(t.dims)
            return self._opaque(call, f"Linear {name!r} on a {x.dim()}-d input with channels in dimensions {where} "
                                      "is kept intact")
        weight = linear.weight.detach().cpu().double()
        bias = linear.bias.detach().cpu().double() if linear.bias is not None else torch.zeros(
            linear.out_features, dtype=torch.float64)
        for i, (v, c) in enumerate(zip(t.vars, t.value.tolist(), strict=True)):
            self.vars[v].reads.append((name, i, c, True))
        out = self._fresh(linear.out_features)
        for o, v in enumerate(out):
            self.vars[v].members.append((name, "producer", o))
        value = torch.where(weight != 0, weight * t.value, torch.zeros(())).sum(1) + bias
        self._set(y, out, value, (y.dim() - 1,))

    def _batchnorm(self, call: Call, bn: nn.modules.batchnorm._BatchNorm) -> None:
        t = self._get(call.args[0])
        if t is None or bn.running_mean is None or bn.running_var is None:
            return self._opaque(call, f"BatchNorm {call.name!r} without running statistics is kept intact")
        for i, v in enumerate(t.vars):
            self.vars[v].members.append((call.name, "batchnorm", i))
        scale, shift = bn_affine(bn)
        value = torch.where(scale == 0, shift, t.value * scale + shift)
        self._set(call.output, list(t.vars), value)

    def _elementwise(self, call: Call) -> None:
        y = call.output
        if y.dim() < 2:
            return self._opaque(call, f"{call.op} gives a {y.dim()}-d result")
        operands = list(tensors_in((call.args, call.kwargs)))
        traced = [(x, t) for x in operands if (t := self._get(x)) is not None]
        dims = traced[0][1].dims
        full = [(x, t) for x, t in traced if x.dim() == y.dim() and t.dims == dims
                and all(x.shape[d] == y.shape[d] for d in dims)]
        if len(full) != len(traced):
            return self._opaque(call, f"{call.op} broadcasts over channels")
        scales = []
        for x in operands:
            if self._get(x) is not None or x.numel() == 1:
                continue
            aligned = [1] * (y.dim() - x.dim()) + list(x.shape)
            if len(aligned) != y.dim() or any(aligned[d] != 1 for d in dims):  # not a per-sample/position scale
                owner = self.parameter_owner.get(id(x))
                if owner is None or len(dims) != 1 or x.dim() != y.dim() - dims[0] or x.numel() != y.shape[dims[0]]:
                    return self._opaque(call, f"{call.op} with an untraced tensor of shape {tuple(x.shape)} "
                                              "broadcast over channels")
                scales.append(owner)
        first = full[0][1]
        for _, t in full[1:]:
            for a, b in zip(first.vars, t.vars, strict=True):
                self._union(a, b)
        for owner in scales:  # a per-channel parameter of a non-leaf module (ConvNeXt's layer scale)
            for i, v in enumerate(first.vars):
                self.vars[v].members.append((owner, "parameter", i))
        try:
            value = self._evaluate(call, y, dims)
        except Exception:  # an argument pattern we cannot replay on channel values
            value = torch.full((len(first.vars),), torch.nan, dtype=torch.float64)
        if call.op == "mul":  # zero times anything (e.g. a squeeze-excitation scale) is zero
            for _, t in full:
                value = torch.where(t.value == 0, torch.zeros(()), value)
        self._set(y, list(first.vars), value, dims)

    def _evaluate(self, call: Call, y: Tensor, dims: tuple[int, ...]) -> Tensor:
        """Replay an elementwise op on per-channel constants shaped ``(1, C, 1, ...)`` (channels along ``dims``);
        nan where not constant."""
        shape = [1] * y.dim()
        for d in dims:
            shape[d] = y.shape[d]

        def substitute(value: Any) -> Any:
            t = self._get(value)
            if t is not None:
                return t.value.clone().view(shape)
            if isinstance(value, (list, tuple)):
                return type(value)(substitute(v) for v in value)
            return value.detach().cpu().double() if isinstance(value, Tensor) else value

        result = call.apply(*substitute(call.args), **substitute(call.kwargs))
        if not isinstance(result, Tensor) or result.numel() != math.prod(shape):
            raise ValueError("not an elementwise result")
        return result.reshape(-1).double()

    def _pool(self, call: Call) -> None:
        x, y = call.args[0], call.output
        t = self._get(x)
        if t is None or y.dim() != x.dim() or y.shape[1] != x.shape[1]:
            return self._opaque(call, f"pooling {call.name!r} changes channels")
        padding = call.kwargs.get("padding", getattr(call.module, "padding", call.args[3] if len(call.args) > 3
                                                     else 0))
        exact = not (("avg" in call.op.lower() and "adaptive" not in call.op.lower() and has_padding(padding))
                     or "lp" in call.op.lower())
        value = t.value if exact else torch.where(t.value == 0, t.value, torch.nan)
        self._set(y, list(t.vars), value)

    def _pad(self, call: Call) -> None:
        """Spatial padding (``F.pad``, ``nn.ZeroPad2d``, Hugging Face's TensorFlow "same" padding) keeps channels; a
        constant channel stays constant where the border takes its value (or copies it: reflect, replicate)."""
        x, y = call.args[0], call.output
        t = self._get(x)
        if t is None or y.dim() != x.dim() or y.shape[:2] != x.shape[:2]:
            return self._opaque(call, f"padding {call.name!r} over the batch or channel dimension")
        module = call.module
        if module is not None:
            constant = isinstance(module, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
                                           nn.ConstantPad2d, nn.ConstantPad3d))
            border = float(getattr(module, "value", 0.0))
        else:
            mode = call.args[2] if len(call.args) > 2 else call.kwargs.get("mode", "constant")
            value = call.args[3] if len(call.args) > 3 else call.kwargs.get("value")
            constant, border = mode == "constant", float(value or 0.0)
        value = torch.where(t.value == border, t.value, torch.nan) if constant else t.value
        self._set(y, list(t.vars), value)

    def _reshape(self, call: Call) -> None:
        x, y = call.args[0], call.output
        t = self._get(x)
        if t is None or not keeps_batch_and_channels(call, x.dim()):
            return self._opaque(call, f"{call.op} over the batch or channel dimension")
        if y.dim() < 2 or y.shape[0] != x.shape[0] or y.shape[1] != x.shape[1]:
            return self._opaque(call, f"{call.op} {tuple(x.shape)} -> {tuple(y.shape)} moves channels")
        factor = x.numel() / y.numel() if call.op == "sum" else 1.0
        self._set(y, list(t.vars), t.value * factor)

    def _concat(self, call: Call) -> None:
        parts = call.args[0] if call.args else call.kwargs.get("tensors", [])
        dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", call.kwargs.get("axis", 0))
        y = call.output
        traced = [t for x in parts if (t := self._get(x)) is not None]
        if len(traced) != len(parts) or y.dim() < 2:
            return self._opaque(call, "concatenation with untraced tensors")
        if dim % y.dim() == 1:
            variables = [v for t in traced for v in t.vars]
            return self._set(y, variables, torch.cat([t.value for t in traced]))
        first = traced[0]
        for t in traced[1:]:
            for a, b in zip(first.vars, t.vars, strict=True):
                self._union(a, b)
        values = torch.stack([t.value for t in traced])
        same = (values == values[0]).all(0)
        self._set(y, list(first.vars), torch.where(same, values[0], torch.nan))

def build_graph(model: nn.Module, example_inputs: Any, method: str = "auto") -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and analyse its channel dependencies (see the module docstring)."""
    recorded = trace(model, example_inputs, method)
    with eval_mode(model), torch.no_grad():
        return DependencyGraph(model, recorded)


def filter_groups(model: nn.Module, example_inputs: Any, method: str = "auto") -> list[ChannelGroup]:
    """Dependency groups of output channels, for scoring filters jointly (e.g. ``FilterPruning``)."""
    return build_graph(model, example_inputs, method).groups()
