"""Finding the model input inside a batch, and the order in which layers run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def first_tensor(batch: Any) -> torch.Tensor:
    """The first tensor of a batch: the batch itself, its first element, or its first dictionary value.

    >>> first_tensor((torch.zeros(2, 3), torch.ones(2))).shape
    torch.Size([2, 3])
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return first_tensor(batch[0])
    if isinstance(batch, dict) and batch:
        return first_tensor(next(iter(batch.values())))
    raise TypeError(f"Cannot find an input tensor in a batch of type {type(batch).__name__}.")


def execution_order(model: nn.Module, example_inputs: Any, names: list[str] | None = None) -> list[str]:
    """Qualified names of the leaf modules of ``model`` (or of ``names``) in the order one forward pass calls them.

    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> execution_order(model, torch.zeros(1, 2), names=["2", "0"])
    ['0', '2']
    """
    modules = dict(model.named_modules())
    watched = names if names is not None else [n for n, m in modules.items() if n and not list(m.children())]
    order: list[str] = []
    handles = [
        modules[name].register_forward_pre_hook(lambda _m, _a, name=name: order.append(name)) for name in watched
    ]
    probe_forward(model, example_inputs, handles)
    return list(dict.fromkeys(order))


def probe_forward(model: nn.Module, example_inputs: Any, handles: Iterable[RemovableHandle] = ()) -> Any:
    """One forward pass in eval mode without gradients, for the hooks behind ``handles`` to observe; the model's
    training flags are restored and the hooks removed afterwards, even on error. Returns the output."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(*(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def stage_loader(trainer: Any, kind: str, prefer_trainer: bool = False) -> Any:
    """One loader of ``kind`` (``"train"`` or ``"val"``): a fresh one from the data module (every sample, not a DDP
    shard) or the one the trainer holds (``prefer_trainer`` picks which comes first); the training loader falls back
    on the fit loop's data source (the module's own ``train_dataloader``) before the trainer has built it. The first
    of a list of loaders; ``None`` when there is none."""
    if kind not in ("train", "val"):
        raise ValueError(f"kind must be 'train' or 'val', got {kind!r}.")
    sources = [_trainer_loader, _datamodule_loader]
    for source in sources if prefer_trainer else reversed(sources):
        loader = source(trainer, kind)
        if loader is not None:
            return loader[0] if isinstance(loader, (list, tuple)) else loader
    return None


def _datamodule_loader(trainer: Any, kind: str) -> Any:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return None
    try:
        return getattr(datamodule, f"{kind}_dataloader")()
    except (NotImplementedError, AttributeError, TypeError):
        return None


def _trainer_loader(trainer: Any, kind: str) -> Any:
    if kind == "val":
        return trainer.val_dataloaders
    if trainer.train_dataloader is not None:
        return trainer.train_dataloader
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    return source.dataloader() if source is not None and source.is_defined() else None


def first_training_batch(trainer: Any) -> Any:
    """The first batch of the training data (to build a module from its shapes); a clear error when there is none."""
    loader = stage_loader(trainer, "train")
    if loader is None:
        raise ValueError("No training data to take an example batch from: give the module input_shape, or the "
                         "trainer a datamodule or train_dataloaders.")
    return next(iter(loader))
