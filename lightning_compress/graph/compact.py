"""Physical removal of pruned filters: a smaller dense copy of a model with the same eval-mode outputs.

A channel is removed when every layer that reads it sees zero, or a constant that folds exactly into the reader's
bias (see :mod:`lightning_compress.graph.dependency`): its filter goes from every producer, its entry from every
BatchNorm and depthwise convolution, its input slice from every consumer (a block of ``in_features`` after a
flatten into a ``Linear``). Channels tied by residual additions are removed only where they are dead in every
producer. Through a channel shuffle the kept filters may be reordered so that each channel keeps its road
(:mod:`~lightning_compress.graph.channel_routes`).

The BatchNorm trap (Soft Filter Pruning's "reconstruct" step): in eval mode a zero filter followed by BatchNorm
outputs the constant ``beta - gamma * mu / sigma``. Into a ``Linear`` or an unpadded convolution that constant is
folded into the bias; a padded convolution sees it only away from the borders, so such a channel is kept and
reported unless its BatchNorm scale and shift are zeroed first (:func:`zero_bn_for_pruned_filters`) or an
activation maps it to zero (ReLU of a negative constant).

>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2)).eval()
>>> with torch.no_grad():
...     model[0].weight[1:3] = 0; model[0].bias[1:3] = 0
>>> x = torch.randn(2, 1, 5, 5)
>>> small = compact(model, x)
>>> small[0].out_channels, small[4].in_features, bool((small(x) - model(x)).abs().max() < 1e-5)
(2, 18, True)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

import lightning_compress.graph.layernorm_statistics as statistics
from lightning_compress.graph.channel_ties import tied_removal
from lightning_compress.graph.dependency import ChannelGroup, DependencyGraph, build_graph
from lightning_compress.graph.layernorm import CompactLayerNorm, layernorm_reason

__all__ = [
    "CompactionPlan",
    "Replacement",
    "compact",
    "plan_compaction",
    "replay_compactions",
    "zero_bn_for_pruned_filters",
    "zero_filter_indices",
]


@dataclass
class Replacement:
    """A parameter swapped by :func:`compact`: ``new`` holds ``old`` indexed by ``index`` along its leading dims.

    ``old`` is ``None`` (and ``index`` empty) for a bias created to absorb a folded constant.
    """

    module: str
    name: str
    old: nn.Parameter | None
    new: nn.Parameter
    index: tuple[Tensor, ...]


@dataclass
class CompactionPlan:
    """What :func:`compact` removes and what it keeps despite pruning.

    Attributes:
        groups: every dependency group of output channels.
        removable: for each group, the channel positions that will be removed.
        skipped: ``(group index, channel positions, reason)`` for pruned channels (all producer filters zero)
            that are kept.
        graph: the dependency analysis.
        replacements: filled by :func:`compact`: every parameter it replaced.
        outputs_removed: filled by :func:`compact`: per module, the output channels it removed (also for modules
            without parameters, e.g. a BatchNorm without affine parameters whose running statistics were sliced).
        orders: per ``(layer, "out" or "in")``, the kept indices in the order the compacted network needs them,
            where a channel shuffle's filters are reordered (others keep their order).
    """

    groups: list[ChannelGroup]
    removable: list[list[int]]
    skipped: list[tuple[int, list[int], str]] = field(default_factory=list)
    graph: DependencyGraph | None = None
    replacements: list[Replacement] = field(default_factory=list)
    outputs_removed: dict[str, list[int]] = field(default_factory=dict)
    orders: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    @property
    def num_removable(self) -> int:
        """Total number of channels to remove."""
        return sum(len(positions) for positions in self.removable)


def _is_zero_filter(module: nn.Module, index: int, cache: dict[int, Tensor] | None = None) -> bool:
    """Whether filter ``index`` of ``module`` (its weight rows and bias entry) is all zero; ``cache`` keeps each
    module's zero rows."""
    cache = {} if cache is None else cache
    if id(module) not in cache:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            return False
        zero = weight.detach().flatten(1).eq(0).all(1)
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            zero &= bias.detach().eq(0)
        cache[id(module)] = zero.cpu()
    return bool(cache[id(module)][index])


def zero_filter_indices(model: nn.Module) -> dict[str, list[int]]:
    """Output channels of conv and linear layers whose weights (and bias entries) are all zero, by layer name.

    >>> conv = nn.Conv2d(1, 3, 1, bias=False)
    >>> with torch.no_grad():
    ...     conv.weight[1] = 0
    >>> zero_filter_indices(nn.Sequential(conv))
    {'0': [1]}
    """
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            zero = module.weight.detach().flatten(1).eq(0).all(1)
            if module.bias is not None:
                zero &= module.bias.detach().eq(0)
            if zero.any():
                result[name] = zero.nonzero().flatten().tolist()
    return result


