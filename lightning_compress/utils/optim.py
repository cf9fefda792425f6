"""The optimizer and learning-rate schedule of the library's modules: a user's own recipe, or short names.

A recipe is given the LightningCLI way, as callables (``OptimizerCallable``: parameters -> optimizer,
``LRSchedulerCallable``: optimizer -> scheduler), e.g. ``functools.partial(torch.optim.SGD, lr=0.05,
momentum=0.9)`` in Python or, in YAML, ``optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05}}``: the
same block a LightningCLI module of the user's takes, so their recipe carries over unchanged. The short names
(``"adam"``, ``"adamw"``, ``"sgd"``; ``"cosine"``, ``"step"``, ``"none"``) with ``lr``, ``weight_decay`` and
``momentum`` remain for quick runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

__all__ = ["LR_SCHEDULERS", "OPTIMIZERS", "LRSchedulerCallable", "LRSchedulerChoice", "OptimizerCallable",
           "OptimizerChoice", "build_optimizers", "check_optimizer_settings", "describe_recipe"]

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULERS = ("cosine", "step", "none")
#: An optimizer: a short name or a callable (parameters -> optimizer). The name comes first: jsonargparse dumps a
#: string under ``Union[callable, str]`` as "Unable to serialize instance" (and a resumed CLI run re-reads it).
OptimizerChoice = Union[str, OptimizerCallable]  # noqa: UP007
#: A learning-rate schedule: a short name or a callable (optimizer -> scheduler).
LRSchedulerChoice = Union[str, LRSchedulerCallable]  # noqa: UP007


def describe_recipe(value: Any) -> Any:
    """A stable, JSON-friendly description of an optimizer or scheduler choice (for reference fingerprints): the
    name itself, or the class and keyword arguments of a callable (``functools.partial``, a class, a function).

    >>> describe_recipe(functools.partial(torch.optim.SGD, lr=0.1))
    'torch.optim.sgd.SGD(lr=0.1)'
    """
    if not callable(value):
        return value
    keywords: dict[str, Any] = {}
    target: Any = value
    while isinstance(target, functools.partial):
        keywords = {**target.keywords, **keywords}
        classes = [a for a in target.args if isinstance(a, type) or (callable(a) and hasattr(a, "__qualname__"))]
        target = classes[-1] if classes else target.func
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(keywords.items()))})"


def check_optimizer_settings(optimizer: OptimizerChoice, lr: float, weight_decay: float,
                             lr_scheduler: LRSchedulerChoice | None, momentum: float = 0.0) -> None:
    """Raise ``ValueError`` naming the value for an unknown optimizer or schedule name, an ``lr`` that is not a
    finite positive number, or a weight decay or momentum that is not finite and non-negative. Callables pass.

    >>> check_optimizer_settings("rmsprop", 1e-3, 0.0, "none")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: optimizer must be one of ('adam', 'adamw', 'sgd') or a callable ..., got 'rmsprop'.
    """
    if not callable(optimizer) and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a callable (parameters -> optimizer), "
                         f"got {optimizer!r}.")
    if lr_scheduler is not None and not callable(lr_scheduler) and lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, None or a callable (optimizer -> "
                         f"scheduler), got {lr_scheduler!r}.")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}.")
    for name, value in (("weight_decay", weight_decay), ("momentum", momentum)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}.")


def build_optimizers(
    params: Iterable[torch.nn.Parameter],
    optimizer: OptimizerChoice,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    lr_scheduler: LRSchedulerChoice | None = "none",
    max_epochs: int | None = None,
    step_size: int = 10,
    gamma: float = 0.1,
    monitor: str = "val/loss",
) -> Any:
    """What ``configure_optimizers`` returns: the callable's optimizer over ``params`` (``lr``, ``weight_decay`` and
    ``momentum`` are then the callable's own), or Adam, AdamW or SGD (Nesterov when ``momentum > 0``); with the
    callable's scheduler (``ReduceLROnPlateau`` watches ``monitor``), a cosine schedule annealed over
    ``max_epochs``, a step schedule, or none."""
    params = [p for p in params if p.requires_grad]
    built: torch.optim.Optimizer
    if callable(optimizer):
        built = optimizer(params)
    elif optimizer == "sgd":
        built = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    else:
        optimizer_class = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        built = optimizer_class(params, lr=lr, weight_decay=weight_decay)
    if lr_scheduler is None or lr_scheduler == "none":
        return built
    scheduler: Any
    if callable(lr_scheduler):
        scheduler = lr_scheduler(built)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = monitor
        return {"optimizer": built, "lr_scheduler": config}
    if lr_scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(built, T_max=max(1, int(max_epochs or 1)))
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(built, step_size=step_size, gamma=gamma)
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
