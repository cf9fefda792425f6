"""Pruning: what to remove and when. The model graph it works on (tracing, dependency groups, compaction) is the
floor below, :mod:`lightning_compress.graph`.

- the math (no Lightning import): :mod:`~lightning_compress.pruning.criteria` (magnitude, threshold, splicing),
  :mod:`~lightning_compress.pruning.distributions` (a sparsity shared among layers: ERK),
  :mod:`~lightning_compress.pruning.structured` (vector, kernel, filter, channel norms),
  :mod:`~lightning_compress.pruning.masks` (strategy objects), :mod:`~lightning_compress.pruning.schedules`,
  :mod:`~lightning_compress.pruning.groups` (filter groups scored and pruned together),
  :mod:`~lightning_compress.pruning.dynamic` / ``dynamic_ops`` (Feature Boosting and Suppression gates),
  :mod:`~lightning_compress.pruning.flows` (reinitialise, rewind) and
  :mod:`~lightning_compress.pruning.optimizer_state` (training on after a compaction);
- the callbacks: ``callback_base`` (masks, schedule, resume), ``magnitude_callback``, ``filter_callback`` (with
  ``filter_final``: the final prune and compaction in place, ``filter_state``: options, checkpoint and resume),
  ``layer_callback``, ``dynamic_callback``, ``head_callback`` (attention heads and FFN neurons, with
  :mod:`~lightning_compress.pruning.head_select`).

``lightning_compress.pruning.compact`` is the function :func:`lightning_compress.graph.compact`; its module is
reachable as ``lightning_compress.pruning.compaction``.
"""

import sys

from lightning_compress.graph.compact import (
    CompactionPlan,
    Replacement,
    plan_compaction,
    zero_bn_for_pruned_filters,
    zero_filter_indices,
)
from lightning_compress.graph.compact import compact as _compact_function
from lightning_compress.graph.dependency import ChannelGroup, build_graph, filter_groups
from lightning_compress.pruning import schedules
from lightning_compress.pruning.criteria import (
    global_magnitude_masks,
    magnitude_mask,
    splicing_mask,
    splicing_thresholds,
    threshold_mask,
)
from lightning_compress.pruning.distributions import erk_sparsities
from lightning_compress.pruning.flows import pruned_architecture
from lightning_compress.pruning.head_callback import HeadPruning
from lightning_compress.pruning.head_select import select_units, units_to_prune
from lightning_compress.pruning.masks import (
    FilterNorm,
    Magnitude,
    PruningMethod,
    Splicing,
    Structured,
    Threshold,
    apply_mask,
)
from lightning_compress.pruning.optimizer_state import slice_optimizer_state
from lightning_compress.pruning.schedules import (
    AGP,
    Constant,
    Cosine,
    Exponential,
    Linear,
    Schedule,
    recovery_schedule,
)
from lightning_compress.pruning.structured import (
    channel_norms,
    filter_mask,
    filter_norms,
    kernel_mask,
    kernel_scores,
    vector_mask,
    vector_scores,
)

compaction = sys.modules["lightning_compress.graph.compact"]
compact = _compact_function

__all__ = [
    "AGP",
    "ChannelGroup",
    "CompactionPlan",
    "Constant",
    "Cosine",
    "Exponential",
    "FilterNorm",
    "HeadPruning",
    "Linear",
    "Magnitude",
    "PruningMethod",
    "Replacement",
    "Schedule",
    "Splicing",
    "Structured",
    "Threshold",
    "apply_mask",
    "build_graph",
    "channel_norms",
    "compact",
    "compaction",
    "erk_sparsities",
    "filter_groups",
    "filter_mask",
    "filter_norms",
    "global_magnitude_masks",
    "kernel_mask",
    "kernel_scores",
    "magnitude_mask",
    "plan_compaction",
    "pruned_architecture",
    "recovery_schedule",
    "schedules",
    "select_units",
    "slice_optimizer_state",
    "splicing_mask",
    "splicing_thresholds",
    "threshold_mask",
    "units_to_prune",
    "vector_mask",
    "vector_scores",
    "zero_bn_for_pruned_filters",
    "zero_filter_indices",
]
