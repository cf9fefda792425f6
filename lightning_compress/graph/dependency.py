"""Channel dependency analysis: which channels of which layers must shrink together (DepGraph's idea).

Every channel of every traced tensor (dimension 1; features of a flattened tensor) is a *channel variable*.
Producers (conv, linear) create fresh variables; BatchNorm, activations, pooling, depthwise convolutions and
flattening carry them (a flatten repeats a channel over its spatial block of features); residual additions (any
elementwise op of two traced tensors) unite the variables position by position; concatenation along channels
appends them. A union-find turns united variables into one channel: removing it removes a filter from every
producer, the channel from every BatchNorm and depthwise conv, and the matching inputs of every consumer.

Alongside, each tensor channel carries its *value* when it is provably constant over batch and positions
(``nan`` otherwise): a zero filter gives its bias, eval-mode BatchNorm gives ``beta - gamma * mu / sigma`` for a
constant input, activations map constants to constants. A channel may be removed only where every consumer reads
it as zero or as a constant that folds exactly into the consumer's bias (always for ``Linear``; for convolutions
only without padding, since zero padding makes a constant channel's contribution vary at the borders).

Channels are blocked (kept) where they meet something the analysis does not model: the model's inputs and
outputs, grouped convolutions other than depthwise with one filter per channel, transposed convolutions,
``Linear`` on inputs with more than 2 dimensions, modules with parameters or buffers called more than once
(stateless ones such as a ReLU reused across a residual block are followed call by call), indexing, splits, reductions over
channels, norms other than BatchNorm with running statistics, functional convolutions (``F.conv2d`` with weights of
its own) and any other unknown operation; the reasons are listed in each group's ``blocked``. Not detected: a
forward whose control flow depends on channel counts (the compact model may take another branch) and parameters
shared between layers.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.graph.channel_groups import ChannelGroup, ChannelInfo, collect_groups
from lightning_compress.graph.channel_ops import (
    CONCATS,
    ELEMENTWISE,
    REDUCTIONS,
    RESHAPES,
    bn_affine,
    has_padding,
    has_state,
    indexes_positions_only,
    keeps_batch_and_channels,
    nan_values,
    unpadded,
)
from lightning_compress.graph.tracing import Call, Trace, eval_mode, tensors_in, trace

__all__ = ["ChannelGroup", "DependencyGraph", "build_graph", "filter_groups"]

@dataclass
class _Tensor:
    vars: list[int]
    value: Tensor  # (C,) float64, nan where not provably constant


class DependencyGraph:
    """The result of :func:`build_graph`: channel variables, their members, reads, values and blocks."""

    def __init__(self, model: nn.Module, recorded: Trace) -> None:
        self.model, self.trace = model, recorded
        self.parent: list[int] = []
        self.vars: list[ChannelInfo] = []
        self.tensors: dict[int, _Tensor] = {}
        self.calls_per_module: dict[str, int] = {}
        for call in recorded.calls:
            if call.module is not None:
                self.calls_per_module[call.name] = self.calls_per_module.get(call.name, 0) + 1
        for x in recorded.inputs:
            self._set(x, self._fresh(x.shape[1] if x.dim() >= 2 else 0, "model input"), nan_values(x))
        for call in recorded.calls:
            self._visit(call)
        for x in recorded.outputs:
            self._block(self._get(x), "model output")

    # union-find ---------------------------------------------------------------------------------------------
    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def _fresh(self, n: int, reason: str | None = None) -> list[int]:
        start = len(self.vars)
        for _ in range(n):
            self.parent.append(len(self.vars))
            self.vars.append(ChannelInfo(blocked=[reason] if reason else []))
        return list(range(start, start + n))

    def var(self, v: int) -> ChannelInfo:
        """Merged metadata of the channel whose union-find root is ``v``."""
        return self.merged()[self.find(v)]

    def groups(self) -> list[ChannelGroup]:
        """Channel groups: connected sets of producers (and what they tie), in order of first appearance."""
        return collect_groups(self.merged())

    def merged(self) -> dict[int, ChannelInfo]:
        """Metadata of every channel, merged over united variables, keyed by root."""
        roots: dict[int, ChannelInfo] = {}
        for v, meta in enumerate(self.vars):
            out = roots.setdefault(self.find(v), ChannelInfo())
            out.blocked += meta.blocked
            out.members += meta.members
            out.reads += meta.reads
        return roots

    # tensors ------------------------------------------------------------------------------------------------
    def _get(self, x: Any) -> _Tensor | None:
        return self.tensors.get(id(x)) if isinstance(x, Tensor) else None

    def _set(self, x: Tensor, variables: list[int], value: Tensor) -> None:
        if x.dim() >= 2 and len(variables) == x.shape[1] and value.numel() == x.shape[1]:
            self.tensors[id(x)] = _Tensor(variables, value)
        else:
            self.tensors[id(x)] = _Tensor(self._fresh(x.shape[1] if x.dim() >= 2 else 0, "unmodelled shape"),
                                          nan_values(x))

    def _block(self, t: _Tensor | None, reason: str) -> None:
        if t is not None:
            for v in t.vars:
                self.vars[v].blocked.append(reason)

    def _opaque(self, call: Call, reason: str) -> None:
        for x in tensors_in((call.args, call.kwargs)):
            self._block(self._get(x), reason)
        for y in tensors_in(call.output):
            self._set(y, self._fresh(y.shape[1] if y.dim() >= 2 else 0, reason), nan_values(y))

    # visiting calls -------------------------------------------------------------------------------------------
    def _visit(self, call: Call) -> None:
        traced = [self._get(x) for x in tensors_in((call.args, call.kwargs))]
        if not any(t is not None for t in traced):
            return  # computed from parameters and constants only
        outputs = tensors_in(call.output)
        if not outputs:
            return  # sizes, shapes and other non-tensor results
        if len(outputs) != 1:
            return self._opaque(call, f"{call.name} ({call.op}) has {len(outputs)} tensor outputs")
        if call.module is not None and self.calls_per_module.get(call.name, 0) > 1 and has_state(call.module):
            return self._opaque(call, f"module {call.name!r} is called more than once")
        module, op = call.module, call.op
        if isinstance(module, nn.modules.conv._ConvNd):
            return self._conv(call, module)
        if isinstance(module, nn.Linear):
            return self._linear(call, module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self._batchnorm(call, module)
        if op in ELEMENTWISE:
            return self._elementwise(call)
        if "pool" in op.lower() or op in ("interpolate", "upsample", "Upsample"):
            return self._pool(call)
        if op in RESHAPES or op in REDUCTIONS:
            return self._reshape(call)
        if op in CONCATS:
            return self._concat(call)
        if op == "getitem" and indexes_positions_only(call.args[1]):
            return self._reshape(call)
        return self._opaque(call, f"unsupported operation {call.name!r} ({op})")

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
        if conv.groups != 1:
            return self._opaque(call, f"grouped convolution {call.name!r} (groups={conv.groups}) is kept intact")
        for i, (v, c) in enumerate(zip(t.vars, t.value.tolist(), strict=True)):
            self.vars[v].reads.append((call.name, i, c, no_padding))
        out = self._fresh(conv.out_channels)
        for o, v in enumerate(out):
            self.vars[v].members.append((call.name, "producer", o))
        self._set(y, out, torch.where(zero_filter, bias, torch.nan))

    def _linear(self, call: Call, linear: nn.Linear) -> None:
        x, y = call.args[0], call.output
        t = self._get(x)
        if t is None or x.dim() != 2:
            return self._opaque(call, f"Linear {call.name!r} on a {x.dim()}-d input is kept intact")
        weight = linear.weight.detach().cpu().double()
        bias = linear.bias.detach().cpu().double() if linear.bias is not None else torch.zeros(
            linear.out_features, dtype=torch.float64)
        for i, (v, c) in enumerate(zip(t.vars, t.value.tolist(), strict=True)):
            self.vars[v].reads.append((call.name, i, c, True))
        out = self._fresh(linear.out_features)
        for o, v in enumerate(out):
            self.vars[v].members.append((call.name, "producer", o))
        value = torch.where(weight != 0, weight * t.value, torch.zeros(())).sum(1) + bias
        self._set(y, out, value)

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
        others = [x for x in operands if self._get(x) is None]
        if any(x.numel() != 1 for x in others):
            return self._opaque(call, f"{call.op} with a non-scalar untraced tensor")
        full = [(x, t) for x, t in traced if x.dim() == y.dim() and x.shape[1] == y.shape[1]]
        if len(full) != len(traced) or not full:
            return self._opaque(call, f"{call.op} broadcasts over channels")
        first = full[0][1]
        for _, t in full[1:]:
            for a, b in zip(first.vars, t.vars, strict=True):
                self._union(a, b)
        try:
            value = self._evaluate(call, y)
        except Exception:  # an argument pattern we cannot replay on channel values
            value = torch.full((y.shape[1],), torch.nan, dtype=torch.float64)
        if call.op == "mul":  # zero times anything (e.g. a squeeze-excitation scale) is zero
            for _, t in full:
                value = torch.where(t.value == 0, torch.zeros(()), value)
        self._set(y, list(first.vars), value)

    def _evaluate(self, call: Call, y: Tensor) -> Tensor:
        """Replay an elementwise op on per-channel constants shaped ``(1, C, 1, ...)``; nan where not constant."""

        def substitute(value: Any) -> Any:
            t = self._get(value)
            if t is not None:
                return t.value.clone().view(1, -1, *[1] * (value.dim() - 2))
            if isinstance(value, (list, tuple)):
                return type(value)(substitute(v) for v in value)
            return value.detach().cpu().double() if isinstance(value, Tensor) else value

        result = call.apply(*substitute(call.args), **substitute(call.kwargs))
        if not isinstance(result, Tensor) or result.numel() != y.shape[1]:
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

    def _reshape(self, call: Call) -> None:
        x, y = call.args[0], call.output
        t = self._get(x)
        if t is None or y.dim() < 2 or y.shape[0] != x.shape[0]:
            return self._opaque(call, f"{call.op} {tuple(x.shape)} -> {tuple(y.shape)} moves channels")
        if call.op in REDUCTIONS and not keeps_batch_and_channels(call, x.dim()):
            return self._opaque(call, f"{call.op} over the batch or channel dimension")
        if y.shape[1] == x.shape[1] and y.dim() >= 2:
            factor = x.numel() / y.numel() if call.op == "sum" else 1.0
            return self._set(y, list(t.vars), t.value * factor)
        block = math.prod(x.shape[2:])
        if call.op not in RESHAPES or y.dim() != 2 or y.shape[1] != x.shape[1] * block:
            return self._opaque(call, f"{call.op} {tuple(x.shape)} -> {tuple(y.shape)} moves channels")
        variables = [v for v in t.vars for _ in range(block)]
        self._set(y, variables, t.value.repeat_interleave(block))

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
