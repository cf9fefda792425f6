"""Keeping DistributedDataParallel in step with a network whose parameters change during ``fit``."""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel


def rewrap_ddp(trainer: Any) -> bool:
    """Wrap the LightningModule in a fresh ``DistributedDataParallel`` after its parameters were replaced.

    DDP records the parameters (and buffers) it synchronises when it is built. An in-place compaction replaces
    parameters by smaller ones and attaching quantizers adds buffers (and, for learned steps, parameters), so the
    old wrapper would all-reduce tensors that no longer take part in training. Call this on every rank at the
    same point (the decisions that changed the network must already be identical across ranks). Returns whether a
    wrapper was rebuilt (``False`` outside DDP).
    """
    strategy = trainer.strategy
    if not isinstance(getattr(strategy, "model", None), DistributedDataParallel):
        return False
    strategy.model = strategy.lightning_module
    strategy.configure_ddp()
    return True
