"""Pruning criteria: scores and boolean keep-masks (``True`` keeps a weight), pure functions on weight tensors.

Weights are laid out as PyTorch stores them: ``Linear`` ``(out, in)``, ``Conv1d`` ``(out, in/groups, k)``, ``Conv2d``
``(out, in/groups, kh, kw)``. Ties are broken deterministically: among equal scores the lower flat index is pruned
first (a stable sort).

>>> w = torch.tensor([[0.1, -0.4], [0.3, -0.2]])
>>> magnitude_mask(w, 0.5)
tensor([[False,  True],
        [ True, False]])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_compress.utils.rounding import round_count

__all__ = [
    "check_sparsity",
    "check_splicing_decay",
    "expand_mask",
    "global_magnitude_masks",
    "lowest_k_mask",
    "magnitude_mask",
    "num_pruned",
    "splicing_mask",
    "splicing_probability",
    "splicing_thresholds",
    "threshold_mask",
]


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float, or raise ``ValueError`` if it is outside ``[0, 1)``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}.")
    return float(sparsity)


def num_pruned(sparsity: float, n: int, rounding: str = "nearest") -> int:
    """How many of ``n`` units a ``sparsity`` removes: ``round(sparsity * n)``, halves rounded up; ``rounding="up"``
    removes at least the rate (Torch-Pruning's ``n - floor(n * (1 - sparsity))``), ``"down"`` at most.

    >>> num_pruned(0.25, 10), num_pruned(0.5, 5), num_pruned(0.4, 8, "up"), num_pruned(0.4, 8, "down")
    (3, 3, 4, 3)
    """
    return min(round_count(check_sparsity(sparsity) * n, rounding), n)


def lowest_k_mask(scores: Tensor, k: int) -> Tensor:
    """Keep-mask of ``scores``' shape with the ``k`` lowest scores ``False`` (ties: lower flat index first)."""
    flat = scores.detach().reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, stable=True).indices
        keep[order[:k]] = False
    return keep.view(scores.shape)


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Unstructured magnitude mask of one layer: the ``round(sparsity * n)`` smallest ``|w|`` are pruned.

    Raises:
        ValueError: if ``sparsity`` is outside ``[0, 1)``.
    """
    return lowest_k_mask(weight.abs(), num_pruned(sparsity, weight.numel()))


def global_magnitude_masks(weights: Mapping[str, Tensor] | Sequence[Tensor], sparsity: float) -> dict | list:
    """Magnitude masks with one ranking over all tensors (global pruning); the same container type comes back.

    >>> masks = global_magnitude_masks({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0, 3.0])}, 0.5)
    >>> masks["a"].tolist(), masks["b"].tolist()
    ([False, True], [False, True])
    """
    items = list(weights.items()) if isinstance(weights, Mapping) else list(enumerate(weights))
    if not items:
        raise ValueError("global_magnitude_masks needs at least one weight tensor, got none.")
    flat = torch.cat([w.detach().abs().reshape(-1).to(torch.float64) for _, w in items])
    keep = lowest_k_mask(flat, num_pruned(sparsity, flat.numel()))
    masks, offset = {}, 0
    for key, w in items:
        masks[key] = keep[offset : offset + w.numel()].view(w.shape).to(w.device)
        offset += w.numel()
    return masks if isinstance(weights, Mapping) else [masks[i] for i in range(len(items))]


def threshold_mask(weight: Tensor, threshold: float) -> Tensor:
    """Keep ``|w| >= threshold`` (prune weights whose magnitude is below a fixed threshold).

    Raises:
        ValueError: if ``threshold`` is negative.

    >>> threshold_mask(torch.tensor([0.1, -0.5, 0.2]), 0.2).tolist()
    [False, True, True]
    """
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}.")
    return weight.detach().abs() >= threshold


def expand_mask(unit_mask: Tensor, shape: Sequence[int]) -> Tensor:
    """Broadcast a mask over leading dimensions (filters, kernels, vectors) to a full weight ``shape``.

    >>> expand_mask(torch.tensor([True, False]), (2, 3)).tolist()
    [[True, True, True], [False, False, False]]
    """
    trailing = (1,) * (len(shape) - unit_mask.dim())
    return unit_mask.reshape(*unit_mask.shape, *trailing).expand(*shape).clone()


# Dynamic Network Surgery (Guo, Yao & Chen, NeurIPS 2016) ---------------------------------------------------------


def splicing_mask(weight: Tensor, a: float, b: float, previous_mask: Tensor | None = None) -> Tensor:
    """The splicing mask function ``h(w)`` of Dynamic Network Surgery (Guo et al. 2016).

    ``h(w) = 0`` if ``|w| < a``; the previous mask value if ``a <= |w| < b``; ``1`` if ``|w| >= b``. Without a
    previous mask, weights in the band are kept.

    Raises:
        ValueError: if ``a >= b`` or ``a < 0``.

    >>> splicing_mask(torch.tensor([0.1, 0.5, 0.5, 0.9]), 0.3, 0.7, torch.tensor([1, 1, 0, 0]).bool()).tolist()
    [False, True, False, True]
    """
    if not 0 <= a < b:
        raise ValueError(f"Splicing needs thresholds 0 <= a < b, got a={a!r}, b={b!r}.")
    magnitude = weight.detach().abs()
    previous = torch.ones_like(magnitude, dtype=torch.bool) if previous_mask is None else previous_mask.bool()
    return (magnitude >= b) | (previous & (magnitude >= a))


def splicing_thresholds(weight: Tensor, c: float = 0.0, mask: Tensor | None = None) -> tuple[float, float]:
    """Thresholds of the official DNS code: ``a = 0.9 t``, ``b = 1.1 t`` with ``t = max(mu + c sigma, 0)``.

    ``mu`` and ``sigma`` are the mean and (population) standard deviation of ``|w|`` over the non-zero weights, or
    over the weights where ``mask`` is set.

    Raises:
        ValueError: if ``mu + c sigma <= 0`` (the band would be empty; pick a larger ``c``).

    >>> splicing_thresholds(torch.tensor([1.0, -3.0]), c=0.0)
    (1.8, 2.2)
    """
    magnitude = weight.detach().abs().to(torch.float64)
    selected = magnitude[mask.bool()] if mask is not None else magnitude[magnitude != 0]
    if selected.numel() == 0:
        raise ValueError("splicing_thresholds needs at least one non-zero (or unmasked) weight, got none.")
    mu, sigma = selected.mean().item(), selected.std(unbiased=False).item()
    t = max(mu + c * sigma, 0.0)
    if t <= 0:
        raise ValueError(f"mu + c*sigma = {mu + c * sigma:.4g} <= 0 for c={c!r}: a and b would be 0; use a larger c.")
    return round(0.9 * t, 12), round(1.1 * t, 12)


def splicing_probability(iteration: int, gamma: float = 1e-4, power: float = 1.0) -> float:
    """Probability of a mask update at ``iteration`` in the DNS code: ``(1 + gamma * iteration) ** -power``.

    >>> splicing_probability(10_000, gamma=1e-4, power=1.0)
    0.5
    """
    check_splicing_decay(gamma, power)
    return (1.0 + gamma * iteration) ** -power


def check_splicing_decay(gamma: float, power: float) -> None:
    """Raise ``ValueError`` unless ``gamma`` and ``power`` are finite numbers >= 0."""
    for name, value in (("gamma", gamma), ("power", power)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"Splicing needs a finite {name} >= 0, got {name}={value!r}.")
