"""Optimizer and learning-rate schedule from plain, YAML-expressible settings (shared by the library's modules)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULERS = ("cosine", "step", "none")


def check_optimizer_settings(optimizer: str, lr: float, weight_decay: float, lr_scheduler: str,
                             momentum: float = 0.0) -> None:
    """Raise ``ValueError`` naming the value for an unknown optimizer or schedule, an ``lr`` that is not a finite
    positive number, or a weight decay or momentum that is not finite and non-negative.

    >>> check_optimizer_settings("rmsprop", 1e-3, 0.0, "none")
    Traceback (most recent call last):
    ...
    ValueError: optimizer must be one of ('adam', 'adamw', 'sgd'), got 'rmsprop'.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {lr_scheduler!r}.")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}.")
    for name, value in (("weight_decay", weight_decay), ("momentum", momentum)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}.")


def build_optimizers(
    params: Iterable[torch.nn.Parameter],
    optimizer: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    lr_scheduler: str = "none",
    max_epochs: int | None = None,
    step_size: int = 10,
    gamma: float = 0.1,
) -> Any:
    """What ``configure_optimizers`` returns: Adam, AdamW or SGD (Nesterov when ``momentum > 0``) over ``params``,
    with a cosine schedule annealed over ``max_epochs``, a step schedule, or none."""
    params = [p for p in params if p.requires_grad]
    built: torch.optim.Optimizer
    if optimizer == "sgd":
        built = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    else:
        optimizer_class = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        built = optimizer_class(params, lr=lr, weight_decay=weight_decay)
    if lr_scheduler == "none":
        return built
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if lr_scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(built, T_max=max(1, int(max_epochs or 1)))
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(built, step_size=step_size, gamma=gamma)
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
