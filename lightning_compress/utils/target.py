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


def replace_compression_target(pl_module: nn.Module, new: nn.Module) -> str:
    """Put ``new`` where ``pl_module``'s compression target sits (e.g. a compacted copy); returns its attribute path.

    Raises:
        ValueError: if the compression target is the LightningModule itself (it cannot replace itself).
    """
    old = compression_target(pl_module)
    for name, module in pl_module.named_modules():
        if module is old and name:
            parent_name, _, attribute = name.rpartition(".")
            parent = pl_module.get_submodule(parent_name) if parent_name else pl_module
            setattr(parent, attribute, new)
            return name
    raise ValueError(
        f"{type(pl_module).__name__} has no compression_target submodule to replace; define the "
        "`compression_target` property returning the network (as ClassifierModule does with its backbone)."
    )
