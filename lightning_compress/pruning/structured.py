"""Structured criteria: vector, kernel, filter and channel scores by norm, and the masks they give.

Granularities (the lecture's list): a *vector* is one row inside a kernel (``w[o, i, r, :]``), a *kernel* one
``k x k`` kernel of an (output, input) pair (``w[o, i]``), a *filter* one output channel (``w[o]``), a *channel* one
input channel of the consumer (``w[:, i]``). For a ``Linear`` weight ``(out, in)`` a vector and a kernel are single
weights; for ``Conv1d`` a vector is the whole kernel. Filter Lp norms follow Li et al. 2017 and Soft Filter Pruning
(He et al., IJCAI 2018).

>>> w = torch.zeros(3, 2, 3, 3); w[0] = 1.0; w[2] = 0.5
>>> filter_norms(w, p=1).tolist()
[18.0, 0.0, 9.0]
>>> filter_mask(w, 0.34).tolist()
[True, False, True]
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_compress.pruning.criteria import expand_mask, lowest_k_mask, num_pruned

__all__ = [
    "channel_norms",
    "check_p",
    "filter_mask",
    "filter_norms",
    "filters_to_prune",
    "kernel_mask",
    "kernel_scores",
    "structured_mask",
    "vector_mask",
    "vector_scores",
    "zero_filters",
]


def check_p(p: int | float) -> int:
    """Return the norm order ``p`` or raise ``ValueError`` unless it is 1 or 2."""
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"p must be 1 or 2 (L1 or L2 norm), got p={p!r}.")
    return int(p)


def _norm(x: Tensor, dims: tuple[int, ...], p: int) -> Tensor:
    x = x.detach()
    if not dims:
        return x.abs()
    return x.abs().sum(dim=dims) if check_p(p) == 1 else x.pow(2).sum(dim=dims).sqrt()


def vector_scores(weight: Tensor, p: int = 2) -> Tensor:
    """Lp norm of every row inside a kernel: shape ``weight.shape[:-1]`` (``|w|`` for a ``Linear`` weight).

    >>> vector_scores(torch.tensor([[[[3.0, 4.0], [0.0, 1.0]]]])).tolist()
    [[[5.0, 1.0]]]
    """
    if weight.dim() <= 2:
        return _norm(weight, (), check_p(p))
    return _norm(weight, (weight.dim() - 1,), p)


def kernel_scores(weight: Tensor, p: int = 2) -> Tensor:
    """Lp norm of every kernel ``w[o, i]``: shape ``(out, in/groups)`` (``|w|`` for a ``Linear`` weight)."""
    return _norm(weight, tuple(range(2, weight.dim())), check_p(p))


def filter_norms(weight: Tensor, p: int = 2) -> Tensor:
    """Lp norm ``||F_o||_p`` of every filter (output channel) over ``(in, k...)``: shape ``(out,)``."""
    return _norm(weight, tuple(range(1, weight.dim())), check_p(p))


def channel_norms(weight: Tensor, p: int = 2, groups: int = 1) -> Tensor:
    """Lp norm of every *input* channel of a consumer weight over ``(out, k...)``: shape ``(in,)``.

    For a grouped convolution input channel ``g * (in/groups) + j`` is read only by the filters of group ``g``.

    >>> channel_norms(torch.tensor([[1.0, 0.0], [1.0, 2.0]]), p=1).tolist()
    [2.0, 2.0]
    """
    p = check_p(p)
    out, per_group = weight.shape[0], weight.shape[1]
    if groups < 1 or out % groups:
        raise ValueError(f"groups must divide the {out} output channels, got groups={groups!r}.")
    grouped = weight.detach().reshape(groups, out // groups, per_group, -1)
    return _norm(grouped, (1, 3), p).reshape(groups * per_group)


def structured_mask(scores: Tensor, sparsity: float, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Prune the ``round(sparsity * n)`` lowest-scoring units and expand the keep-mask to the weight ``shape``."""
    return expand_mask(lowest_k_mask(scores, num_pruned(sparsity, scores.numel())), shape)


def vector_mask(weight: Tensor, sparsity: float, p: int = 2) -> Tensor:
    """Full-shape keep-mask pruning the lowest-norm vectors (rows inside kernels) of a layer."""
    return structured_mask(vector_scores(weight, p), sparsity, weight.shape)


def kernel_mask(weight: Tensor, sparsity: float, p: int = 2) -> Tensor:
    """Full-shape keep-mask pruning the lowest-norm kernels of a layer.

    >>> kernel_mask(torch.arange(4.0).reshape(2, 2, 1, 1), 0.5).flatten().tolist()
    [False, False, True, True]
    """
    return structured_mask(kernel_scores(weight, p), sparsity, weight.shape)


def filters_to_prune(scores: Tensor, sparsity: float, rounding: str = "nearest") -> int:
    """Number of filters a rate removes from ``scores.numel()`` (:func:`num_pruned`); refuses a rate that removes
    every filter.

    Raises:
        ValueError: if ``sparsity`` is outside ``[0, 1)``, ``rounding`` unknown, or all filters would go.
    """
    n = scores.numel()
    k = num_pruned(sparsity, n, rounding)
    if k >= n:
        bound = {"nearest": f"< {(n - 0.5) / n:.4g}", "up": f"<= {(n - 1) / n:.4g}"}.get(rounding, "< 1")
        raise ValueError(
            f"sparsity={sparsity!r} would remove every filter of a layer with {n} filters "
            f"({sparsity!r} * {n} rounded {rounding} = {k}); allowed: sparsity {bound} for this layer."
        )
    return k


def filter_mask(weight: Tensor, sparsity: float, p: int = 2, scores: Tensor | None = None) -> Tensor:
    """Keep-mask of shape ``(out,)`` pruning the ``round(sparsity * out)`` filters of lowest Lp norm.

    ``scores`` overrides the norms (e.g. joint scores of a dependency group).

    Raises:
        ValueError: for ``p`` not in {1, 2}, ``sparsity`` outside ``[0, 1)`` or a rate removing every filter.
    """
    scores = filter_norms(weight, p) if scores is None else scores
    return lowest_k_mask(scores, filters_to_prune(scores, sparsity))


def zero_filters(weight: Tensor, keep: Tensor, bias: Tensor | None = None) -> None:
    """Zero, in place, the filters (and bias entries) where the ``(out,)`` keep-mask is ``False``."""
    with torch.no_grad():
        weight[~keep] = 0
        if bias is not None:
            bias[~keep] = 0