def _dead_reason(reads: list[tuple[str, int, float, bool]]) -> str | None:
    for consumer, _, value, foldable in reads:
        if value != value:  # nan
            return (f"{consumer!r} reads it as a non-constant (e.g. a BatchNorm constant spread by a padded depthwise "
                    "convolution; zero_bn_for_pruned_filters may free it)")
        if value != 0 and not foldable:
            return (f"{consumer!r} is a padded convolution reading a non-zero constant (BatchNorm of a zero "
                    "filter); zero the BatchNorm scale and shift first (zero_bn_for_pruned_filters)")
    return None


def plan_compaction(model: nn.Module, example_inputs: Any, method: str = "auto") -> CompactionPlan:
    """Decide which channels :func:`compact` removes, group by group, without changing ``model``.

    Args:
        model: the pruned network (zero filters mark what to remove).
        example_inputs: what the model is called with; a batch of at least 2.
        method: tracing front end, ``"auto"`` (fx, falling back to hooks), ``"fx"`` or ``"hooks"``.
    """
    graph = build_graph(model, example_inputs, method)
    modules = dict(model.named_modules())
    merged = graph.merged()
    groups = graph.groups(merged)
    zero_rows: dict[int, Tensor] = {}
    plan = CompactionPlan(groups, [], [], graph)
    for g, group in enumerate(groups):
        removable: list[int] = []
        kept_reasons: dict[str, list[int]] = {}
        for k, root in enumerate(group.roots):
            meta = merged[root]
            producers = [(m, i) for m, role, i in meta.members if role == "producer"]
            pruned = bool(producers) and all(_is_zero_filter(modules[m], i, zero_rows) for m, i in producers)
            reason = "; ".join(dict.fromkeys(meta.blocked)) or _dead_reason(meta.reads) or layernorm_reason(meta.norms)
            if reason is None and producers:
                removable.append(k)
            elif pruned:
                kept_reasons.setdefault(reason or "", []).append(k)
        for carried in (*group.producers.values(), *group.depthwise.values()):
            positions = [k for k, index in enumerate(carried) if index is not None]
            if positions and all(k in removable for k in positions):  # never an empty layer
                removable.remove(positions[0])
                kept_reasons.setdefault("a layer keeps at least one channel", []).append(positions[0])
        for _ in range(3):  # chained grouped convolutions: until every one agrees
            for name, (count, _) in graph.grouped.items():
                if name in group.producers:
                    _same_positions_per_group(group.producers[name], count, removable, kept_reasons)
        if group.ties is not None and _route(group, removable, kept_reasons, plan):
            pass  # filters reordered through a channel shuffle
        elif group.ties is not None:  # shuffles and equal splits: whole units, every split balanced
            for reason, positions in tied_removal(removable, group.ties).items():
                kept_reasons.setdefault(reason, []).extend(positions)
        plan.removable.append(removable)
        plan.skipped += [(g, positions, reason) for reason, positions in kept_reasons.items()]
    return plan


def _route(group: ChannelGroup, removable: list[int], kept_reasons: dict[str, list[int]],
           plan: CompactionPlan) -> bool:
    """Through a channel shuffle, whether the removable channels (when they are all the pruned ones) leave a network
    that reordered filters keep exact (:mod:`~lightning_compress.graph.channel_routes`); records the orders."""
    routes = group.ties.routes if group.ties is not None else None
    if routes is None or kept_reasons or not removable:
        return False
    keep = torch.ones(group.size, dtype=torch.bool)
    keep[removable] = False
    orders = routes.orders(keep)
    if isinstance(orders, str):
        return False
    plan.orders.update(orders)
    return True


def _same_positions_per_group(indices: list[int | None], groups: int, removable: list[int],
                              kept_reasons: dict[str, list[int]]) -> None:
    """A grouped convolution loses the same positions from every one of its ``groups`` (it stays grouped): keep
    the removable channels whose position is not removable in every group."""
    width = len(indices) // groups
    by_position: dict[int, list[int]] = {}
    for k in removable:
        index = indices[k]
        if index is not None:
            by_position.setdefault(index % width, []).append(k)
    full = [p for p, members in by_position.items() if len(members) == groups]
    dropped = [p for p in by_position if p not in full] + (full[:1] if len(full) == width else [])
    for p in dropped:
        for k in by_position[p]:
            removable.remove(k)
            kept_reasons.setdefault("a grouped convolution loses the same positions from each of its groups",
                                    []).append(k)


