"""The model graph, the ground floor that pruning, quantization and distillation taps stand on. Pure torch.

- :mod:`~lightning_compress.graph.layers`: layers by qualified name, regular expression or type
  (:func:`select_layers`), the one way every callback finds the layers it works on;
- :mod:`~lightning_compress.graph.tracing`: one recorded forward pass with its real tensors (torch.fx, or hooks
  when symbolic tracing fails);
- :mod:`~lightning_compress.graph.dependency`: which channels of which layers must shrink together (DepGraph's
  idea), with :mod:`~lightning_compress.graph.channel_groups` and the tables of
  :mod:`~lightning_compress.graph.channel_ops`;
- :mod:`~lightning_compress.graph.compact`: physical removal of pruned channels (a smaller dense model with the
  same outputs); :mod:`~lightning_compress.graph.batchnorm`: BatchNorm around pruned filters;
  :mod:`~lightning_compress.graph.blocks`: residual blocks that become the identity when zeroed;
  :mod:`~lightning_compress.graph.layernorm` and :mod:`~lightning_compress.graph.layernorm_statistics`: LayerNorms
  over pruned channels, exact (their constants kept) or over the kept channels only (plain after compaction);
- :mod:`~lightning_compress.graph.heads`: attention heads and FFN neurons of transformers as prunable units, removed
  by :mod:`~lightning_compress.graph.heads_compact`.
"""

from lightning_compress.graph.blocks import block_scores, removable_blocks, remove_blocks, zero_block
from lightning_compress.graph.compact import (
    CompactionPlan,
    Replacement,
    compact,
    plan_compaction,
    zero_bn_for_pruned_filters,
    zero_filter_indices,
)
from lightning_compress.graph.dependency import ChannelGroup, DependencyGraph, build_graph, filter_groups
from lightning_compress.graph.heads import (
    Slice,
    UnitGroup,
    find_unit_groups,
    mask_units,
    norm_scores,
    taylor_scores,
)
from lightning_compress.graph.heads_compact import CompactMultiheadAttention, compact_units, unit_counts
from lightning_compress.graph.layernorm_statistics import kept_layer_norm, set_kept_statistics
from lightning_compress.graph.layers import LAYER_TYPES, check_layer_pattern, resolve_layer_types, select_layers
from lightning_compress.graph.tracing import Call, Trace, called_through_weights, trace, unexecuted_layers

__all__ = [
    "LAYER_TYPES",
    "Call",
    "ChannelGroup",
    "CompactMultiheadAttention",
    "CompactionPlan",
    "DependencyGraph",
    "Replacement",
    "Slice",
    "Trace",
    "UnitGroup",
    "block_scores",
    "build_graph",
    "called_through_weights",
    "check_layer_pattern",
    "compact",
    "compact_units",
    "filter_groups",
    "find_unit_groups",
    "kept_layer_norm",
    "mask_units",
    "norm_scores",
    "plan_compaction",
    "removable_blocks",
    "remove_blocks",
    "resolve_layer_types",
    "select_layers",
    "set_kept_statistics",
    "taylor_scores",
    "trace",
    "unexecuted_layers",
    "unit_counts",
    "zero_block",
    "zero_bn_for_pruned_filters",
    "zero_filter_indices",
]
