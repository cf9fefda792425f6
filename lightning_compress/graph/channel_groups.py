"""Channel groups: the producers, BatchNorms, depthwise convolutions and consumers that share channels.

Built by :class:`~lightning_compress.graph.dependency.DependencyGraph` from its union-find of channel variables:
producers that share at least one channel form one group (a residual stage, a concatenation tied by an addition).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lightning_compress.graph.channel_ties import ChannelTies

__all__ = ["ChannelGroup", "ChannelInfo", "collect_groups"]


@dataclass
class ChannelInfo:
    """What one channel (a union-find root) touches: blocking reasons, members ``(module, role, index)`` with
    roles producer, batchnorm, layernorm, depthwise and parameter, reads ``(consumer, input index, value, foldable)``
    and the LayerNorms over it ``(norm, index, constant input)``."""

    blocked: list[str] = field(default_factory=list)
    members: list[tuple[str, str, int]] = field(default_factory=list)  # (module or parameter, role, index)
    reads: list[tuple[str, int, float, bool]] = field(default_factory=list)  # (consumer, index, value, foldable)
    norms: list[tuple[str, int, float]] = field(default_factory=list)  # (LayerNorm, index, constant input)


@dataclass
class ChannelGroup:
    """Channels tied across layers (by residual additions, depthwise convolutions, ...), pruned together.

    Each mapping gives, for every channel of the group in order, the module's index (``None`` where the module
    does not carry that channel). ``consumers`` give lists of input indices (a flatten reads several features).

    Attributes:
        producers: conv/linear layers whose output channels (filters) these are.
        batchnorms: BatchNorm layers normalizing them.
        depthwise: depthwise convolutions carrying them (filter ``i`` reads channel ``i``).
        consumers: layers reading them as input channels or features.
        blocked: reasons why channels of this group cannot be removed (empty when free).
        roots: the union-find roots, one per channel (internal).
        parameters: per-channel parameters of non-leaf modules (e.g. ConvNeXt's ``layer_scale``), by qualified
            name, sliced along their first dimension.
        layernorms: LayerNorms over these channels (zeroed with the BatchNorms; compaction keeps their removed
            inputs, see :mod:`~lightning_compress.graph.layernorm`).
        segments: for a group through a grouped convolution, ``(conv group, position in it)`` per channel: the
            same positions must go from every conv group (as Torch-Pruning does); ``None`` otherwise.
        ties: for a group through a channel shuffle or an equal split (``chunk``), the channels that go together
            and the pieces that lose equally many (grouped convolutions' positions included); ``None`` otherwise.
    """

    producers: dict[str, list[int | None]]
    batchnorms: dict[str, list[int | None]]
    depthwise: dict[str, list[int | None]]
    consumers: dict[str, list[list[int]]]
    blocked: list[str]
    roots: list[int]
    parameters: dict[str, list[int | None]] = field(default_factory=dict)
    layernorms: dict[str, list[int | None]] = field(default_factory=dict)
    segments: list[tuple[int, int]] | None = None
    ties: ChannelTies | None = None

    @property
    def size(self) -> int:
        """Number of channels in the group."""
        return len(self.roots)


def collect_groups(merged: dict[int, ChannelInfo], links: Iterable[list[int]] = ()) -> list[ChannelGroup]:
    """Channel groups: connected sets of producers (and what they tie), in order of first appearance; the roots of
    each of ``links`` (channels constrained together, e.g. by a shuffle or a split) join one group."""
    producer_roots: dict[str, list[tuple[int, int]]] = {}
    for root, meta in merged.items():
        for module, role, index in meta.members:
            if role == "producer":
                producer_roots.setdefault(module, []).append((index, root))
    # connect producers sharing a root
    owner: dict[int, str] = {}
    link: dict[str, str] = {m: m for m in producer_roots}

    def top(m: str) -> str:
        while link[m] != m:
            m = link[m]
        return m

    for module, pairs in producer_roots.items():
        for _, root in pairs:
            if root in owner and top(owner[root]) != top(module):
                link[top(module)] = top(owner[root])
            owner.setdefault(root, module)
    for roots_together in links:
        owners = [top(owner[root]) for root in roots_together if root in owner]
        for other in owners[1:]:
            if top(other) != top(owners[0]):
                link[top(other)] = top(owners[0])
    order = list(producer_roots)
    components: dict[str, list[str]] = {}
    for module in order:
        components.setdefault(top(module), []).append(module)
    result = []
    for modules in components.values():
        roots: list[int] = []
        for module in modules:
            for _, root in sorted(producer_roots[module]):
                if root not in roots:
                    roots.append(root)
        result.append(_group(roots, merged))
    return result

def _group(roots: list[int], merged: dict[int, ChannelInfo]) -> ChannelGroup:
    maps: dict[str, dict[str, Any]] = {"producer": {}, "batchnorm": {}, "depthwise": {}, "consumer": {},
                                       "parameter": {}, "layernorm": {}}
    blocked: list[str] = []
    for k, root in enumerate(roots):
        meta = merged[root]
        for module, role, index in meta.members:
            if module not in maps[role]:
                maps[role][module] = [None] * len(roots)
            maps[role][module][k] = index
        for module, index, _, _ in meta.reads:
            if module not in maps["consumer"]:
                maps["consumer"][module] = [[] for _ in roots]
            maps["consumer"][module][k].append(index)
        blocked += [reason for reason in meta.blocked if reason not in blocked]
    return ChannelGroup(maps["producer"], maps["batchnorm"], maps["depthwise"], maps["consumer"], blocked, roots,
                        maps["parameter"], maps["layernorm"])
