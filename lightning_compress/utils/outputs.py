"""One rule, used by every callback and distillation module, for what a model takes from a batch and where its
logits are in what it returns: plain tensors, tuples, dictionaries and Hugging Face ``ModelOutput`` alike.

Inputs (:func:`model_inputs`): a tensor batch is the input; a list or tuple ``(inputs, labels, ...)`` gives its
first element; a dictionary gives every entry except the labels (:data:`LABEL_KEYS`), e.g. ``input_ids`` and
``attention_mask`` of a tokenized batch (a single remaining entry, e.g. ``image``, is the input itself).

Calling (:func:`run_model`): a dictionary of inputs goes in as keyword arguments (``model(**inputs)``) when the
forward accepts them, else the dictionary itself as the one argument (a ``forward(batch)`` reading
``batch["image"]``); a tuple as several positional arguments; anything else as the one argument.

Logits (:func:`logits_of`): a tensor is the logits; otherwise ``accessor`` when given (an attribute or key name, or
a callable); else the ``logits`` key or attribute (``ModelOutput``, a dictionary); else the first tensor of a
tuple, list or dictionary (``model(x, return_dict=False)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

#: Dictionary keys read as the labels of a batch (and left out of the model's inputs), in this order.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")

#: A user's way to the logits: an attribute or key name, or a callable on the model's output.
Accessor = str | Callable[[Any], torch.Tensor] | None


def model_inputs(batch: Any) -> Any:
    """The part of ``batch`` the model takes (module docstring).

    >>> sorted(model_inputs({"input_ids": torch.zeros(2, 4), "attention_mask": torch.ones(2, 4),
    ...                      "labels": torch.zeros(2)}))
    ['attention_mask', 'input_ids']
    >>> model_inputs((torch.zeros(2, 3), torch.ones(2))).shape
    torch.Size([2, 3])
    >>> model_inputs({"image": torch.zeros(2, 3), "label": torch.zeros(2)}).shape
    torch.Size([2, 3])
    """
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key not in LABEL_KEYS}
        if not inputs:
            raise TypeError(f"A batch dictionary with only label keys {list(batch)} holds no model input.")
        return next(iter(inputs.values())) if len(inputs) == 1 else inputs
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise TypeError("An empty batch holds no model input.")
        return batch[0]
    return batch


def accepts_keywords(model: nn.Module, names: list[str]) -> bool:
    """Whether ``model``'s forward takes every one of ``names`` as a keyword (or takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True
    keywords = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return set(names) <= keywords


def run_model(model: nn.Module, inputs: Any, **options: Any) -> Any:
    """``model`` on ``inputs`` by the calling rule (module docstring); ``options`` (e.g. ``output_hidden_states=
    True``) are passed as keywords.

    >>> run_model(nn.Linear(3, 2), {"input": torch.zeros(4, 3)}).shape
    torch.Size([4, 2])
    """
    if isinstance(inputs, Mapping):
        if accepts_keywords(model, list(inputs)):
            return model(**inputs, **options)
        return model(inputs, **options)
    if isinstance(inputs, tuple):
        return model(*inputs, **options)
    return model(inputs, **options)


def first_tensor_of(output: Any) -> torch.Tensor | None:
    """The first tensor in ``output`` (itself, or the first one found in a tuple, list or dictionary, depth first)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (list, tuple)) else ()
    for value in values:
        found = first_tensor_of(value)
        if found is not None:
            return found
    return None


def logits_of(output: Any, accessor: Accessor = None) -> torch.Tensor:
    """The logits in a model's ``output`` (module docstring).

    >>> logits_of({"loss": None, "logits": torch.ones(2, 3)}).shape
    torch.Size([2, 3])
    >>> logits_of((torch.zeros(2, 5), torch.ones(2))).shape
    torch.Size([2, 5])

    Raises:
        TypeError: when ``accessor`` does not lead to a tensor, or the output holds none.
    """
    if isinstance(output, torch.Tensor) and accessor is None:
        return output
    if accessor is not None:
        found = accessor(output) if callable(accessor) else (
            output[accessor] if isinstance(output, Mapping) and accessor in output else getattr(output, accessor, None))
        if not isinstance(found, torch.Tensor):
            raise TypeError(f"The logits accessor {accessor!r} gives {type(found).__name__} from a model output of "
                            f"type {type(output).__name__}, not a tensor.")
        return found
    found = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    found = first_tensor_of(output)
    if found is None:
        raise TypeError(f"Found no logits in a model output of type {type(output).__name__}: give the output a "
                        "'logits' entry, return a tensor, or pass a logits accessor (logits_key).")
    return found


def model_logits(model: nn.Module, inputs: Any, accessor: Accessor = None, **options: Any) -> torch.Tensor:
    """``logits_of(run_model(model, inputs, **options), accessor)``."""
    return logits_of(run_model(model, inputs, **options), accessor)


def map_inputs(inputs: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``function`` applied to every tensor of model inputs (a tensor, or a tuple or dictionary of them)."""
    if isinstance(inputs, torch.Tensor):
        return function(inputs)
    if isinstance(inputs, Mapping):
        return {key: map_inputs(value, function) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(map_inputs(value, function) for value in inputs)
    return inputs


def move_inputs(inputs: Any, device: torch.device | str) -> Any:
    """``inputs`` (a tensor, a tuple or a dictionary of them) on ``device``."""
    return map_inputs(inputs, lambda tensor: tensor.to(device))


def batch_size_of(inputs: Any) -> int:
    """Number of samples in model inputs (the first dimension of their first tensor)."""
    tensor = first_tensor_of(inputs)
    if tensor is None:
        raise TypeError(f"No tensor in model inputs of type {type(inputs).__name__}.")
    return int(tensor.shape[0])


def concat_inputs(chunks: list[Any]) -> Any:
    """Model inputs of several batches joined along the first dimension (tensors, tuples or dictionaries)."""
    first = chunks[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(chunks)
    if isinstance(first, Mapping):
        return {key: concat_inputs([chunk[key] for chunk in chunks]) for key in first}
    if isinstance(first, tuple):
        return tuple(concat_inputs([chunk[i] for chunk in chunks]) for i in range(len(first)))
    return first
