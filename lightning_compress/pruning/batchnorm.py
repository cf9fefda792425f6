"""BatchNorm around pruned filters: find the BN that normalises a layer's output, zero pruned channels in it, and
re-estimate running statistics after pruning. Pure torch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_compress.utils.data import probe_forward


def batchnorm_after(model: nn.Module, example_inputs: Any, names: Iterable[str]) -> dict[str, str]:
    """Map each layer in ``names`` to the BatchNorm that consumes its output directly (traced on one forward).

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    >>> batchnorm_after(model, torch.zeros(1, 1, 5, 5), ["0"])
    {'0': '1'}
    """
    modules = dict(model.named_modules())
    wanted = set(names)
    produced: dict[int, str] = {}
    found: dict[str, str] = {}

    def record_output(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                produced[id(output)] = name
        return hook

    def record_input(name: str) -> Any:
        def hook(_module: nn.Module, args: Any) -> None:
            producer = produced.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
            if producer is not None and producer not in found:
                found[producer] = name
        return hook

    handles = [modules[n].register_forward_hook(record_output(n)) for n in wanted]
    handles += [m.register_forward_pre_hook(record_input(n)) for n, m in modules.items() if isinstance(m, _BatchNorm)]
    probe_forward(model, example_inputs, handles)
    return found


def zero_batchnorm_channels(bn: Any, keep: torch.Tensor) -> None:
    """Zero the scale and shift of the channels where ``keep`` is False, so they output exactly 0 in eval mode."""
    with torch.no_grad():
        drop = ~keep.to(bn.weight.device) if isinstance(bn.weight, torch.Tensor) else None
        if drop is None:
            return
        bn.weight[drop] = 0
        if isinstance(bn.bias, torch.Tensor):
            bn.bias[drop] = 0


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``batches`` (train-mode forward
    passes without gradients); the rest of the model keeps its mode. Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m.momentum, m.training) for m in norms]
    was_training = model.training
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average
        norm.train()
    count = 0
    try:
        for inputs in batches:
            model(inputs.to(device) if device is not None else inputs)
            count += 1
    finally:
        for norm, (momentum, training) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            norm.train(training)
        model.train(was_training)
    return count
