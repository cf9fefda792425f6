"""Quantization-aware training that starts in the middle of ``fit`` (``QuantizationAwareTraining(start_epoch=...)``).

Two small pieces the callback uses when it attaches its quantizers to a network that is already training:

* :func:`validate_start_epoch`: the argument checks.
* :func:`add_to_optimizers`: the learned quantizer parameters (LSQ steps, PACT clipping levels) join every
  optimizer as one parameter group of their own, appended last, so that a resumed run can rebuild the same groups
  before Lightning loads the optimizer state.

On resume the callback re-attaches its quantizers after the module's ``on_load_checkpoint`` (and after any
compaction ``FilterPruning`` replays there) through :class:`~lightning_compress.utils.load_hook.ModelLoadHook`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["add_to_optimizers", "learned_parameters", "validate_start_epoch"]

_PER_GROUP_LISTS = ("base_lrs", "min_lrs", "_last_lr")  # scheduler attributes with one entry per parameter group


def validate_start_epoch(start_epoch: int, freeze_epoch: int | None) -> None:
    """Raise a ``ValueError`` quoting the value unless ``start_epoch`` is a non-negative integer and
    ``freeze_epoch`` (if given) is not before it.

    >>> validate_start_epoch(2, freeze_epoch=1)
    Traceback (most recent call last):
    ...
    ValueError: freeze_epoch=1 must be >= start_epoch=2 (the quantizers are attached at start_epoch)
    """
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise ValueError(f"start_epoch={start_epoch!r} must be a non-negative integer")
    if freeze_epoch is not None and freeze_epoch < start_epoch:
        raise ValueError(f"freeze_epoch={freeze_epoch!r} must be >= start_epoch={start_epoch!r} "
                         "(the quantizers are attached at start_epoch)")


def learned_parameters(layers: Mapping[str, Any]) -> list[nn.Parameter]:
    """The LSQ steps and PACT clipping levels of quantized ``layers``: layer order, input quantizer first."""
    return [p for layer in layers.values() for quantizer in (layer.input_quantizer, layer.weight_quantizer)
            for p in quantizer.parameters()]


def add_to_optimizers(optimizers: Iterable[torch.optim.Optimizer], params: list[nn.Parameter],
                      schedulers: Iterable[Any] = ()) -> None:
    """Make ``params`` one parameter group of their own, the last one, in every optimizer.

    The group takes its hyper-parameters (learning rate, weight decay, betas, momentum, ``initial_lr``, ...) from
    the optimizer's first group. The parameters are taken out of any other group first (a resumed run's optimizer,
    built over ``pl_module.parameters()`` after the quantizers were attached, holds them in its first group), so
    the groups match those of the interrupted run and its optimizer state loads. A scheduler of that optimizer
    whose per-group lists (``base_lrs``, ``min_lrs``) are one short gets the first group's entry appended, so it
    schedules the new group like the first.
    """
    if not params:
        return
    ids = {id(p) for p in params}
    schedulers = list(schedulers)
    for optimizer in optimizers:
        groups = []
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if id(p) not in ids]
            if kept or not group["params"]:  # drop only a group that held nothing but these parameters
                group["params"] = kept
                groups.append(group)
        optimizer.param_groups[:] = groups
        first = optimizer.param_groups[0] if optimizer.param_groups else optimizer.defaults
        options = {k: v for k, v in first.items() if k not in ("params", "param_names")}
        optimizer.add_param_group({**options, "params": list(params)})
        for scheduler in schedulers:
            if getattr(scheduler, "optimizer", None) is not optimizer:
                continue
            for attribute in _PER_GROUP_LISTS:
                values = getattr(scheduler, attribute, None)
                if isinstance(values, list) and values and len(values) == len(optimizer.param_groups) - 1:
                    values.append(values[0])
