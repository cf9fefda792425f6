"""Helpers shared by every compression family: layer selection, logging, the compression target, checkpoint files."""

from lightning_compress.utils.checkpoint import CheckpointError, check_checkpoint
from lightning_compress.utils.data import execution_order, first_tensor
from lightning_compress.utils.ddp import rewrap_ddp
from lightning_compress.utils.layers import LAYER_TYPES, resolve_layer_types, select_layers
from lightning_compress.utils.logging import (
    log_histogram,
    log_image,
    log_scalars,
    log_text,
    run_directory,
    tensorboard_writers,
)
from lightning_compress.utils.target import compression_target, replace_compression_target

__all__ = [
    "LAYER_TYPES",
    "CheckpointError",
    "check_checkpoint",
    "compression_target",
    "execution_order",
    "first_tensor",
    "log_histogram",
    "log_image",
    "log_scalars",
    "log_text",
    "replace_compression_target",
    "resolve_layer_types",
    "rewrap_ddp",
    "run_directory",
    "select_layers",
    "tensorboard_writers",
]
