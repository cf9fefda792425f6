"""How a target sparsity is shared among layers: pure functions of the layers' weight shapes.

>>> shares = erk_sparsities({"first": (16, 1, 3, 3), "wide": (64, 64, 3, 3)}, 0.8)
>>> shares["first"], round(shares["wide"], 4)
(0.0, 0.8031)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_compress.pruning.criteria import check_sparsity

__all__ = ["erk_sparsities"]


def erk_sparsities(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
    """Per-layer sparsities of the Erdős-Rényi-Kernel distribution (Evci et al., "Rigging the Lottery", ICML 2020).

    A layer's density is proportional to ``sum(shape) / prod(shape)`` (``(n_in + n_out + k_h + k_w) /
    (n_in n_out k_h k_w)`` for a convolution, ``(n_in + n_out) / (n_in n_out)`` for a linear layer), scaled so that
    the layers together keep ``1 - sparsity`` of their weights. Layers whose density would exceed 1 stay dense and
    the others are scaled again (as in the paper's code), so small layers (a first convolution, a depthwise
    convolution) keep most of their weights and large ones give up more; no layer is emptied.

    Raises:
        ValueError: for a sparsity outside [0, 1) or no shapes.
    """
    check_sparsity(sparsity)
    if not shapes:
        raise ValueError("erk_sparsities needs at least one weight shape, got none.")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    scores = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    budget = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        rest = [name for name in sizes if name not in dense]
        if not rest:
            return dict.fromkeys(sizes, 0.0)
        scale = (budget - sum(sizes[name] for name in dense)) / sum(scores[name] * sizes[name] for name in rest)
        over = {name for name in rest if scale * scores[name] >= 1.0}
        if not over:
            return {name: 0.0 if name in dense else 1.0 - scale * scores[name] for name in sizes}
        dense |= over
