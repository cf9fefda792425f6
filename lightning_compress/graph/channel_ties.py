"""Constraints between the distinct channels of a group: which go together, which pieces lose equally many. Pure torch.

Two operations let channels go only in patterns, not one by one (see
:mod:`~lightning_compress.graph.dependency`):

- viewing the channels as ``(groups, per group)`` (a channel shuffle, ``x.view(b, g, c // g, h, w)``) or a grouped
  convolution: after compaction the same formula must map the kept channels to the same relative places, so the
  same positions go from every group. Such channels form a *unit*, pruned (and scored) together;
- an equal split (``chunk``, ``split``, ``tensor_split``) cuts the compacted tensor at its new middle: every piece
  must lose equally many channels (a *balance*), though not necessarily at the same positions.

A network that splits a shuffled tensor in halves again and again (ShuffleNetV2) would collapse into one channel if
both were taken as "the same channel"; as units and balances its stages keep their positions apart. A selection is
searched exactly among the balanced ones (units alike for every balance are interchangeable, so it chooses how many
of each kind go), greedily repaired where that search grows too large. A stage too deep for any balanced selection
but the whole (torchvision's ``shufflenet_v2_x1_0``, stage 3: seven chunks) is pruned by reordering filters instead
(:mod:`~lightning_compress.graph.channel_routes`, tried first where ``ChannelTies.routes`` is set).

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

from lightning_compress.utils.rounding import check_rounding

__all__ = ["ChannelTies", "balance_units", "exact_units", "greedy_units", "group_ties", "pick", "tied_keep_mask",
           "tied_removal", "unit_classes"]

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
    routes: Any = None  # the group's channel_routes.Routes, where filters may be reordered instead

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


#: States (partial imbalance and count) the exact search may hold after a class before it gives way to the greedy.
STATE_CAP = 50_000
#: Candidates (states times choices of the next class) the exact search may expand in all, for time and memory.
WORK_CAP = 1_000_000


def unit_classes(coef: Tensor, sizes: Tensor, mean: Tensor) -> list[list[int]]:
    """Units grouped by coefficient column and size (interchangeable for every balance), each class ordered by mean
    score (then index); the classes by number of units (then first unit), so the large ones come last."""
    members: dict[tuple[int, ...], list[int]] = {}
    for u, key in enumerate(torch.cat((coef, sizes.unsqueeze(0))).t().tolist()):
        members.setdefault(tuple(key), []).append(u)
    score = mean.tolist()
    classes = [sorted(units, key=lambda u: (score[u], u)) for units in members.values()]
    return sorted(classes, key=lambda units: (len(units), min(units)))


def pick(counts: Tensor, costs: Tensor, k: int, rounding: str, total: int) -> int:
    """Index of the selection (``counts`` channels, ``costs`` summed scores) that ``rounding`` prefers: closest to
    ``k`` ("nearest"), the least ``>= k`` ("up") or the most ``<= k`` ("down"), then of least cost; never the whole
    group (``total`` channels) unless it is empty. "up" and "down" without such a selection take the nearest."""
    allowed = (counts < total) | (counts == 0)
    side = counts >= k if rounding == "up" else counts <= k if rounding == "down" else allowed
    if bool((allowed & side).any()):
        allowed = allowed & side
    distance = torch.where(allowed, (counts - k).abs(), torch.iinfo(torch.long).max)
    order = torch.sort(counts, stable=True).indices  # last resort: the smaller count, for determinism
    order = order[torch.sort(costs.double()[order], stable=True).indices]
    order = order[torch.sort(distance[order], stable=True).indices]
    return int(order[0])


def _state_keys(states: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """One integer per row of ``states`` (columns within ``low..high``), equal only for equal rows: mixed radix,
    renumbered densely before it would pass 62 bits (sorting rows themselves is far slower)."""
    key, span = torch.zeros(len(states), dtype=torch.long), 1
    for column, radix in enumerate((high - low + 1).tolist()):
        if radix == 1:
            continue
        if span * radix >= 2 ** 62:
            key, span = torch.unique(key, return_inverse=True)[1], len(states)
        key, span = key * radix + states[:, column] - low[column], span * radix
    return key


def _first_of_each(key: Tensor, values: Tensor) -> Tensor:
    """Per distinct ``key``, the index of its least value (the earliest on ties)."""
    order = torch.sort(values, stable=True).indices
    order = order[torch.sort(key[order], stable=True).indices]
    first = torch.ones(len(order), dtype=torch.bool)
    first[1:] = key[order][1:] != key[order][:-1]
    return order[first]


def exact_units(coef: Tensor, sizes: Tensor, mean: Tensor, k: int, rounding: str = "nearest",
                cap: int = STATE_CAP) -> Tensor | None:
    """The balanced selection of units (bool, ``coef @ pruned == 0``) :func:`pick` prefers among all: per class of
    :func:`unit_classes` a number of its lowest units, found by dynamic programming over the classes on states
    ``(imbalance per balance, count)`` of least cost (``mean * sizes`` summed); a state the classes still to come
    cannot balance is dropped. ``None`` when more than ``cap`` states remain after a class, or more than
    ``WORK_CAP`` candidates are expanded in all."""
    classes = unit_classes(coef, sizes, mean)
    balances, total = coef.shape[0], int(sizes.sum())
    cost = mean.double() * sizes
    steps, history, work = [], [], 0
    low = torch.zeros(len(classes) + 1, balances, dtype=torch.long)  # reach of the classes from the i-th on
    high = torch.zeros_like(low)
    for i in reversed(range(len(classes))):
        span = coef[:, classes[i][0]] * len(classes[i])
        low[i], high[i] = low[i + 1] + span.clamp(max=0), high[i + 1] + span.clamp(min=0)
    states = torch.zeros(1, balances + 1, dtype=torch.long)  # imbalance per balance, then pruned channels
    values = torch.zeros(1, dtype=torch.float64)
    for i, units in enumerate(classes):
        n = torch.arange(len(units) + 1)
        work += len(states) * len(n)
        if len(states) > cap or work > WORK_CAP:
            return None
        step = torch.cat((coef[:, units[0]], sizes[units[0]].view(1))).unsqueeze(0) * n.unsqueeze(1)
        prefix = torch.cat((torch.zeros(1, dtype=torch.float64), cost[units].cumsum(0)))
        states = (states.unsqueeze(1) + step).flatten(0, 1)
        values = (values.unsqueeze(1) + prefix).flatten()
        least = torch.cat((-high[i + 1], torch.zeros(1, dtype=torch.long)))  # bounds of a state that can balance
        most = torch.cat((-low[i + 1], torch.tensor([total])))
        fits = ((states >= least) & (states <= most)).all(1).nonzero().squeeze(1)
        if i + 1 < len(classes):
            fits = fits[_first_of_each(_state_keys(states[fits], least, most), values[fits])]
        states, values = states[fits], values[fits]
        steps.append(len(n))
        history.append(fits)
    at = pick(states[:, balances], values, k, rounding, total)
    pruned = torch.zeros(len(sizes), dtype=torch.bool)
    for units, options, fits in zip(reversed(classes), reversed(steps), reversed(history), strict=True):
        at, chosen = divmod(int(fits[at]), options)
        pruned[units[:chosen]] = True
    return pruned


def greedy_units(mean: Tensor, sizes: Tensor, coef: Tensor, k: int, rounding: str = "nearest",
                 tries: int = 8) -> Tensor:
    """A balanced selection of units near ``k`` channels: whole units of lowest mean score, repaired by
    :func:`balance_units`; the greedy start is aimed again (at most ``tries`` times) by the miss, and :func:`pick`
    chooses among the results."""
    order = torch.sort(mean, stable=True).indices.tolist()
    total = int(sizes.sum())
    found: list[Tensor] = []
    aims: set[int] = set()
    aim = k
    while len(aims) < max(tries, 1) and aim not in aims:
        aims.add(aim)
        pruned = torch.zeros(len(sizes), dtype=torch.bool)
        count = 0
        for u in order:
            size = int(sizes[u])
            if abs(count + size - aim) < abs(count - aim) and count + size < total:
                pruned[u], count = True, count + size
        found.append(balance_units(pruned, coef, sizes, mean, k))
        count = int((sizes * found[-1]).sum())
        if count == k:
            break
        aim = min(max(aim + k - count, 0), total - 1)
    counts = torch.stack([(sizes * p).sum() for p in found])
    costs = torch.stack([(mean.double() * sizes * p).sum() for p in found])
    return found[pick(counts, costs, k, rounding, total)]


def tied_keep_mask(scores: Tensor, k: int, ties: ChannelTies, tries: int = 8, rounding: str = "nearest") -> Tensor:
    """Keep-mask pruning about ``k`` channels in whole units, every balance held, never the whole group: the count
    ``rounding`` prefers ("nearest" to ``k``, the least ``>= k``: "up", the most ``<= k``: "down"), then the units
    of least summed score (:func:`exact_units`); where the exact search holds too many states, the greedy
    :func:`greedy_units` (``tries`` aims)."""
    check_rounding(rounding)
    routed = ties.routes.keep_mask(scores, k, rounding) if ties.routes is not None else None
    if routed is not None:
        return routed
    units = torch.tensor(ties.units, dtype=torch.long)
    sizes, coef = ties.sizes(), ties.coefficients()
    mean = torch.zeros(ties.num_units, dtype=torch.float64).index_add_(0, units, scores.double().cpu())
    mean = mean / sizes.clamp(min=1)
    pruned = exact_units(coef, sizes, mean, k, rounding)
    if pruned is None:
        pruned = greedy_units(mean, sizes, coef, k, rounding, tries)
    return ~pruned[units].to(scores.device)


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
