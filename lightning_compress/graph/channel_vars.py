"""Channel variables of the dependency analysis: a union-find over channels, and the channels of each traced tensor.

See :mod:`lightning_compress.graph.dependency`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_compress.graph.channel_groups import ChannelInfo
from lightning_compress.graph.channel_ops import nan_values

__all__ = ["ChannelVariables", "TracedChannels"]


@dataclass
class TracedChannels:
    """The channel variables of one tensor, their constant values and the dimensions that index them."""

    vars: list[int]
    value: Tensor  # (C,) float64, nan where not provably constant
    dims: tuple[int, ...] = (1,)  # the tensor dimensions that index the channels jointly (C order)


class ChannelVariables:
    """Union-find of channel variables and the channels of every traced tensor (by object identity)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.vars: list[ChannelInfo] = []
        self.tensors: dict[int, TracedChannels] = {}
        self.ties: set[tuple[int, int]] = set()  # distinct variables pruned together (the groups of a shuffle)
        self.balances: list[tuple[list[int], list[int]]] = []  # pieces of an equal split: lose equally many
        self.layernorm_dims: dict[str, int] = {}  # LayerNorm module -> the channel dimension it normalises over

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

    def merged(self) -> dict[int, ChannelInfo]:
        """Metadata of every channel, merged over united variables, keyed by root."""
        roots: dict[int, ChannelInfo] = {}
        for v, meta in enumerate(self.vars):
            out = roots.setdefault(self.find(v), ChannelInfo())
            out.blocked += meta.blocked
            out.members += meta.members
            out.reads += meta.reads
            out.norms += meta.norms
        return roots

    # tensors ------------------------------------------------------------------------------------------------
    def _get(self, x: Any) -> TracedChannels | None:
        return self.tensors.get(id(x)) if isinstance(x, Tensor) else None

    def _set(self, x: Tensor, variables: list[int], value: Tensor, dims: tuple[int, ...] = (1,)) -> None:
        channels = math.prod(x.shape[d] for d in dims) if x.dim() >= 2 and max(dims) < x.dim() else -1
        if len(variables) == channels and value.numel() == channels:
            self.tensors[id(x)] = TracedChannels(variables, value, dims)
        else:
            self.tensors[id(x)] = TracedChannels(self._fresh(x.shape[1] if x.dim() >= 2 else 0, "unmodelled shape"),
                                          nan_values(x))

    def _block(self, t: TracedChannels | None, reason: str) -> None:
        if t is not None:
            for v in t.vars:
                self.vars[v].blocked.append(reason)
