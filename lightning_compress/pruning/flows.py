"""Helpers for the three pruning flows (train -> prune -> fine-tune; prune while training -> fine-tune; prune ->
train from scratch): fresh initialisation and weight rewinding of a pruned architecture. Pure torch.

Liu et al. (ICLR 2019) found that for structured pruning a pruned architecture trained from scratch often matches
fine-tuning; Renda et al. (ICLR 2020) that rewinding the kept weights to an early point of training beats plain
fine-tuning. The recipes are in the README ("Pruning flows") and ``examples/prune_digits.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from lightning_compress.graph.compact import compact, zero_bn_for_pruned_filters, zero_filter_indices
from lightning_compress.pruning.groups import prune_filter_groups


def reinitialize(model: nn.Module, seed: int | None = None) -> nn.Module:
    """A copy of ``model`` (same, possibly compacted, architecture) with freshly initialised parameters.

    >>> layer = nn.Linear(3, 2)
    >>> fresh = reinitialize(layer, seed=0)
    >>> fresh.weight.shape == layer.weight.shape and not torch.equal(fresh.weight, layer.weight)
    True
    """
    fresh = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        reset_statistics = getattr(module, "reset_running_stats", None)
        if callable(reset_statistics):
            reset_statistics()
    return fresh


def rewind(pruned: nn.Module, early_state: Mapping[str, torch.Tensor], example_inputs: Any) -> nn.Module:
    """The compact architecture of ``pruned`` carrying the weights of ``early_state`` on the kept channels.

    ``pruned`` is the masked (not yet compacted) model whose zero filters define the architecture; ``early_state``
    a ``state_dict`` of the same dense model saved early in training (Renda et al. 2020 rewind to a small fraction of
    training). Filters zero in ``pruned`` are zeroed in the rewound copy, with their BatchNorm scale and shift, and
    the copy is compacted.
    """
    model = copy.deepcopy(pruned)
    model.load_state_dict(early_state)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, rows in zero_filter_indices(pruned).items():
            modules[name].weight[rows] = 0
            if modules[name].bias is not None:
                modules[name].bias[rows] = 0
    zero_bn_for_pruned_filters(model, example_inputs)
    return cast(nn.Module, compact(model, example_inputs))


def pruned_architecture(model: nn.Module, sparsity: float, example_inputs: Any, seed: int | None = None) -> nn.Module:
    """The compact architecture ``FilterPruning(sparsity)`` leaves of ``model`` (the same channel counts: every free
    dependency group but the output's loses ``round(sparsity * n)`` channels), freshly initialised: the reference
    a pruned network is measured against (Liu et al. 2019, "train from scratch"). ``model`` is left untouched. A
    LayerNorm over pruned channels becomes a plain one over the kept channels (``layernorm_statistics="kept"``): the
    network as if built that wide.

    >>> from lightning_compress.demo import PlainCNN
    >>> small = pruned_architecture(PlainCNN(width=10), 0.4, torch.randn(2, 1, 8, 8))
    >>> [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    [6, 12, 12]
    """
    copy_ = copy.deepcopy(model)
    prune_filter_groups(copy_, example_inputs, sparsity, layernorm_statistics="kept")
    return reinitialize(cast(nn.Module, compact(copy_, example_inputs)), seed)
