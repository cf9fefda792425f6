"""Which weights of a transformer unstructured pruning touches (no Lightning): token embeddings left alone by
default, the fused Q/K/V projection of ``nn.MultiheadAttention`` included, and ``exclude`` patterns that must match.

The embedding rule (:func:`is_embedding`): a layer is an embedding when its weight is the weight of an
``nn.Embedding`` of the model (a tied language-model head: GPT-2's ``lm_head``, BERT's MLM decoder), or when a part
of its qualified name contains ``embed`` (``embeddings.word_embeddings``, ``token_embedding``, ``patch_embed``).
Pruning token embeddings cuts whole vocabulary entries' information and costs far more accuracy than the same
sparsity elsewhere (issue 18: 0.394 after fine-tuning against 0.780 with them left dense).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: The suffix under which an ``nn.MultiheadAttention``'s fused Q/K/V weight is pruned and logged.
IN_PROJ = "in_proj"


class InProjection:
    """The fused Q/K/V weight (``in_proj_weight``, ``(3 E, E)``) of an ``nn.MultiheadAttention``, seen as a layer with
    a ``weight`` (what the pruning callbacks read and mask in place)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        self.attention = attention

    @property
    def weight(self) -> torch.Tensor:
        weight = self.attention.in_proj_weight
        assert weight is not None
        return weight


def is_embedding(model: nn.Module, name: str, module: Any) -> bool:
    """The embedding rule (module docstring).

    >>> model = nn.ModuleDict({"embeddings": nn.Linear(4, 2), "fc": nn.Linear(2, 2)})
    >>> is_embedding(model, "embeddings", model["embeddings"]), is_embedding(model, "fc", model["fc"])
    (True, False)
    """
    if any("embed" in part.lower() for part in name.split(".")):
        return True
    weight = getattr(module, "weight", None)
    return weight is not None and any(isinstance(m, nn.Embedding) and m.weight is weight for m in model.modules())


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or re.fullmatch(p, name) is not None for p in patterns)


def check_exclude_matches(model: nn.Module, exclude: str | Sequence[str] | None, who: str) -> None:
    """Every ``exclude`` pattern must match a module of ``model`` (a qualified name, or a regex matching one whole):
    a pattern that matches nothing excludes nothing, silently."""
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
    names = [name for name, _ in model.named_modules() if name] + [
        f"{name}.{IN_PROJ}" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for pattern in patterns:
        if not _matches_any_name(pattern, names):
            raise ValueError(
                f"{who}: exclude pattern {pattern!r} matches no module of {type(model).__name__} (a pattern matches "
                f"a whole qualified name, e.g. '.*{pattern}.*'); names look like {names[:6]}.")


def _matches_any_name(pattern: str, names: list[str]) -> bool:
    return any(_matches(name, [pattern]) for name in names)


def transformer_aware_layers(model: nn.Module, modules: dict[str, Any], layers: str | Sequence[str] | None,
                             exclude: str | Sequence[str] | None, prune_embeddings: bool) -> dict[str, Any]:
    """``modules`` (selected by name and type) without embeddings unless ``prune_embeddings``, plus the fused Q/K/V
    weight of each ``nn.MultiheadAttention`` (as ``<name>.in_proj``, an :class:`InProjection`) and each Hugging
    Face ``Conv1D`` (GPT-2) that ``layers`` (all when ``None``) chooses and ``exclude`` does not."""
    chosen = {n: m for n, m in modules.items() if prune_embeddings or not is_embedding(model, n, m)}
    includes = [layers] if isinstance(layers, str) else list(layers or [])
    excludes = [exclude] if isinstance(exclude, str) else list(exclude or [])
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), nn.Parameter) \
                and (not includes or _matches(name, includes)) and not _matches(name, excludes) \
                and (prune_embeddings or not is_embedding(model, name, module)):
            chosen.setdefault(name, module)  # Hugging Face's Conv1D (GPT-2's Linear, weight transposed)
        if not isinstance(module, nn.MultiheadAttention) or module.in_proj_weight is None:
            continue
        names = [name, f"{name}.{IN_PROJ}"]
        if includes and not any(_matches(n, includes) for n in names):
            continue
        if any(_matches(n, excludes) for n in names) or (not prune_embeddings and is_embedding(model, name, None)):
            continue
        chosen[f"{name}.{IN_PROJ}"] = InProjection(module)
    return chosen


__all__ = ["IN_PROJ", "InProjection", "check_exclude_matches", "is_embedding", "transformer_aware_layers"]
