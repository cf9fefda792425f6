"""Constraints between the distinct channels of a group: which go together, which pieces lose equally many. Pure torch.

Two operations let channels go only in patterns, not one by one (see
:mod:`~lightning_compress.graph.dependency`):

- viewing the channels as ``(groups, per group)`` (a channel shuffle, ``x.view(b, g, c // g, h, w)``) or a grouped
  convolution: after compaction the same formula must map the kept channels to the same relative places, so the
  same positions go from every group. Such channels form a *unit*, pruned (and scored) together;
- an equal split (``chunk``, ``split``, ``tensor_split``) cuts the compacted tensor at its new middle: every piece
  must lose equally many channels (a *balance*), though not necessarily at the same positions.

A network that splits a shuffled tensor in halves again and again (ShuffleNetV2) would collapse into one channel if
both were taken as "the same channel"; as units and balances its stages keep their positions apart, and a selection
is repaired until every balance holds (a stage too deep for any balanced selection stays whole).

Channels 0 and 4, 1 and 5 go together; channels 0-3 and 4-7 (two chunks) lose equally many:

>>> ties = ChannelTies(units=[0, 1, 2, 3, 0, 1, 4, 5], balances=[([0, 1, 2, 3], [4, 5, 6, 7])])
>>> tied_keep_mask(torch.tensor([1.0, 5.0, 6.0, 7.0, 1.0, 5.0, 2.0, 8.0]), 4, ties).tolist()
[False, True, False, True, False, True, False, True]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ChannelTies", "balance_units", "group_ties", "tied_keep_mask", "tied_removal"]

UNIT_REASON = "a channel shuffle or grouped convolution removes the same positions from each of its groups"
BALANCE_REASON = "an equal split (chunk) loses equally many channels from each of its pieces"


@dataclass
class ChannelTies:
    """Constraints on a group's channels (positions in the group's order).

    Attributes:
        units: per channel, its unit: channels of one unit are pruned together.
        balances: pairs of channel lists (two pieces of a split) that must lose equally many channels; a channel
            listed twice counts twice.
    """

    units: list[int]
    balances: list[tuple[list[int], list[int]]]

    @property
    def num_units(self) -> int:
        return max(self.units) + 1 if self.units else 0

    def sizes(self) -> Tensor:
        """Channels per unit."""
        return torch.bincount(torch.tensor(self.units, dtype=torch.long), minlength=self.num_units)

    def coefficients(self) -> Tensor:
        """``(balances, units)``: channels of each unit in the first piece minus those in the second."""
        coef = torch.zeros(len(self.balances), self.num_units, dtype=torch.long)
        for b, (first, second) in enumerate(self.balances):
            for k in first:
                coef[b, self.units[k]] += 1
            for k in second:
                coef[b, self.units[k]] -= 1
        return coef


def balance_units(pruned: Tensor, coef: Tensor, sizes: Tensor, cost: Tensor, target: int | None = None) -> Tensor:
    """Make a selection of units (``pruned``, bool) satisfy every balance (``coef @ pruned == 0``).

    With a ``target`` (channels to prune), units are pruned or kept back, one at a time, whichever lowers the total
    imbalance most (then comes closer to ``target``, then costs least: ``cost`` is a unit's mean score); when no
    single change lowers it, or without a target, pruned units are kept back until the balances hold (the empty
    selection always does). Returns the new selection.
    """
    pruned = pruned.clone()
    if coef.numel() == 0:
        return pruned
    violation = coef @ pruned.long()
    if target is not None:
        sign = 1 - 2 * pruned.long()  # +1 prunes a unit, -1 keeps it back
        total = int(sizes.sum())
        while bool(violation.any()):
            after = (violation.unsqueeze(1) + coef * sign).abs().sum(0)  # total imbalance after flipping each unit
            count = int((sizes * pruned).sum()) + sizes * sign
            allowed = (after < violation.abs().sum()) & (count < total)
            if not bool(allowed.any()):
                break
            key = after.double() * (total + 1) + (count - target).abs().double() + cost.double() * sign / (
                cost.abs().max() + 1) / 2  # imbalance first, then distance to the target, then cost
            u = int(torch.where(allowed, key, torch.inf).argmin())
            pruned[u] = ~pruned[u]
            sign[u] = -sign[u]
            violation = coef @ pruned.long()
    while bool(violation.any()):  # keep back pruned units on the heavier side until nothing is out of balance
        b = int(violation.ne(0).nonzero()[0])
        heavier = pruned & (coef[b] * violation[b].sign() > 0)
        fits = heavier & (coef[b].abs() <= violation[b].abs())
        candidates = fits if bool(fits.any()) else heavier
        u = int(torch.where(candidates, cost.double(), -torch.inf).argmax())
        pruned[u] = False
        violation = coef @ pruned.long()
    return pruned


def tied_keep_mask(scores: Tensor, k: int, ties: ChannelTies, tries: int = 8) -> Tensor:
    """Keep-mask pruning about ``k`` channels in whole units of lowest mean score, then balanced
    (:func:`balance_units`); never the whole group. A balanced selection may land away from ``k``: the greedy start
    is aimed again (at most ``tries`` times) by the miss, and the selection closest to ``k`` (then of least score) is
    taken."""
    units = torch.tensor(ties.units, dtype=torch.long)
    sizes, coef = ties.sizes(), ties.coefficients()
    mean = torch.zeros(ties.num_units, dtype=torch.float64).index_add_(0, units, scores.double().cpu()) / sizes
    order = torch.sort(mean, stable=True).indices.tolist()
    best: tuple[int, float, Tensor] | None = None
    aims: set[int] = set()
    aim = k
    while len(aims) < tries and aim not in aims:
        aims.add(aim)
        pruned = torch.zeros(ties.num_units, dtype=torch.bool)
        count = 0
        for u in order:
            size = int(sizes[u])
            if abs(count + size - aim) < abs(count - aim) and count + size < len(units):
                pruned[u], count = True, count + size
        pruned = balance_units(pruned, coef, sizes, mean, k)
        count = int((sizes * pruned).sum())
        candidate = (abs(count - k), float((mean * sizes * pruned).sum()), pruned)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
        if count == k:
            break
        aim = min(max(aim + k - count, 0), len(units) - 1)
    assert best is not None
    return ~best[2][units].to(scores.device)


def tied_removal(removable: list[int], ties: ChannelTies) -> dict[str, list[int]]:
    """Take out of ``removable`` (channel positions, changed in place) every unit not removable whole, then units
    until every balance holds; returns the channels kept back by reason."""
    units = torch.tensor(ties.units, dtype=torch.long)
    free = torch.ones(ties.num_units, dtype=torch.bool)
    chosen = torch.zeros(len(units), dtype=torch.bool)
    chosen[removable] = True
    free[units[~chosen]] = False
    sizes = ties.sizes()
    balanced = balance_units(free, ties.coefficients(), sizes, torch.zeros(ties.num_units))
    kept: dict[str, list[int]] = {}
    for k in list(removable):
        reason = UNIT_REASON if not free[units[k]] else BALANCE_REASON if not balanced[units[k]] else None
        if reason is not None:
            removable.remove(k)
            kept.setdefault(reason, []).append(k)
    return kept


def group_ties(group: Any, ties: set[tuple[int, int]], balances: list[tuple[list[int], list[int]]],
               grouped: dict[str, tuple[int, int]]) -> ChannelTies | None:
    """The :class:`ChannelTies` of a ``ChannelGroup`` from the graph's ties and balances (by union-find root) and its
    grouped convolutions (``name -> (groups, channels)``); ``None`` where nothing ties its channels but a grouped
    convolution (``segments`` describe that). A channel tied to one outside the group (no layer produces it, so it
    never goes) blocks the group."""
    position = {root: k for k, root in enumerate(group.roots)}
    pairs = [(position[a], position[b]) for a, b in sorted(ties) if a in position and b in position]
    if any((a in position) != (b in position) for a, b in ties):
        group.blocked.append("a channel shuffle ties these channels to channels no layer produces")
    pieces = []
    for first, second in balances:
        kept = [position[r] for r in first if r in position], [position[r] for r in second if r in position]
        if sorted(kept[0]) != sorted(kept[1]):
            pieces.append(kept)
    if not pairs and not pieces:
        return None
    for name, (count, channels) in grouped.items():  # the same positions from every conv group
        width, first_at = channels // count, {}  # type: tuple[int, dict[int, int]]
        for k, index in enumerate(group.producers.get(name, [])):
            if index is not None:
                pairs.append((first_at.setdefault(index % width, k), k))
    parent = list(range(len(group.roots)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for one, other in pairs:
        ra, rb = find(one), find(other)
        parent[max(ra, rb)] = min(ra, rb)
    numbers: dict[int, int] = {}
    units = [numbers.setdefault(find(k), len(numbers)) for k in range(len(group.roots))]
    return ChannelTies(units, pieces)
