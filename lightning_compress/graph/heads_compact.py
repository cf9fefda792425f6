"""Removing pruned heads and feed-forward neurons: smaller Q/K/V/O and FFN layers, the head count updated where the
module stores it. Pure torch.

Hugging Face attention modules reshape with ``-1`` heads, so slicing their ``Linear`` / ``Conv1D`` weights and
updating ``num_attention_heads`` / ``all_head_size`` (BERT), ``num_heads`` / ``split_size`` (GPT-2) or the head count of
``q_proj``-style modules is enough. ``torch.nn.MultiheadAttention`` ties its inner width to ``embed_dim``, so it is
replaced by :class:`CompactMultiheadAttention` (same call signature and results); ``nn.TransformerEncoder`` then
leaves its fused fast path, which only runs the original module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.graph.heads import UnitGroup, find_unit_groups


class CompactMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with fewer heads than ``embed_dim / head_dim``: separate ``q_proj``/``k_proj``/
    ``v_proj`` of width ``num_heads * head_dim`` and ``o_proj`` back to ``embed_dim``. Takes and returns what
    ``nn.MultiheadAttention`` does (3-D per-head ``attn_mask`` excepted: heads were removed)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, out_bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.o_proj = nn.Linear(inner, embed_dim, bias=out_bias)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        # What nn.TransformerEncoderLayer's fast-path checks read: they turn it off for this module.
        self._qkv_same_embed_dim = False
        self.in_proj_weight: torch.Tensor | None = None
        self.in_proj_bias: torch.Tensor | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, batch, _ = query.shape
        source = key.shape[0]

        def split(x: torch.Tensor, n: int) -> torch.Tensor:
            return x.transpose(0, 1).reshape(batch, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(query), length), split(self.k_proj(key), source), split(self.v_proj(value), source)
        mask = self._additive_mask(attn_mask, key_padding_mask, batch, length, source, q.dtype)
        if mask is None and is_causal:
            mask = torch.full((length, source), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            probs = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(probs, dropout, self.training) @ v
            weights = probs.mean(dim=1) if average_attn_weights else probs
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        if not batched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights

    @staticmethod
    def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int,
                       length: int, source: int, dtype: torch.dtype) -> torch.Tensor | None:
        def additive(mask: torch.Tensor) -> torch.Tensor:
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
            return mask.to(dtype)

        combined = None
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError("CompactMultiheadAttention takes a 2-D attn_mask (length, source); per-head 3-D "
                                 f"masks refer to removed heads (got shape {tuple(attn_mask.shape)}).")
            combined = additive(attn_mask).view(1, 1, length, source)
        if key_padding_mask is not None:
            padding = additive(key_padding_mask).view(batch, 1, 1, source)
            combined = padding if combined is None else combined + padding
        return combined


def mha_with_heads(old: nn.MultiheadAttention, kept: torch.Tensor) -> CompactMultiheadAttention:
    """A :class:`CompactMultiheadAttention` holding the heads ``kept`` (indices) of ``old`` (all: the same outputs
    with separate Q/K/V/O ``Linear`` layers)."""
    embed, dim = old.embed_dim, old.head_dim
    new = CompactMultiheadAttention(embed, len(kept), dim, bias=old.in_proj_bias is not None,
                                    out_bias=old.out_proj.bias is not None, batch_first=old.batch_first,
                                    dropout=old.dropout)
    rows = (kept.view(-1, 1) * dim + torch.arange(dim).view(1, -1)).reshape(-1)
    with torch.no_grad():
        for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
            proj.weight.copy_(old.in_proj_weight[i * embed + rows])
            if old.in_proj_bias is not None:
                proj.bias.copy_(old.in_proj_bias[i * embed + rows])
        new.o_proj.weight.copy_(old.out_proj.weight[:, rows])
        if old.out_proj.bias is not None:
            new.o_proj.bias.copy_(old.out_proj.bias)
    return new.to(old.out_proj.weight.device, old.out_proj.weight.dtype).train(old.training)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _sync_sizes(module: nn.Module) -> None:
    rows, columns = (int(n) for n in module.weight.shape)  # type: ignore[union-attr]
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = rows, columns
    elif hasattr(module, "nf") and hasattr(module, "nx"):
        module.nx, module.nf = rows, columns  # type: ignore[assignment]


@torch.no_grad()
def compact_units(model: nn.Module, groups: Sequence[UnitGroup], keeps: dict[str, torch.Tensor]) -> nn.Module:
    """Remove the units ``keeps[group.name]`` marks False from every group, in place; returns the model (a new
    module only when ``model`` itself is a ``nn.MultiheadAttention``). Groups must describe the model as it is now.

    Raises:
        ValueError: if a keep-mask has the wrong length or keeps no unit of a group.
    """
    root = model
    for group in groups:
        keep = keeps.get(group.name)
        if keep is None:
            continue
        keep = keep.bool().cpu()
        if keep.numel() != group.units or not keep.any():
            raise ValueError(f"Group {group.name!r}: a keep-mask of {group.units} units with at least one kept is "
                             f"needed, got {keep.numel()} entries keeping {int(keep.sum())}.")
        if bool(keep.all()):
            continue
        kept = torch.nonzero(keep).view(-1)
        if group.layout == "mha":
            new = mha_with_heads(root.get_submodule(group.name), kept)  # type: ignore[arg-type]
            if group.name:
                _set_module(root, group.name, new)
            else:
                root = new
            continue
        by_tensor: dict[tuple[str, str, int], list[torch.Tensor]] = {}
        for s in sorted(group.slices, key=lambda s: s.offset):
            by_tensor.setdefault((s.module, s.param, s.dim), []).append(group.index(s, kept))
        for (module_name, param, dim), parts in by_tensor.items():
            module = root.get_submodule(module_name)
            old = getattr(module, param)
            index = torch.cat(parts).to(old.device)
            setattr(module, param, nn.Parameter(old.index_select(dim, index).clone(), requires_grad=old.requires_grad))
            _sync_sizes(module)
        for module_name, attrs in group.counts.items():
            module = root.get_submodule(module_name)
            for attr, what in attrs.items():
                setattr(module, attr, len(kept) if what == "heads" else len(kept) * group.width)
    for module in root.modules():  # an encoder over compacted attention must not take the fused path
        if hasattr(module, "use_nested_tensor") and any(isinstance(m, CompactMultiheadAttention)
                                                        for m in module.modules()):
            module.use_nested_tensor = False  # type: ignore[assignment]
    return root


def unit_counts(model: nn.Module) -> dict[str, int]:
    """``{group name: units}`` of every head and feed-forward group of ``model`` (to check a compaction)."""
    return {g.name: g.units for g in find_unit_groups(model)[0]}