def compact(
    model: nn.Module,
    example_inputs: Any,
    *,
    method: str = "auto",
    return_plan: bool = False,
    inplace: bool = False,
) -> nn.Module | tuple[nn.Module, CompactionPlan]:
    """A physically smaller model without the dead filters and channels of ``model``.

    The result's eval-mode outputs equal ``model``'s (up to float rounding). Groups that cannot shrink safely stay
    intact and are listed in the plan (``return_plan=True``), whose ``replacements`` map every replaced parameter to
    its successor (see :func:`~lightning_compress.pruning.optimizer_state.slice_optimizer_state`).

    Args:
        model: the pruned network, e.g. after soft or hard filter pruning.
        example_inputs: a tensor or tuple the model is called with (a batch of at least 2).
        method: tracing front end: ``"auto"``, ``"fx"`` or ``"hooks"``.
        return_plan: also return the :class:`CompactionPlan`.
        inplace: shrink ``model``'s own layers (references to its submodules stay valid) instead of a deep copy.
    """
    plan = plan_compaction(model, example_inputs, method)
    assert plan.graph is not None
    merged = plan.graph.merged()
    out_remove: dict[str, set[int]] = {}
    in_remove: dict[str, dict[int, float]] = {}
    norm_remove: dict[str, dict[int, float]] = {}  # LayerNorm -> removed channel -> its constant input
    for group, positions in zip(plan.groups, plan.removable, strict=True):
        for k in positions:
            meta = merged[group.roots[k]]
            for module, _, index in meta.members:
                out_remove.setdefault(module, set()).add(index)
            for consumer, index, value, _ in meta.reads:
                in_remove.setdefault(consumer, {})[index] = value
            for norm, index, value in meta.norms:
                norm_remove.setdefault(norm, {})[index] = value
    plan.outputs_removed = {name: sorted(indices) for name, indices in out_remove.items()}
    compacted = model if inplace else copy.deepcopy(model)
    for name, module in list(compacted.named_modules()):
        if name in norm_remove:
            plan.replacements += _shrink_layernorm(compacted, name, norm_remove[name], plan.graph.layernorm_dims[name])
        elif name in out_remove or name in in_remove:
            plan.replacements += _shrink(name, module, out_remove.get(name, set()), in_remove.get(name, {}),
                                         plan.orders.get((name, "out")), plan.orders.get((name, "in")))
    parameters = dict(compacted.named_parameters())
    with torch.no_grad():
        for name in set(out_remove) & set(parameters):  # per-channel parameters of non-leaf modules
            owner, _, attr = name.rpartition(".")
            keep = _keep(parameters[name].shape[0], out_remove[name], parameters[name].device)
            plan.replacements.append(_replace(owner, compacted.get_submodule(owner), attr, parameters[name][keep],
                                              (keep,)))
    return (compacted, plan) if return_plan else compacted


def _shrink_layernorm(model: nn.Module, name: str, removed: dict[int, float], dim: int) -> list[Replacement]:
    """Swap the LayerNorm ``name`` for a :class:`~lightning_compress.graph.layernorm.CompactLayerNorm` without the
    ``removed`` channels (index -> constant input); one with statistics over kept channels for a plain one."""
    norm = cast(nn.LayerNorm, model.get_submodule(name))
    small = (statistics.shrink_with_kept_statistics(norm, removed, dim) if statistics.kept_statistics(norm)
             else CompactLayerNorm.from_layernorm(norm, removed, dim))
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, small)
    keep = _keep(norm.normalized_shape[0], removed, torch.device("cpu"))
    return [Replacement(name, p, getattr(norm, p), getattr(small, p), (keep.to(getattr(small, p).device),))
            for p in ("weight", "bias") if getattr(norm, p) is not None]


def _keep(n: int, removed: Any, device: torch.device, order: list[int] | None = None) -> Tensor:
    """The indices of ``n`` that stay: ``order`` where given (a reordered layer), else all but ``removed``."""
    kept = order if order is not None else [i for i in range(n) if i not in removed]
    return torch.tensor(kept, dtype=torch.long, device=device)


def _replace(name: str, module: nn.Module, attr: str, value: Tensor, index: tuple[Tensor, ...]) -> Replacement:
    old = getattr(module, attr)
    new = nn.Parameter(value.clone(), requires_grad=old.requires_grad if old is not None else True)
    setattr(module, attr, new)
    return Replacement(name, attr, old, new, index if old is not None else ())


