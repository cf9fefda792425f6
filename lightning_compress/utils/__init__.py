"""The floor every family stands on: the compression target, batches and loaders, logging, DDP, checkpoint files and
resuming. (Layer selection moved to :mod:`lightning_compress.graph.layers`; ``lightning_compress.utils.select_layers``
still works, with a deprecation warning.)"""

from typing import Any

from lightning_compress._compat import package_attribute
from lightning_compress.utils.checkpoint import CheckpointError, check_checkpoint
from lightning_compress.utils.data import execution_order, first_tensor
from lightning_compress.utils.ddp import rewrap_ddp
from lightning_compress.utils.logging import (
    log_histogram,
    log_image,
    log_scalars,
    log_text,
    run_directory,
    tensorboard_writers,
)
from lightning_compress.utils.outputs import logits_of, model_inputs, run_model
from lightning_compress.utils.target import compression_target, replace_compression_target

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "compression_target",
    "execution_order",
    "first_tensor",
    "log_histogram",
    "log_image",
    "log_scalars",
    "log_text",
    "logits_of",
    "model_inputs",
    "replace_compression_target",
    "rewrap_ddp",
    "run_directory",
    "run_model",
    "tensorboard_writers",
]


def __getattr__(name: str) -> Any:
    return package_attribute(__name__, name)
