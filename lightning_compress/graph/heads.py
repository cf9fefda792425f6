"""Attention heads and feed-forward neurons of transformers as prunable structures. Pure torch.

A :class:`UnitGroup` is a set of equally wide *units* (the heads of one attention layer, or the intermediate
neurons of one feed-forward block) and the tensor slices each unit owns: the rows of the Q/K/V projections (and
their biases) or of the first FFN layer that produce it, and the columns of the output projection that read it.
Zeroing a unit's producer rows and consumer columns removes its contribution exactly; removing them
(:mod:`~lightning_compress.graph.heads_compact`) gives a smaller dense model with the same outputs.

Layouts recognised (:func:`find_unit_groups`):

- attention: Hugging Face BERT/RoBERTa-style ``query``/``key``/``value`` with the parent's ``output.dense``;
  ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (ViT in ``transformers`` 5, many others; without grouped K/V heads);
  GPT-2 ``c_attn``/``c_proj`` (``Conv1D``, weights stored transposed); ``torch.nn.MultiheadAttention`` with packed
  ``in_proj_weight``;
- feed-forward: ``intermediate.dense`` + ``output.dense`` (BERT), ``c_fc``/``c_proj`` (GPT-2), ``fc1``/``fc2``,
  ``gate_proj``/``up_proj``/``down_proj``, ``linear1``/``linear2`` (``nn.TransformerEncoderLayer``).

Any other module whose class name says ``Attention`` is reported as unsupported, with the reason, never skipped
silently. Head importance: the Lp norm of a head's weights, or the first-order Taylor estimate of Michel et al.
(NeurIPS 2019, "Are Sixteen Heads Really Better than One?"): ``|dL/d xi_h|`` for a gate ``xi_h`` on the head's output,
which equals ``|sum(W_O[:, h] * grad W_O[:, h])|`` over the output projection's columns of the head
(:func:`taylor_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: How units are counted on the module that stores the count: "heads" (number of heads) or "inner" (heads * dim).
CountAttrs = dict[str, str]


@dataclass(frozen=True)
class Slice:
    """Entries ``offset + unit * width + [0, width)`` of ``module.param`` along ``dim``; ``role`` is ``"produce"``
    (rows that compute the unit) or ``"consume"`` (columns that read it)."""

    module: str
    param: str
    dim: int
    offset: int
    role: str


@dataclass
class UnitGroup:
    """The units of one attention layer (``kind="heads"``) or one feed-forward block (``kind="ffn"``)."""

    name: str
    kind: str
    layout: str
    units: int
    width: int
    slices: list[Slice]
    counts: dict[str, CountAttrs] = field(default_factory=dict)  # module -> {attribute: "heads" | "inner"}

    def tensors(self, model: nn.Module) -> list[tuple[Slice, torch.Tensor]]:
        modules = dict(model.named_modules())
        return [(s, getattr(modules[s.module], s.param)) for s in self.slices]

    def index(self, s: Slice, units: torch.Tensor) -> torch.Tensor:
        """Positions along ``s.dim`` of the given ``units``."""
        within = torch.arange(self.width)
        return (s.offset + units.view(-1, 1) * self.width + within.view(1, -1)).reshape(-1)


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (a Linear with a transposed weight) without importing ``transformers``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _linear(module: object) -> bool:
    return isinstance(module, nn.Linear)


def _dims(module: nn.Module) -> tuple[int, int]:
    """(produce dim, consume dim) of a Linear or Conv1D weight."""
    return (1, 0) if _is_conv1d(module) else (0, 1)


def _producer(name: str, module: nn.Module, offset: int = 0) -> list[Slice]:
    dim = _dims(module)[0]
    found = [Slice(name, "weight", dim, offset, "produce")]
    if getattr(module, "bias", None) is not None:
        found.append(Slice(name, "bias", 0, offset, "produce"))
    return found


def _consumer(name: str, module: nn.Module) -> Slice:
    return Slice(name, "weight", _dims(module)[1], 0, "consume")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _attention(name: str, module: nn.Module, parent: tuple[str, nn.Module] | None) -> UnitGroup | str | None:
    """The head group of ``module``, a reason it cannot be pruned, or ``None`` when it is not attention."""
    children = dict(module.named_children())
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            return "separate q/k/v projection weights (kdim/vdim differ from embed_dim) are not supported"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        heads, dim, embed = module.num_heads, module.head_dim, module.embed_dim
        slices = [Slice(name, "in_proj_weight", 0, i * embed, "produce") for i in range(3)]
        if module.in_proj_bias is not None:
            slices += [Slice(name, "in_proj_bias", 0, i * embed, "produce") for i in range(3)]
        slices.append(Slice(_join(name, "out_proj"), "weight", 1, 0, "consume"))
        return UnitGroup(name, "heads", "mha", heads, dim, slices, {name: {"num_heads": "heads"}})
    if all(_linear(children.get(k)) for k in ("query", "key", "value")) and hasattr(module, "num_attention_heads"):
        dense = getattr(getattr(parent[1], "output", None), "dense", None) if parent else None
        if parent is None or getattr(parent[1], "self", None) is not module or not _linear(dense):
            return "query/key/value found but not the output projection (expected the parent's output.dense)"
        heads, dim = int(module.num_attention_heads), int(module.attention_head_size)
        slices = [s for k in ("query", "key", "value") for s in _producer(_join(name, k), children[k])]
        slices.append(_consumer(_join(parent[0], "output.dense"), dense))  # type: ignore[arg-type]
        counts = {name: {"num_attention_heads": "heads", "all_head_size": "inner"}}
        return UnitGroup(name, "heads", "bert", heads, dim, slices, counts)
    if all(_linear(children.get(k)) for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
        attr = next((a for a in ("num_attention_heads", "num_heads") if isinstance(getattr(module, a, None), int)),
                    None)
        dim = getattr(module, "head_dim", None)
        if attr is None or not isinstance(dim, int):
            return "q_proj/k_proj/v_proj/o_proj without integer num_heads/num_attention_heads and head_dim attributes"
        heads = int(getattr(module, attr))
        kv = getattr(module, "num_key_value_heads", heads)
        if kv != heads or _width(children["k_proj"], 0) != heads * dim:
            return f"grouped key/value heads ({kv} K/V heads for {heads} query heads) are not supported"
        slices = [s for k in ("q_proj", "k_proj", "v_proj") for s in _producer(_join(name, k), children[k])]
        slices.append(_consumer(_join(name, "o_proj"), children["o_proj"]))
        return UnitGroup(name, "heads", "qkvo", heads, dim, slices, {name: {attr: "heads"}})
    if _is_conv1d(children.get("c_attn", nn.Identity())) and _is_conv1d(children.get("c_proj", nn.Identity())) \
            and hasattr(module, "split_size"):
        if getattr(module, "is_cross_attention", False) or "q_attn" in children:
            return "GPT-2 cross-attention (q_attn) is not supported"
        heads, dim, split = (int(getattr(module, a)) for a in ("num_heads", "head_dim", "split_size"))
        slices = [Slice(_join(name, "c_attn"), "weight", 1, i * split, "produce") for i in range(3)]
        slices += [Slice(_join(name, "c_attn"), "bias", 0, i * split, "produce") for i in range(3)]
        slices.append(_consumer(_join(name, "c_proj"), children["c_proj"]))
        counts = {name: {"num_heads": "heads", "split_size": "inner"}}
        return UnitGroup(name, "heads", "gpt2", heads, dim, slices, counts)
    return None


_FFN_PAIRS = [(("intermediate.dense",), "output.dense"), (("c_fc",), "c_proj"), (("fc1",), "fc2"),
              (("gate_proj", "up_proj"), "down_proj"), (("linear1",), "linear2")]


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if not isinstance(module, nn.Module):
            return None
    return module


def _width(module: nn.Module, which: int) -> int:
    """Output (``which=0``) or input (``which=1``) features of a Linear or Conv1D."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[_dims(module)[which]])


