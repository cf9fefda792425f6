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
  :mod:`~lightning_compress.graph.blocks`: residual blocks that become the identity when zeroed.
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
from lightning_compress.graph.layers import LAYER_TYPES, check_layer_pattern, resolve_layer_types, select_layers
from lightning_compress.graph.tracing import Call, Trace, called_through_weights, trace, unexecuted_layers

__all__ = [
    "LAYER_TYPES",
    "Call",
    "ChannelGroup",
    "CompactionPlan",
    "DependencyGraph",
    "Replacement",
    "Trace",
    "block_scores",
    "build_graph",
    "called_through_weights",
    "check_layer_pattern",
    "compact",
    "filter_groups",
    "plan_compaction",
    "removable_blocks",
    "remove_blocks",
    "resolve_layer_types",
    "select_layers",
    "trace",
    "unexecuted_layers",
    "zero_block",
    "zero_bn_for_pruned_filters",
    "zero_filter_indices",
]
