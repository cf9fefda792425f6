"""Pruning methods as small strategy objects (like ``torch.nn.utils.prune``), plus helpers to apply boolean masks.

Each method has one abstract method, :meth:`PruningMethod.compute_mask`, returning a boolean keep-mask of the
weight's shape. Masks are applied to the weights in place: the model's ``state_dict`` keeps the user's keys (no
``weight_orig``/``weight_mask`` reparametrisation); the caller stores masks where it keeps state.

>>> w = torch.tensor([[0.1, -0.4], [0.3, -0.2]])
>>> mask = Magnitude(sparsity=0.5)(w)
>>> apply_mask(w, mask); w
tensor([[ 0.0000, -0.4000],
        [ 0.3000,  0.0000]])
>>> sparsity(mask)
0.5
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_compress.pruning.criteria import (
    check_sparsity,
    expand_mask,
    magnitude_mask,
    splicing_mask,
    threshold_mask,
)
from lightning_compress.pruning.structured import check_p, filter_mask, kernel_mask, vector_mask

__all__ = [
    "GRANULARITIES",
    "FilterNorm",
    "Magnitude",
    "PruningMethod",
    "Splicing",
    "Structured",
    "Threshold",
    "apply_mask",
    "sparsity",
]

GRANULARITIES = ("element", "vector", "kernel", "filter")


class PruningMethod(ABC):
    """Strategy interface: compute a boolean keep-mask for a weight tensor (public override point)."""

    @abstractmethod
    def compute_mask(self, weight: Tensor, previous_mask: Tensor | None = None) -> Tensor:
        """Keep-mask (``True`` keeps) of ``weight``'s shape; ``previous_mask`` is the mask currently applied."""

    def __call__(self, weight: Tensor, previous_mask: Tensor | None = None) -> Tensor:
        return self.compute_mask(weight, previous_mask)


@dataclass(frozen=True)
class Magnitude(PruningMethod):
    """Prune the ``round(sparsity * n)`` smallest ``|w|`` of a layer (unstructured)."""

    sparsity: float

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)

    def compute_mask(self, weight: Tensor, previous_mask: Tensor | None = None) -> Tensor:
        return magnitude_mask(weight, self.sparsity)


@dataclass(frozen=True)
class Threshold(PruningMethod):
    """Prune every weight with ``|w| < threshold``."""

    threshold: float

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}.")

    def compute_mask(self, weight: Tensor, previous_mask: Tensor | None = None) -> Tensor:
        return threshold_mask(weight, self.threshold)


@dataclass(frozen=True)
class Structured(PruningMethod):
    """Prune the lowest-Lp-norm vectors, kernels or filters of a layer.

    Args:
        sparsity: fraction of units removed, in ``[0, 1)``.
        granularity: ``"element"``, ``"vector"``, ``"kernel"`` or ``"filter"``.
        p: norm order, 1 or 2.
    """

    sparsity: float
    granularity: str = "filter"
    p: int = 2

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        check_p(self.p)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}.")

    def compute_mask(self, weight: Tensor, previous_mask: Tensor | None = None) -> Tensor:
        if self.granularity == "element":
            return magnitude_mask(weight, self.sparsity)
        if self.granularity == "vector":
            return vector_mask(weight, self.sparsity, self.p)
        if self.granularity == "kernel":
            return kernel_mask(weight, self.sparsity, self.p)
        return expand_mask(filter_mask(weight, self.sparsity, self.p), weight.shape)


@dataclass(frozen=True)
class FilterNorm(Structured):
    """Soft/hard filter pruning criterion (Li et al. 2017; He et al. 2018): lowest Lp-norm filters."""

    granularity: str = "filter"


@dataclass(frozen=True)
class Splicing(PruningMethod):
    """Dynamic Network Surgery's ``h(w)`` with thresholds ``a < b`` (Guo et al. 2016).

    Call it on the *unmasked* weights so that pruned weights can come back.
    """

    a: float
    b: float

    def __post_init__(self) -> None:
        if not 0 <= self.a < self.b:
            raise ValueError(f"Splicing needs thresholds 0 <= a < b, got a={self.a!r}, b={self.b!r}.")

    def compute_mask(self, weight: Tensor, previous_mask: Tensor | None = None) -> Tensor:
        return splicing_mask(weight, self.a, self.b, previous_mask)


def apply_mask(weight: Tensor, mask: Tensor) -> None:
    """Zero, in place and without autograd, the entries of ``weight`` where ``mask`` is ``False``."""
    with torch.no_grad():
        weight.masked_fill_(~mask.bool(), 0)


def sparsity(masks: Tensor | Iterable[Tensor]) -> float:
    """Fraction of ``False`` entries over one mask or several (or of zeros over weight tensors)."""
    tensors = [masks] if isinstance(masks, Tensor) else list(masks)
    total = sum(t.numel() for t in tensors)
    if total == 0:
        return 0.0
    zeros = sum(int((t == 0).sum()) for t in tensors)
    return zeros / total