def _shrink(name: str, module: nn.Module, out_removed: set[int], in_removed: dict[int, float],
            out_order: list[int] | None = None, in_order: list[int] | None = None) -> list[Replacement]:
    replaced = []
    with torch.no_grad():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keep = _keep(module.num_features, out_removed, module.running_mean.device, out_order)  # type: ignore
            for attr in ("weight", "bias"):
                if getattr(module, attr) is not None:
                    replaced.append(_replace(name, module, attr, getattr(module, attr)[keep], (keep,)))
            module.running_mean = module.running_mean[keep].clone()  # type: ignore[index]
            module.running_var = module.running_var[keep].clone()  # type: ignore[index]
            module.num_features = len(keep)
            return replaced
        assert isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
        weight = module.weight.detach()
        keep_out = _keep(weight.shape[0], out_removed, weight.device, out_order)
        groups = module.groups if isinstance(module, nn.modules.conv._ConvNd) else 1
        depthwise = groups > 1 and weight.shape[1] == 1 and getattr(module, "in_channels", 0) == groups
        if groups > 1 and not depthwise:  # grouped: the same positions go from every group
            keep_in = _keep(weight.shape[1], {i % weight.shape[1] for i in in_removed}, weight.device)
        else:
            keep_in = keep_out if depthwise else _keep(weight.shape[1], in_removed, weight.device, in_order)
        bias = module.bias.detach().clone() if module.bias is not None else None
        folds = {i: c for i, c in in_removed.items() if c != 0}
        if folds and groups == 1:
            columns = weight[:, list(folds)].flatten(2).sum(2) if weight.dim() > 2 else weight[:, list(folds)]
            delta = columns.double() @ torch.tensor(list(folds.values()), dtype=torch.float64, device=weight.device)
            bias = (bias if bias is not None else weight.new_zeros(weight.shape[0])) + delta.to(weight.dtype)
        index = (keep_out,) if depthwise else (keep_out, keep_in)
        new_weight = weight[keep_out] if depthwise else weight[keep_out][:, keep_in]
        replaced.append(_replace(name, module, "weight", new_weight, index))
        if bias is not None:
            replaced.append(_replace(name, module, "bias", bias[keep_out], (keep_out,)))
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = len(keep_out), len(keep_in)
        else:
            module.in_channels = len(keep_in) if depthwise else len(keep_in) * groups
            module.out_channels = len(keep_out)
            module.groups = len(keep_out) if depthwise else module.groups
    return replaced


def zero_bn_for_pruned_filters(model: nn.Module, example_inputs: Any, method: str = "auto",
                               roles: tuple[str, ...] = ("batchnorm", "layernorm"),
                               layernorm_statistics: str = "all") -> int:
    """Zero, in place, the BatchNorm (and LayerNorm) scale and shift of channels whose filters are all zero.

    Afterwards those channels output exactly 0 in eval mode (the final prune of Soft Filter Pruning), so
    :func:`compact` can remove them even before padded convolutions (and from LayerNorms). Returns the number of
    norm channels zeroed (``roles``: which norms). ``layernorm_statistics="kept"``: those LayerNorms also take
    their statistics over the other channels (:mod:`~lightning_compress.graph.layernorm_statistics`).
    """
    graph = build_graph(model, example_inputs, method)
    modules = dict(model.named_modules())
    count, zero_rows, excluded = 0, {}, {}  # type: tuple[int, dict[int, Tensor], dict[str, list[int]]]
    with torch.no_grad():
        for meta in graph.merged().values():
            producers = [(m, i) for m, role, i in meta.members if role == "producer"]
            if not producers or not all(_is_zero_filter(modules[m], i, zero_rows) for m, i in producers):
                continue
            for name, role, index in meta.members:
                bn = modules.get(name)  # a "parameter" member names a parameter
                if role in roles and isinstance(bn, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                    for param in (bn.weight, bn.bias):
                        if param is not None:
                            param[index] = 0
                    count += 1
                    if isinstance(bn, nn.LayerNorm):
                        excluded.setdefault(name, []).append(index)
    if statistics.check_layernorm_statistics(layernorm_statistics) == "kept":
        statistics.exclude_channels(modules, excluded, graph.layernorm_dims)
    return count


def replay_compactions(model: nn.Module, events: list[dict[str, list[int]]], example_inputs: Any,
                       layernorm_statistics: str = "all") -> list[CompactionPlan]:
    """Shrink ``model`` in place as a recorded run did: for each event ``{layer: removed filter indices}`` zero those
    filters and compact (what ``FilterPruning`` records, so a fresh model takes its checkpoint), LayerNorms under
    the run's ``layernorm_statistics``.

    Returns:
        The plan of each compaction, in order.
    """
    plans = []
    for removed in events:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, rows in removed.items():
                modules[name].weight[rows] = 0
                if getattr(modules[name], "bias", None) is not None:
                    modules[name].bias[rows] = 0
        device = next(model.parameters()).device
        if any(isinstance(m, nn.LayerNorm) for m in model.modules()):  # zeroed with the filters during the run
            zero_bn_for_pruned_filters(model, example_inputs.to(device), roles=("layernorm",),
                                       layernorm_statistics=layernorm_statistics)
        _, plan = cast(tuple[nn.Module, CompactionPlan],
                       compact(model, example_inputs.to(device), inplace=True, return_plan=True))
        plans.append(plan)
    return plans
