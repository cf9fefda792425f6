"""Keep training after compaction: swap the replaced parameters in an optimizer and slice their state.

After :func:`~lightning_compress.graph.compact` with ``inplace=True`` the optimizer still holds the old, larger
tensors. :func:`slice_optimizer_state` puts the new parameters in their place and keeps the per-parameter state
(momentum buffers, Adam moments) of the surviving entries, so fine-tuning continues where it stopped.

>>> from torch import nn
>>> from lightning_compress.graph.compact import compact
>>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> model(torch.randn(5, 3)).sum().backward(); optimizer.step()
>>> with torch.no_grad():
...     model[0].weight[1] = 0; model[0].bias[1] = 0
>>> _, plan = compact(model, torch.randn(2, 3), inplace=True, return_plan=True)
>>> slice_optimizer_state(optimizer, plan.replacements)
>>> [tuple(optimizer.state[p]["momentum_buffer"].shape) for p in model.parameters()]
[(3, 3), (3,), (2, 3), (2,)]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_compress.graph.compact import Replacement

__all__ = ["slice_optimizer_state"]


def _slice(value: Any, index: tuple[Tensor, ...], shape: torch.Size) -> Any:
    if not isinstance(value, Tensor) or value.shape != shape:
        return value  # e.g. Adam's step counter
    for dim, keep in enumerate(index):
        value = value.index_select(dim, keep.to(value.device))
    return value.clone()


def slice_optimizer_state(optimizer: torch.optim.Optimizer, replacements: Iterable[Replacement]) -> None:
    """Replace old parameters by new ones in ``optimizer``'s groups and slice their state to match, in place.

    A bias created by compaction (no old parameter) joins the group of its layer's weight, with fresh state.
    """
    replacements = list(replacements)
    by_old = {id(r.old): r for r in replacements if r.old is not None}
    new_by_layer = {(r.module, r.name): r.new for r in replacements}
    for group in optimizer.param_groups:
        params = group["params"]
        for i, param in enumerate(params):
            replacement = by_old.get(id(param))
            if replacement is None:
                continue
            params[i] = replacement.new
            state = optimizer.state.pop(param, None)
            if state is not None:
                optimizer.state[replacement.new] = {
                    key: _slice(value, replacement.index, param.shape) for key, value in state.items()
                }
    for r in replacements:
        if r.old is None:
            weight = new_by_layer.get((r.module, "weight"))
            for group in optimizer.param_groups:
                if any(p is weight for p in group["params"]):
                    group["params"].append(r.new)
                    break
