"""Quantization-aware training that starts in the middle of ``fit`` (``QuantizationAwareTraining(start_epoch=...)``).

Three small pieces the callback uses when it attaches its quantizers to a network that is already training:

* :func:`validate_start_epoch`: the argument checks.
* :func:`add_to_optimizers`: the learned quantizer parameters (LSQ steps, PACT clipping levels) join every
  optimizer as one parameter group of their own, appended last, so that a resumed run can rebuild the same groups
  before Lightning loads the optimizer state.
* :class:`LoadHook`: a wrapper of the LightningModule's ``on_load_checkpoint`` (Lightning calls it right before its
  strict model load) that runs the module's own hook, and any wrapper installed before (``FilterPruning`` replays
  its in-place compactions there), first and then attaches the quantizers, so the checkpoint's quantizer buffers
  fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["LoadHook", "add_to_optimizers", "learned_parameters", "validate_start_epoch"]

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


class LoadHook:
    """Run ``after(checkpoint)`` in ``pl_module.on_load_checkpoint``, after the hook that was there (the class's
    own, or another callback's wrapper). Lightning calls that hook right before its strict ``load_state_dict``.

    :meth:`remove` puts back exactly the attribute value this wrapper replaced, and only while the wrapper is still
    the outermost one; under a wrapper installed later it only becomes a pass-through, and a later :meth:`remove`
    (once the outer wrapper put this one back) unwraps it.

    >>> class Module:
    ...     def on_load_checkpoint(self, checkpoint):
    ...         checkpoint["calls"].append("own")
    >>> module = Module()
    >>> hook = LoadHook(module, lambda checkpoint: checkpoint["calls"].append("after"))
    >>> checkpoint = {"calls": []}; module.on_load_checkpoint(checkpoint); checkpoint["calls"]
    ['own', 'after']
    >>> hook.remove(), "on_load_checkpoint" in vars(module)
    (True, False)
    """

    def __init__(self, pl_module: Any, after: Callable[[dict[str, Any]], None]) -> None:
        self.module, self.active = pl_module, True
        self._instance_hook = "on_load_checkpoint" in vars(pl_module)
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            original(checkpoint)  # first: wrappers installed before replay compactions there
            if self.active:
                after(checkpoint)

        self._original, self._wrapper = original, on_load_checkpoint
        pl_module.on_load_checkpoint = on_load_checkpoint

    def remove(self) -> bool:
        """Stop running ``after``; unwrap if outermost. Returns whether the wrapper is gone from the module."""
        self.active = False
        current = vars(self.module).get("on_load_checkpoint")
        if current is None:
            return True  # nothing is patched any more (another callback deleted the attribute)
        if current is not self._wrapper:
            return False
        if self._instance_hook:
            self.module.on_load_checkpoint = self._original
        else:
            del self.module.on_load_checkpoint  # the class's own hook again
        return True
