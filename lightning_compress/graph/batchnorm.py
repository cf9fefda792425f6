"""BatchNorm around pruned filters: find the BN that normalises a layer's output (and only it), zero pruned channels in
it, and re-estimate running statistics after pruning. Pure torch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_compress.graph.tracing import Call, tensors_in, trace


def batchnorm_links(model: nn.Module, example_inputs: Any, names: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """Map each layer in ``names`` to ``(bn, sole)``: ``bn`` is the BatchNorm that reads the layer's output directly
    and is called only once in the forward (so it normalises nothing else); ``sole`` says it is the output's only
    reader (the layer called once, its output neither read by any other operation nor returned). Traced on one
    eval-mode forward (:func:`~lightning_compress.graph.tracing.trace`), functional operations included.

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    >>> batchnorm_links(model, torch.zeros(1, 1, 5, 5), ["0"])
    {'0': ('1', True)}
    """
    recorded = trace(model, example_inputs)
    calls = Counter(call.name for call in recorded.calls if call.module is not None)
    readers: dict[int, list[Call]] = {}
    for call in recorded.calls:
        if tensors_in(call.output):  # shapes and sizes read no values
            for tensor_id in {id(x) for x in tensors_in((call.args, call.kwargs))}:
                readers.setdefault(tensor_id, []).append(call)
    returned = {id(x) for x in recorded.outputs}
    wanted, links = set(names), {}
    for call in recorded.calls:
        if call.module is None or call.name not in wanted or call.name in links:
            continue
        reading = readers.get(id(call.output), []) if isinstance(call.output, torch.Tensor) else []
        norm = next((r for r in reading if isinstance(r.module, _BatchNorm) and calls[r.name] == 1), None)
        if norm is not None:
            sole = len(reading) == 1 and calls[call.name] == 1 and id(call.output) not in returned
            links[call.name] = (norm.name, sole)
    return links


def batchnorm_after(model: nn.Module, example_inputs: Any, names: Iterable[str]) -> dict[str, str]:
    """Map each layer in ``names`` to the BatchNorm that consumes its output directly and nothing else (see
    :func:`batchnorm_links`; a BatchNorm applied to several tensors is no layer's).

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    >>> batchnorm_after(model, torch.zeros(1, 1, 5, 5), ["0"])
    {'0': '1'}
    """
    return {name: norm for name, (norm, _) in batchnorm_links(model, example_inputs, names).items()}


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
