"""Channel routes: exact pruning through channel shuffles by reordering filters, not by keeping positions. Pure torch.

Through a channel shuffle (``view`` to groups, ``transpose``, ``view`` back) followed by equal splits (``chunk``), a
channel's position decides where it goes: in ShuffleNetV2 a block passes the first half of its input on unchanged and
feeds the second half to a branch, then interleaves both halves, so a channel born in one block travels through some
blocks untouched and is consumed by a later one. Removing channels moves every position. Keeping the same positions
in every group (the :class:`~lightning_compress.graph.channel_ties.ChannelTies` units) keeps each channel on its
road, but across a deep stage no selection but all or nothing does (torchvision's ``shufflenet_v2_x1_0``, stage 3).

A producer's filters, however, may come out in any order: the consumers' input columns, BatchNorm and depthwise
entries follow. So the compacted network is followed instead, with ``kept[p]`` filters for each producer ``p``: the
traced forward is replayed on integer code tensors of the compacted widths (a ``view`` to groups keeps its number of
groups), and each *slot* (filter ``j`` of the compacted producer ``p``) collects the layers it reaches, its *route*.
Compaction is exact when every producer keeps, for each route, as many channels having that route in the original
network as the compacted one has slots with it; then channel and slot are paired in order, and every layer's kept
indices are listed in the order the compacted network meets them. Selection keeps, per producer and route, the
channels of highest score. Groups with residual additions, LayerNorms or per-channel parameters are not routed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_compress.graph.channel_moves import MOVES
from lightning_compress.graph.channel_ops import CONCATS
from lightning_compress.graph.tracing import tensors_in
from lightning_compress.utils.rounding import round_count

__all__ = ["RoutedPlan", "Routes", "attach_routes", "group_routes"]

Route = frozenset[tuple[str, str]]
_RESHAPES = {"view", "reshape", "flatten", "Flatten", "unflatten", "Unflatten"}


@dataclass
class RoutedPlan:
    """What the compacted network meets, for ``kept`` filters per producer: per slot ``(producer, j)`` its route, and
    per layer (``(name, "out")`` for producers, BatchNorms and depthwise convolutions, ``(name, "in")`` for
    consumers) the slots it meets, in order."""

    routes: dict[tuple[str, int], Route]
    layers: dict[tuple[str, str], list[tuple[str, int]]] = field(default_factory=dict)


class Routes:
    """The routes of one dependency group's channels (positions ``k`` of ``group.roots``) through ``graph``."""

    def __init__(self, graph: Any, group: Any) -> None:
        self.graph, self.group = graph, group
        merged = graph.merged()
        self.producer: list[tuple[str, int]] = []
        self.route: list[Route] = []
        self.index: list[dict[tuple[str, str], list[int]]] = []  # per channel: layer side -> its indices there
        for root in group.roots:
            meta = merged[root]
            made = [(m, i) for m, role, i in meta.members if role == "producer"]
            if len(made) != 1:
                raise ValueError("a routed channel has exactly one producer")
            self.producer.append(made[0])
            route = {(m, role) for m, role, _ in meta.members} | {(c, "read") for c, *_ in meta.reads}
            self.route.append(frozenset(route))
            sides: dict[tuple[str, str], list[int]] = {}
            for m, _, i in meta.members:
                sides.setdefault((m, "out"), []).append(i)
            for c, i, *_ in meta.reads:
                sides.setdefault((c, "in"), []).append(i)
            self.index.append(sides)
        for name in group.consumers:
            if getattr(graph.modules.get(name), "groups", 1) != 1:
                raise ValueError("a grouped convolution reads the routed channels")
        self.size = Counter(p for p, _ in self.producer)
        self._plans: dict[tuple[tuple[str, int], ...], RoutedPlan | str] = {}

    # the compacted network ---------------------------------------------------------------------------------------
    def plan(self, kept: dict[str, int]) -> RoutedPlan | str:
        """The compacted network's slots and layers with ``kept[p]`` filters per producer, or why it cannot be
        followed."""
        key = tuple(sorted(kept.items()))
        if key not in self._plans:
            try:
                self._plans[key] = _Replay(self, kept).run()
            except (RuntimeError, ValueError, IndexError, TypeError) as error:
                self._plans[key] = f"the compacted channel shuffle could not be followed ({error})"
        return self._plans[key]

    def pairing(self, keep: Tensor) -> dict[tuple[str, int], int] | str:
        """For the channels ``keep`` (bool per group channel), the group channel behind each slot, or why they do
        not fit the compacted network (a route with more slots than channels)."""
        kept = Counter(self.producer[k][0] for k in keep.nonzero().flatten().tolist())
        plan = self.plan({p: kept.get(p, 0) for p in self.size})
        if isinstance(plan, str):
            return plan
        wanted: dict[tuple[str, Route], list[tuple[str, int]]] = {}
        for slot, route in plan.routes.items():
            wanted.setdefault((slot[0], route), []).append(slot)
        have: dict[tuple[str, Route], list[int]] = {}
        for k in keep.nonzero().flatten().tolist():
            have.setdefault((self.producer[k][0], self.route[k]), []).append(k)
        if {key: len(v) for key, v in wanted.items()} != {key: len(v) for key, v in have.items()}:
            return "the kept channels do not take the roads of the compacted channel shuffle"
        return {slot: k for key, slots in wanted.items() for slot, k in zip(sorted(slots), have[key], strict=True)}

    def orders(self, keep: Tensor) -> dict[tuple[str, str], list[int]] | str:
        """Every layer's kept indices in the compacted order (see :class:`RoutedPlan`), or why there is none."""
        pairs = self.pairing(keep)
        if isinstance(pairs, str):
            return pairs
        kept = Counter(self.producer[k][0] for k in pairs.values())
        plan = self.plan(dict(kept))
        assert not isinstance(plan, str)
        orders: dict[tuple[str, str], list[int]] = {}
        for side, slots in plan.layers.items():
            indices = [self.index[pairs[slot]].get(side, []) for slot in slots]
            if any(len(i) != 1 for i in indices):
                return f"{side[0]!r} meets a channel more than once"
            orders[side] = [i[0] for i in indices]
        return orders

    def keep_mask(self, scores: Tensor, k: int, rounding: str) -> Tensor | None:
        """Prune about ``k`` channels at each producer's share (``rounding``), keeping per producer and route the
        channels of highest score; ``None`` where the compacted network cannot be followed or a route lacks
        channels."""
        total = len(self.producer)
        kept = {p: n - min(round_count(n * k / total, rounding), n - 1) for p, n in self.size.items()}
        plan = self.plan(kept)
        if isinstance(plan, str):
            return None
        need = Counter((slot[0], route) for slot, route in plan.routes.items())
        keep = torch.zeros(total, dtype=torch.bool)
        order = sorted(range(total), key=lambda c: -float(scores[c]))
        for c in order:
            key = (self.producer[c][0], self.route[c])
            if need[key] > 0:
                need[key] -= 1
                keep[c] = True
        return None if any(need.values()) else keep.to(scores.device)


