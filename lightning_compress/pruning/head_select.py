"""Which heads and feed-forward neurons to keep, from their scores: per layer or by one global ranking. Pure torch.

Global ranking compares units of different layers after dividing each layer's scores by their L2 norm, as Michel
et al. (NeurIPS 2019) do for head importance (and Molchanov et al., ICLR 2017, for Taylor scores), so no layer's
scale dominates. Every layer keeps at least ``min_units`` units (a layer without heads cannot run its reshape).
"""

from __future__ import annotations

import math

import torch


def units_to_prune(units: int, rate: float, min_units: int = 1) -> int:
    """``round(rate * units)``, at most ``units - min_units``.

    >>> units_to_prune(4, 0.5), units_to_prune(4, 1.0), units_to_prune(12, 0.3)
    (2, 3, 4)
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}.")
    return max(0, min(math.floor(rate * units + 0.5), units - min_units))


def _ranked_keep(scores: torch.Tensor, prune: int, previous: torch.Tensor | None) -> torch.Tensor:
    scores = scores.clone().float()
    if previous is not None:  # hard: already pruned units rank lowest and stay pruned
        scores[~previous] = float("-inf")
        prune = max(prune, int((~previous).sum()))
    keep = torch.ones(len(scores), dtype=torch.bool)
    if prune:
        keep[torch.argsort(scores, stable=True)[:prune]] = False
    return keep


def select_units(scores: dict[str, torch.Tensor], rate: float, scope: str = "layer", min_units: int = 1,
                 previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks, one per group, pruning the fraction ``rate`` of the units (lowest scores first).

    Args:
        scores: per group, one score per unit (higher: more important).
        rate: fraction of units to prune (of each group with ``scope="layer"``, of all groups with ``"global"``).
        scope: ``"layer"`` or ``"global"``.
        min_units: units every group keeps.
        previous: hard mode: the current keep-masks; pruned units stay pruned.

    >>> keep = select_units({"a": torch.tensor([1., 3., 2., 4.]), "b": torch.tensor([9., 1.])}, 0.5)
    >>> keep["a"].tolist(), keep["b"].tolist()
    ([False, True, False, True], [True, False])
    >>> keep = select_units({"a": torch.tensor([1., 2., 3., 4.]), "b": torch.tensor([1., 100.])}, 0.5, "global")
    >>> keep["a"].tolist(), keep["b"].tolist()
    ([False, False, True, True], [False, True])
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
    previous = previous or {}
    if scope == "layer":
        return {name: _ranked_keep(s, units_to_prune(len(s), rate, min_units), previous.get(name))
                for name, s in scores.items()}
    names = list(scores)
    normed = []
    for name in names:
        s = scores[name].float()
        s = s / s.norm().clamp_min(1e-12)
        if name in previous:
            s = s.masked_fill(~previous[name], float("-inf"))
        normed.append(s)
    flat = torch.cat(normed)
    total = units_to_prune(len(flat), rate, 0)
    protected = torch.zeros(len(flat), dtype=torch.bool)  # each group's best min_units are never candidates
    start = 0
    for s in normed:
        protected[start + torch.argsort(s, descending=True, stable=True)[:min_units]] = True
        start += len(s)
    candidates = torch.nonzero(~protected).view(-1)
    order = candidates[torch.argsort(flat[candidates], stable=True)]
    keep_flat = torch.ones(len(flat), dtype=torch.bool)
    keep_flat[order[:min(total, len(order))]] = False
    keep_flat[torch.isinf(flat) & (flat < 0)] = False
    return dict(zip(names, torch.split(keep_flat, [len(s) for s in normed]), strict=True))