def _ffn(name: str, module: nn.Module) -> UnitGroup | None:
    for producers, consumer in _FFN_PAIRS:
        found = [_submodule(module, p) for p in producers]
        out = _submodule(module, consumer)
        if out is None or not all(f is not None and (_linear(f) or _is_conv1d(f)) for f in found):
            continue
        if not (_linear(out) or _is_conv1d(out)):
            continue
        inner = _width(out, 1)
        if any(_width(f, 0) != inner for f in found):  # type: ignore[arg-type]
            continue
        if consumer == "c_proj" and hasattr(module, "c_attn"):  # GPT-2 attention, not its MLP
            continue
        slices = [s for p, f in zip(producers, found, strict=True) for s in _producer(_join(name, p), f)]  # type: ignore[arg-type]
        slices.append(_consumer(_join(name, consumer), out))
        return UnitGroup(_join(name, producers[0]), "ffn", "+".join(producers) + ">" + consumer, int(inner), 1, slices)
    return None


def find_unit_groups(model: nn.Module, heads: bool = True, ffn: bool = True
                     ) -> tuple[list[UnitGroup], dict[str, str]]:
    """The head groups and feed-forward groups of ``model`` in module order, and ``{module: reason}`` for
    attention-like modules that cannot be pruned.

    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    >>> groups, unsupported = find_unit_groups(layer)
    >>> [(g.name, g.kind, g.units, g.width) for g in groups], unsupported
    ([('linear1', 'ffn', 16, 1), ('self_attn', 'heads', 2, 4)], {})
    """
    groups: list[UnitGroup] = []
    unsupported: dict[str, str] = {}
    owned: list[str] = []  # modules inside a recognised group

    def inside(name: str) -> bool:
        return any(name == o or name.startswith(o + ".") for o in owned)

    parents: dict[str, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        for child, _ in module.named_children():
            parents[_join(name, child)] = (name, module)
    for name, module in model.named_modules():
        if inside(name):
            continue
        found = _attention(name, module, parents.get(name))
        if isinstance(found, UnitGroup):
            owned.append(name)
            if heads:
                groups.append(found)
            continue
        if isinstance(found, str):
            if heads:  # only a problem when heads are pruned
                unsupported[name or type(module).__name__] = found
            owned.append(name)
            continue
        group = _ffn(name, module) if ffn else None
        if group is not None:
            groups.append(group)
    for name, module in model.named_modules():  # attention we do not know: named, never skipped silently
        related = inside(name) or any(o.startswith(name + ".") or not name for o in owned)
        if heads and "attention" in type(module).__name__.lower() and not related and \
                any(True for _ in module.parameters()):
            unsupported[name or type(module).__name__] = (
                f"unknown attention layout ({type(module).__name__}): not pruned")
    return groups, unsupported


# -- scores and masks -----------------------------------------------------------------------------------------
def _unit_view(group: UnitGroup, s: Slice, tensor: torch.Tensor) -> torch.Tensor:
    """``(units, entries)`` view of the slice's entries of ``tensor``."""
    index = group.index(s, torch.arange(group.units)).to(tensor.device)
    picked = tensor.detach().index_select(s.dim, index).movedim(s.dim, 0)
    return picked.reshape(group.units, group.width, -1).reshape(group.units, -1)


def norm_scores(model: nn.Module, group: UnitGroup, p: int = 2) -> torch.Tensor:
    """Per unit, the Lp norm of all weights it owns (Q/K/V rows, biases and output-projection columns)."""
    parts = [_unit_view(group, s, t).float().cpu() for s, t in group.tensors(model)]
    return torch.cat(parts, dim=1).norm(p=p, dim=1)


def taylor_scores(model: nn.Module, group: UnitGroup) -> torch.Tensor:
    """Per unit, ``|sum(W * dL/dW)|`` over its output-projection columns: the first-order Taylor importance
    ``|dL/d xi|`` of a gate on the unit's output (Michel et al. 2019). Zeros where no gradient exists."""
    total = torch.zeros(group.units)
    for s, tensor in group.tensors(model):
        if s.role != "consume" or tensor.grad is None:
            continue
        w, g = _unit_view(group, s, tensor), _unit_view(group, s, tensor.grad)
        total += (w.float() * g.float()).sum(dim=1).cpu()
    return total.abs()


@torch.no_grad()
def mask_units(model: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
    """Zero the producer rows and consumer columns of the units ``keep`` marks False."""
    pruned = torch.nonzero(~keep.bool().cpu()).view(-1)
    if not len(pruned):
        return
    for s, tensor in group.tensors(model):
        tensor.index_fill_(s.dim, group.index(s, pruned).to(tensor.device), 0)