class _Replay:
    """The traced forward replayed on code tensors of the compacted widths (``slot number + 1``; 0: not the
    group's)."""

    def __init__(self, routes: Routes, kept: dict[str, int]) -> None:
        self.routes, self.kept, self.graph = routes, kept, routes.graph
        self.codes: dict[int, Tensor] = {}
        self.slots: list[tuple[str, int]] = []
        self.plan = RoutedPlan({})
        group = routes.group
        self.members = {m: role for role, maps in (("batchnorm", group.batchnorms), ("depthwise", group.depthwise))
                        for m in maps}

    def run(self) -> RoutedPlan:
        for call in self.graph.trace.calls:
            self._call(call)
        return self.plan

    def _roots(self, x: Any) -> list[int] | None:
        t = self.graph._get(x)
        return None if t is None else [self.graph.find(v) for v in t.vars]

    def _call(self, call: Any) -> None:
        inputs = [x for x in tensors_in((call.args, call.kwargs)) if id(x) in self.codes]
        outputs = tensors_in(call.output)
        layer = call.name if call.module is not None else None
        if inputs and layer in self.routes.group.consumers:
            self._meet(call.name, "in", "read", inputs[0])
        if layer in self.routes.group.producers:
            return self._produce(call.name, outputs[0])
        if not inputs or not outputs or layer in self.routes.group.consumers:
            return
        if call.op in MOVES or call.op in CONCATS:
            return self._move(call, outputs)
        x, y = inputs[0], outputs[0]
        if len(outputs) != 1 or self._roots(y) != self._roots(x):
            raise ValueError(f"{call.name} does not carry the channels")
        others = [self.codes[id(o)] for o in inputs[1:]]
        if any(not torch.equal(o, self.codes[id(x)]) for o in others):
            raise ValueError(f"{call.name} combines channels that the compaction puts in other orders")
        if layer in self.members:
            self._meet(call.name, "out", self.members[call.name], x)
        self.codes[id(y)] = self._shaped(y, self._list(x))

    def _produce(self, name: str, y: Tensor) -> None:
        count = self.kept[name]
        start = len(self.slots)
        self.slots += [(name, j) for j in range(count)]
        for slot in self.slots[start:]:
            self.plan.routes[slot] = frozenset({(name, "producer")})
        self.plan.layers[(name, "out")] = self.slots[start:]
        self.codes[id(y)] = self._shaped(y, list(range(start + 1, start + count + 1)))

    def _meet(self, name: str, side: str, role: str, x: Tensor) -> None:
        codes = self._list(x)
        if 0 in codes:
            raise ValueError(f"{name} reads channels of other groups beside the routed ones")
        slots = [self.slots[c - 1] for c in codes]
        self.plan.layers[(name, side)] = slots
        for slot in slots:
            self.plan.routes[slot] = self.plan.routes[slot] | {(name, role)}

    def _list(self, x: Tensor) -> list[int]:
        """The codes along ``x``'s channel dimensions, in channel order."""
        dims = self.graph._get(x).dims
        codes = self.codes[id(x)]
        picked = codes.movedim(dims, tuple(range(len(dims))))
        return picked.reshape(*picked.shape[:len(dims)], -1)[..., 0].reshape(-1).tolist()

    def _shaped(self, y: Tensor, codes: list[int]) -> Tensor:
        """A code tensor shaped like ``y`` with its (single) channel dimension holding ``codes``."""
        dims = self.graph._get(y).dims
        if len(dims) != 1:
            raise ValueError("channels over several dimensions")
        shape = list(y.shape)
        shape[dims[0]] = len(codes)
        view = [1] * len(shape)
        view[dims[0]] = len(codes)
        return torch.tensor(codes, dtype=torch.long).view(view).expand(shape)

    def _move(self, call: Any, outputs: list[Tensor]) -> None:
        def substitute(value: Any) -> Any:
            if isinstance(value, Tensor):
                if id(value) not in self.codes:
                    raise ValueError(f"{call.op} of the routed channels with others")
                return self.codes[id(value)]
            if isinstance(value, (list, tuple)):
                return type(value)(substitute(v) for v in value)
            return value

        if call.op in _RESHAPES:
            x = call.args[0]
            result: Any = self.codes[id(x)].reshape(self._compacted_shape(outputs[0], len(self._list(x))))
        else:
            result = call.apply(*substitute(call.args), **substitute(call.kwargs))
        replayed = tensors_in(result)
        if len(replayed) != len(outputs):
            raise ValueError(f"{call.op} gives other outputs on the compacted codes")
        for y, codes in zip(outputs, replayed, strict=True):
            self.codes[id(y)] = codes

    def _compacted_shape(self, y: Tensor, channels: int) -> list[int]:
        """``y``'s shape with its channel dimensions resized to ``channels`` channels; viewed as ``(groups, per
        group)``, the smaller size (the number of groups) stays."""
        dims = self.graph._get(y).dims
        shape = list(y.shape)
        sizes = [shape[d] for d in dims]
        if len(dims) == 1:
            shape[dims[0]] = channels
        elif len(dims) == 2:
            fixed = sizes.index(min(sizes))
            if channels % sizes[fixed]:
                raise ValueError(f"{channels} channels do not split into {sizes[fixed]} groups")
            shape[dims[fixed]], shape[dims[1 - fixed]] = sizes[fixed], channels // sizes[fixed]
        else:
            raise ValueError("channels over more than two dimensions")
        return shape


def group_routes(graph: Any, group: Any) -> Routes | None:
    """:class:`Routes` for a group that a channel shuffle ties (its ``ties`` have units of several channels), when
    every channel has one producer and nothing but BatchNorms and depthwise convolutions carries it; else ``None``."""
    ties = group.ties
    if ties is None or group.blocked or group.layernorms or group.parameters or group.segments is not None:
        return None
    if max(ties.sizes().tolist(), default=1) < 2:
        return None
    try:
        return Routes(graph, group)
    except ValueError:
        return None


def attach_routes(graph: Any, group: Any) -> None:
    """Give ``group.ties`` (where there are any) the group's :class:`Routes` (``None`` where it has none)."""
    if group.ties is not None:
        group.ties.routes = group_routes(graph, group)
