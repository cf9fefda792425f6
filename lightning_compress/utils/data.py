"""Finding the model input inside a batch, and the order in which layers run."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.utils.modes import eval_mode
from lightning_compress.utils.outputs import (
    LABEL_KEYS,
    accepts_keywords,
    batch_size_of,
    concat_inputs,
    first_tensor_of,
    map_inputs,
    model_inputs,
    move_inputs,
    run_model,
)


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


def check_network_input(network: nn.Module, batch: Any, who: str) -> None:
    """Run ``network`` once (eval mode, no gradients) on ``model_inputs(batch)``, the input every callback of this
    library gives it (:mod:`~lightning_compress.utils.outputs`: a tensor, or a dictionary batch without its labels
    as keyword arguments), and turn a failure into a ``ValueError`` that says what was fed and how to fix it: a
    LightningModule whose ``forward`` does not take that input needs a ``compression_target`` property returning
    the network that does."""
    try:
        inputs = model_inputs(batch)
        if first_tensor_of(inputs) is None:
            raise TypeError(f"no tensor in its inputs {type(inputs).__name__}")
    except TypeError as error:
        raise ValueError(f"{who} cannot find the network's input in a batch of type {type(batch).__name__}: {error}") \
            from error
    device = next(network.parameters(), torch.zeros(())).device
    with explain_forward_failure(network, batch, who):
        probe_forward(network, move_inputs(inputs, device))


def describe_inputs(network: nn.Module, batch: Any) -> str:
    """What :func:`~lightning_compress.utils.outputs.run_model` gives ``network`` from ``batch``, in words."""
    inputs = model_inputs(batch)
    layout = f"a dict with keys {list(batch)}" if isinstance(batch, dict) else type(batch).__name__
    if isinstance(inputs, dict):
        if accepts_keywords(network, list(inputs)):
            return f"the keyword arguments {list(inputs)} of each batch (from {layout})"
        return f"each batch without its labels, a dict with keys {list(inputs)} (from {layout}), as one argument"
    shape = f" (shape {tuple(inputs.shape)})" if isinstance(inputs, torch.Tensor) else ""
    return f"the input tensor of each batch{shape}, from {layout}"


@contextmanager
def explain_forward_failure(network: nn.Module, batch: Any, who: str) -> Iterator[None]:
    """Turn an error raised inside the block (a forward of ``network`` on ``batch``'s inputs) into a ``ValueError``
    naming what was fed and the fix: a ``compression_target`` property returning the network that takes it."""
    try:
        yield
    except Exception as error:
        cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise ValueError(
            f"{who} gives {type(network).__name__} {describe_inputs(network, batch)}, and its forward fails on it "
            f"({cause}). "
            "If your LightningModule's forward takes the whole batch or other inputs, define a "
            "`compression_target` property that returns the network taking them (README, 'Transformers')."
        ) from error


def batch_labels(batch: Any) -> torch.Tensor | None:
    """The labels of a batch: the second element of ``(inputs, labels, ...)``, or the value of the first of
    :data:`LABEL_KEYS` in a dictionary; ``None`` when there is none.

    >>> batch_labels({"image": torch.zeros(2, 3), "label": torch.tensor([1, 0])})
    tensor([1, 0])
    """
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, dict):
        return next((batch[key] for key in LABEL_KEYS if isinstance(batch.get(key), torch.Tensor)), None)
    return None


class ChecksNetworkInput:
    """Callback mixin for work done after training (export, post-training quantization, report): on the fit's
    first training batch, before its optimizer step, check that the compression target runs on the input this
    library will give it (on a copy: quantizers still calibrating must not see the batch), so a mismatch fails
    before training rather than after it."""

    _input_checked = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._input_checked:
            from lightning_compress.utils.target import compression_target

            check_network_input(copy.deepcopy(compression_target(pl_module)), batch, type(self).__name__)
            self._input_checked = True


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
    try:
        with eval_mode(model), torch.no_grad():
            return run_model(model, example_inputs)
    finally:
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


def _loader(trainer: Any, kind: str) -> Any:
    """:func:`~lightning_compress.utils.data.stage_loader`, with ``None`` for a data module's unimplemented hook."""
    try:
        return stage_loader(trainer, kind)
    except MisconfigurationException:  # LightningDataModule's default ``val_dataloader``
        return None


def collect_inputs(trainer: Any, count: int) -> Any:
    """``count`` model inputs (:func:`~lightning_compress.utils.outputs.model_inputs`: a tensor, or a dictionary of
    tensors for dict batches) from the validation loader (else the training loader: the data module's, the one
    given to ``fit`` or the module's own), repeated when there are fewer; on the loader's device (CPU for a plain
    loader).

    Raises:
        RuntimeError: when neither loader gives a batch.
    """
    chunks: list[Any] = []
    for kind in ("val", "train"):
        loader = _loader(trainer, kind)
        for batch in loader if loader is not None else ():
            chunks.append(model_inputs(batch))
            if sum(batch_size_of(c) for c in chunks) >= count:
                break
        if chunks:
            break
    if not chunks:
        raise RuntimeError("Found no validation or training batch to take example inputs from; give the Trainer "
                           "data, or override CompressionReport.example_inputs.")
    inputs = concat_inputs(chunks)
    index = torch.arange(count) % batch_size_of(inputs)
    return map_inputs(inputs, lambda tensor: tensor[index.to(tensor.device)])
