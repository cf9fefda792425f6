"""Filter groups for FilterPruning: the channels that must be scored, kept and pruned together.

A group ties the output channels of several layers (residual additions, depthwise convolutions, concatenations) as
found by :func:`lightning_compress.graph.dependency.filter_groups`; a plain layer is a group of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.graph.channel_ties import ChannelTies, tied_keep_mask
from lightning_compress.graph.layernorm_statistics import check_layernorm_statistics, exclude_channels
from lightning_compress.pruning.criteria import lowest_k_mask
from lightning_compress.pruning.structured import check_p, filters_to_prune
from lightning_compress.utils.rounding import check_rounding, round_count


@dataclass
class PrunableGroup:
    """Output channels shared by ``producers``; each mapping gives, per group channel, the layer's index or -1.

    Attributes:
        producers: layers whose filters are these channels.
        depthwise: depthwise convolutions carrying them (filter ``i`` reads channel ``i``).
        batchnorms: BatchNorm layers normalising them.
        layernorms: LayerNorms over them (their scale and shift zeroed with the BatchNorms').
        consumers: layers reading them, with the input indices of each channel (for channel scores).
    """

    producers: dict[str, torch.Tensor]
    depthwise: dict[str, torch.Tensor] = field(default_factory=dict)
    batchnorms: dict[str, torch.Tensor] = field(default_factory=dict)
    consumers: dict[str, list[list[int]]] = field(default_factory=dict)
    segments: list[tuple[int, int]] | ChannelTies | None = None  # (conv group, position) through a grouped
    # convolution; the channels that go together and the pieces that lose equally many through a shuffle or chunk
    layernorms: dict[str, torch.Tensor] = field(default_factory=dict)
    layernorm_dims: dict[str, int] = field(default_factory=dict)  # the channel dimension each LayerNorm reads

    @property
    def size(self) -> int:
        return len(next(iter(self.producers.values())))

    @property
    def name(self) -> str:
        return "+".join(self.producers)


def _indices(mapping: dict[str, list[int | None]]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([-1 if i is None else i for i in idx], dtype=torch.long) for name, idx in
            mapping.items()}


def from_dependency_group(group: object, layernorm_dims: dict[str, int] | None = None) -> PrunableGroup:
    """Convert a ``ChannelGroup`` of the dependency analysis (``layernorm_dims``: its graph's)."""
    norms = getattr(group, "layernorms", {})
    return PrunableGroup(
        producers=_indices(group.producers),  # type: ignore[attr-defined]
        depthwise=_indices(group.depthwise),  # type: ignore[attr-defined]
        batchnorms=_indices(group.batchnorms),  # type: ignore[attr-defined]
        consumers=dict(group.consumers),  # type: ignore[attr-defined]
        segments=getattr(group, "ties", None) or getattr(group, "segments", None),
        layernorms=_indices(norms),
        layernorm_dims={name: (layernorm_dims or {}).get(name, -1) for name in norms},
    )


def group_keep_mask(scores: torch.Tensor, k: int, segments: list[tuple[int, int]] | ChannelTies | None = None,
                    rounding: str = "nearest") -> torch.Tensor:
    """Keep-mask pruning the ``k`` lowest-scoring channels; through a grouped convolution (``segments``), the
    ``k / groups`` positions (rounded by ``rounding``) of lowest summed score go from every conv group
    (Torch-Pruning's rule); through a channel shuffle or an equal split (a
    :class:`~lightning_compress.graph.channel_ties.ChannelTies`), the balanced selection in whole units whose size is
    nearest ``k`` (``"up"``: the smallest at least ``k``; ``"down"``: the largest at most ``k``; ``tied_keep_mask``).

    >>> group_keep_mask(torch.tensor([1.0, 5.0, 2.0, 0.5]), 2, [(0, 0), (0, 1), (1, 0), (1, 1)]).tolist()
    [False, True, False, True]
    """
    if isinstance(segments, ChannelTies):
        return tied_keep_mask(scores, k, segments, rounding=rounding)
    if not segments:
        return lowest_k_mask(scores, k)
    position = torch.tensor([p for _, p in segments])
    groups = len({g for g, _ in segments})
    width = int(position.max()) + 1
    summed = torch.zeros(width, dtype=torch.float64).index_add_(0, position, scores.double())
    drop = lowest_k_mask(summed, min(round_count(k / groups, rounding), width - 1))
    return drop[position]



def _rows(weight: torch.Tensor, index: torch.Tensor, along: int) -> torch.Tensor:
    """Per group channel, the ``|w|^p``-ready slice sums; channels the layer lacks (-1) contribute 0."""
    valid = index >= 0
    picked = weight.detach().abs().movedim(along, 0)[index.clamp(min=0)].flatten(1)
    return picked * valid.unsqueeze(1)


def group_scores(group: PrunableGroup, modules: dict[str, Any], p: int, granularity: str = "filter"
                 ) -> torch.Tensor:
    """The Lp norm of all weights tied to each channel of ``group``.

    ``granularity="filter"`` scores the producers' filters (Li et al. 2017; He et al. 2018, on a group as in
    DepGraph, Fang et al. 2023); ``"channel"`` scores the consumers' input slices that read the channel, and a
    channel whose producing filters are all zero (pruned before, not regrown) scores 0: it is pruned already.
    """
    check_p(p)
    total = torch.zeros(group.size, dtype=torch.float64)
    if granularity == "filter":
        for name, index in group.producers.items():
            total += _rows(modules[name].weight, index, 0).double().pow(p).sum(dim=1)
    else:
        for name, reads in group.consumers.items():
            if name not in modules or getattr(modules[name], "groups", 1) != 1:
                continue  # the model output, or a grouped convolution whose inputs are not columns
            weight = modules[name].weight.detach().abs().double()
            for k, columns in enumerate(reads):
                if columns:
                    total[k] += weight[:, columns].pow(p).sum()
        total[dead_channels(group, modules)] = 0.0
    return total.pow(1.0 / p)


def dead_channels(group: PrunableGroup, modules: dict[str, Any]) -> torch.Tensor:
    """Channels of ``group`` whose every producing filter and bias entry is zero (what compaction removes)."""
    live = torch.zeros(group.size, dtype=torch.bool)
    produced = torch.zeros(group.size, dtype=torch.bool)
    for name, index in group.producers.items():
        module, valid = modules[name], index >= 0
        rows = module.weight.detach().flatten(1).ne(0).any(1)
        if isinstance(module.bias, torch.Tensor):
            rows = rows | module.bias.detach().ne(0)
        live |= rows.cpu()[index.clamp(min=0)] & valid
        produced |= valid
    return produced & ~live


def pruned_channel_masks(group: PrunableGroup, modules: dict[str, Any], keep: torch.Tensor, batchnorm: bool
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor, pruned)`` pairs for :meth:`torch.Tensor.masked_fill_`: producer and depthwise weights and biases
    and, with ``batchnorm``, BatchNorm and LayerNorm scales and shifts, each with a boolean mask shaped to broadcast
    over it."""
    drop = ~keep.to(torch.bool)
    mappings = [group.producers, group.depthwise] + ([group.batchnorms, group.layernorms] if batchnorm else [])
    pairs = []
    for mapping in mappings:
        for name, index in mapping.items():
            tensors = [t for t in (modules[name].weight, modules[name].bias) if isinstance(t, torch.Tensor)]
            if not tensors:
                continue  # a BatchNorm without affine parameters: nothing to zero
            rows = torch.zeros(tensors[0].shape[0], dtype=torch.bool)
            rows[index[drop & (index >= 0)]] = True
            if not rows.any():
                continue
            for tensor in tensors:
                pairs.append((tensor, rows.to(tensor.device).view(-1, *([1] * (tensor.dim() - 1)))))
    return pairs


def zero_group_channels(group: PrunableGroup, modules: dict[str, Any], keep: torch.Tensor,
                        batchnorm: bool) -> None:
    """Zero the pruned channels of ``group``: producer filters and biases, depthwise filters and, with
    ``batchnorm``, the BatchNorm and LayerNorm scale and shift."""
    with torch.no_grad():
        for tensor, pruned in pruned_channel_masks(group, modules, keep, batchnorm):
            tensor.masked_fill_(pruned, 0)


def set_layernorm_statistics(selections: list[tuple[PrunableGroup, torch.Tensor]], modules: dict[str, Any]) -> None:
    """Each LayerNorm over channels of the groups takes its statistics over the channels that the groups' keep
    masks keep (``layernorm_statistics="kept"``, :mod:`~lightning_compress.graph.layernorm_statistics`)."""
    excluded: dict[str, list[int]] = {}
    dims: dict[str, int] = {}
    for group, keep in selections:
        for name, index in group.layernorms.items():
            excluded.setdefault(name, []).extend(index[~keep.bool() & (index >= 0)].tolist())
            dims[name] = group.layernorm_dims.get(name, -1)
    exclude_channels(modules, excluded, dims)


def group_selection(group: PrunableGroup, masks: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The group's current keep mask, read from every producer's filter mask (a shuffle stage's or a
    concatenation's producers each carry their own channels of the group); ``None`` before any mask."""
    keep = torch.ones(group.size, dtype=torch.bool)
    for name, index in group.producers.items():
        mask = masks.get(name)
        if mask is None:
            return None
        valid = index >= 0
        keep[valid] = mask.cpu()[index[valid]]
    return keep


def producer_masks(group: PrunableGroup, keep: torch.Tensor, modules: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Each producer's filter mask for the group's keep mask (filters outside the group stay)."""
    masks = {}
    for name, index in group.producers.items():
        mask = torch.ones(modules[name].weight.shape[0], dtype=torch.bool)
        valid = index >= 0
        mask[index[valid]] = keep[valid]
        masks[name] = mask
    return masks


def prune_filter_groups(model: nn.Module, example_inputs: Any, sparsity: float, p: int = 2,
                        rounding: str = "nearest", layernorm_statistics: str = "all") -> int:
    """One-shot filter pruning without training: in every free dependency group of ``model`` (not the model
    output's), zero the ``round(sparsity * n)`` channels of lowest joint Lp norm (``rounding="up"``: Torch-Pruning's
    count, at least the rate), with their BatchNorm (and LayerNorm) scale and shift, so
    :func:`~lightning_compress.graph.compact` removes them. ``layernorm_statistics="kept"``: LayerNorms over pruned
    channels take their statistics over the kept ones (as Torch-Pruning's slicing; compaction then gives plain
    LayerNorms) instead of all (``"all"``: the outputs of the other channels do not change). Returns the number of
    channels zeroed.

    >>> from lightning_compress.demo import PlainCNN
    >>> prune_filter_groups(PlainCNN(width=4), torch.randn(2, 1, 8, 8), 0.5)
    10
    """
    from lightning_compress.graph.dependency import build_graph

    check_rounding(rounding)
    check_layernorm_statistics(layernorm_statistics)
    modules = dict(model.named_modules())
    graph = build_graph(model, example_inputs)
    selections = []
    for dependency_group in graph.groups():
        if dependency_group.blocked:
            continue
        group = from_dependency_group(dependency_group, graph.layernorm_dims)
        scores = group_scores(group, modules, p)
        keep = group_keep_mask(scores, filters_to_prune(scores, sparsity, rounding), group.segments, rounding)
        zero_group_channels(group, modules, keep, batchnorm=True)
        selections.append((group, keep))
    if layernorm_statistics == "kept":
        set_layernorm_statistics(selections, modules)
    return sum(int((~keep).sum()) for _, keep in selections)
