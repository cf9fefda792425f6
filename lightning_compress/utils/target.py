"""The rule that tells callbacks which network to compress."""

from __future__ import annotations

from torch import nn


def compression_target(pl_module: nn.Module) -> nn.Module:
    """Return ``pl_module.compression_target`` when the module defines it, otherwise the module itself.

    A ``DistillationModule`` returns its student (never the frozen teacher), so pruning and quantization callbacks
    compress the right network without knowing how the LightningModule is built.
    """
    target = getattr(pl_module, "compression_target", None)
    if target is None:
        return pl_module
    if not isinstance(target, nn.Module):
        raise TypeError(
            f"{type(pl_module).__name__}.compression_target must be an nn.Module, got {type(target).__name__}."
        )
    return target
