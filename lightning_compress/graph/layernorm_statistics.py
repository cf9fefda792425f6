"""LayerNorm statistics over the kept channels only, so that a pruned LayerNorm shrinks to a plain one. Pure torch.

Two conventions say what a LayerNorm over channels computes once some of its channels are pruned:

- ``"all"`` (the default of :func:`~lightning_compress.graph.compact`): the pruned channels still enter the mean
  and variance with their constant inputs, the network computes what it computed before pruning, and compaction
  keeps those constants (:class:`~lightning_compress.graph.layernorm.CompactLayerNorm`: exact, but a LayerNorm over
  ``K`` of ``C`` channels costs more than a plain one over ``K``).
- ``"kept"``: mean and variance run over the kept channels alone, as in a network built ``K`` wide (what slicing a
  LayerNorm's parameters computes, as Torch-Pruning does, Fang et al. 2023; CoFi, Xia et al. 2022, masks hidden
  dimensions of transformers the same way). Pruning then changes the statistics, the fine-tuning that follows
  trains under them, and compaction gives a plain LayerNorm over ``K`` channels with the same outputs.

:func:`set_kept_statistics` makes a LayerNorm module compute the second while pruned channels are only zeroed: a
forward hook (:class:`KeptStatistics`) normalises every channel by the kept channels' mean and variance, so a pruned
channel still passes gradients (soft pruning lets it regrow) but no longer moves the others. The hook holds no
reference to its module: copies and pickles of the model keep it, and the model's ``state_dict`` is unchanged.

>>> norm = nn.LayerNorm(4)
>>> set_kept_statistics(norm, torch.tensor([True, False, True, True]), dim=-1)
>>> x = torch.randn(3, 4)
>>> plain = F.layer_norm(x[:, [0, 2, 3]], (3,), norm.weight[[0, 2, 3]], norm.bias[[0, 2, 3]])
>>> bool(torch.allclose(norm(x)[:, [0, 2, 3]], plain, atol=1e-6))
True
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.graph.layernorm import CompactLayerNorm

__all__ = ["LAYERNORM_STATISTICS", "KeptStatistics", "check_layernorm_statistics", "exclude_channels",
           "kept_layer_norm", "kept_statistics", "set_kept_statistics", "shrink_with_kept_statistics"]

LAYERNORM_STATISTICS = ("all", "kept")


def check_layernorm_statistics(value: str) -> str:
    """Validate a ``layernorm_statistics`` argument."""
    if value not in LAYERNORM_STATISTICS:
        raise ValueError(f"layernorm_statistics must be one of {LAYERNORM_STATISTICS} ('all': pruned channels stay "
                         f"in a LayerNorm's statistics, exact; 'kept': only kept channels, a plain LayerNorm after "
                         f"compaction), got {value!r}.")
    return value


def kept_layer_norm(x: Tensor, keep: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                    dim: int = -1) -> Tensor:
    """Every channel of ``x`` (along ``dim``) normalised by the mean and (biased) variance of the channels where
    ``keep`` is true, then scaled and shifted per channel.

    >>> x = torch.tensor([[1.0, 100.0, 3.0]])
    >>> kept_layer_norm(x, torch.tensor([True, False, True]), None, None, 0.0).tolist()
    [[-1.0, 98.0, 1.0]]
    """
    moved = x.movedim(dim, -1)
    share = keep.to(device=x.device, dtype=x.dtype) / keep.sum()
    mean = (moved * share).sum(-1, keepdim=True)
    centred = moved - mean
    variance = (centred.square() * share).sum(-1, keepdim=True)
    y = centred * torch.rsqrt(variance + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.movedim(-1, dim)


class KeptStatistics:
    """Forward hook of a LayerNorm module: its output recomputed with statistics over ``keep`` (along ``dim``)."""

    def __init__(self, keep: Tensor, dim: int) -> None:
        self.keep, self.dim = keep.detach().to(torch.bool).cpu().clone(), dim

    def __call__(self, module: nn.LayerNorm, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return kept_layer_norm(args[0], self.keep, module.weight, module.bias, module.eps, self.dim)


def kept_statistics(module: nn.Module) -> KeptStatistics | None:
    """The :class:`KeptStatistics` hook of ``module``, if it has one."""
    return next((h for h in module._forward_hooks.values() if isinstance(h, KeptStatistics)), None)


def set_kept_statistics(module: nn.LayerNorm, keep: Tensor | None, dim: int) -> None:
    """Make ``module`` (a LayerNorm over its input's dimension ``dim``) take its statistics over the channels where
    ``keep`` is true; ``None`` or all true: over all channels again (no hook)."""
    full = keep is None or bool(keep.all())
    if keep is not None and (tuple(module.normalized_shape) != tuple(keep.shape) or not bool(keep.any())):
        raise ValueError(f"keep must be a boolean mask over the {list(module.normalized_shape)} normalised channels "
                         f"with at least one true entry, got shape {tuple(keep.shape)} with {int(keep.sum())} true.")
    if not full and isinstance(module, CompactLayerNorm) and module.removed.numel():
        raise ValueError("This CompactLayerNorm keeps removed channels in its statistics (layernorm_statistics='all'"
                         "); it cannot also take them over kept channels only.")
    _drop_hooks(module)
    if not full:
        module.register_forward_hook(KeptStatistics(cast(Tensor, keep), dim))


def _drop_hooks(module: nn.Module) -> None:
    for key in [k for k, h in module._forward_hooks.items() if isinstance(h, KeptStatistics)]:
        del module._forward_hooks[key]


def exclude_channels(modules: dict[str, nn.Module], excluded: dict[str, list[int]], dims: dict[str, int]) -> None:
    """Take the statistics of each LayerNorm ``modules[name]`` (over its input's dimension ``dims[name]``) without
    its channels ``excluded[name]``."""
    for name, indices in excluded.items():
        norm = cast(nn.LayerNorm, modules[name])
        keep = torch.ones(norm.normalized_shape[0], dtype=torch.bool)
        keep[indices] = False
        set_kept_statistics(norm, keep, dims[name])


def shrink_with_kept_statistics(norm: nn.LayerNorm, removed: dict[int, float], dim: int) -> nn.Module:
    """``norm`` (with a :class:`KeptStatistics` hook) without the ``removed`` channels (index -> constant input),
    computing what it computed: removed channels outside its statistics simply go, removed ones inside stay in them
    as constants (a :class:`CompactLayerNorm`), kept ones outside keep a hook (not both). Without either, a plain
    copy of ``norm``'s type over the kept channels (Torch-Pruning's slicing)."""
    hook = kept_statistics(norm)
    assert hook is not None
    keep, size = hook.keep, norm.normalized_shape[0]
    inside = {i: v for i, v in removed.items() if bool(keep[i])}
    outside = [i for i in range(size) if i not in removed and not keep[i]]
    if inside and outside:
        raise ValueError(f"LayerNorm over {size} channels: compaction removes channels {sorted(inside)} that its "
                         f"statistics include and keeps channels {outside} that they exclude; no LayerNorm computes "
                         "both. Exclude the removed ones too (set_kept_statistics) or compact with all statistics.")
    stay = [i for i in range(size) if i not in removed or i in inside]  # channels of the statistics' LayerNorm
    small = _sliced(norm, torch.tensor(stay, dtype=torch.long), dim)
    if inside:
        position = {channel: j for j, channel in enumerate(stay)}
        small = CompactLayerNorm.from_layernorm(small, {position[i]: v for i, v in inside.items()}, dim)
    set_kept_statistics(small, keep[[i for i in range(size) if i not in removed]], dim)
    return small


def _sliced(norm: nn.LayerNorm, index: Tensor, dim: int) -> nn.LayerNorm:
    """A LayerNorm over ``norm``'s channels ``index``: an ``nn.LayerNorm``, a copy of a subclass with sliced
    parameters where it still computes a LayerNorm over ``dim`` (checked on a probe), else a
    :class:`CompactLayerNorm` with nothing removed."""
    kept = len(index)
    parameters = {name: getattr(norm, name)[index.to(getattr(norm, name).device)].detach().clone()
                  for name in ("weight", "bias") if getattr(norm, name) is not None}
    small: nn.LayerNorm | None = None
    if type(norm) is nn.LayerNorm:
        small = nn.LayerNorm(kept, norm.eps, norm.elementwise_affine, bias=norm.bias is not None)
    elif not isinstance(norm, CompactLayerNorm):
        small = copy.deepcopy(norm)
        small.normalized_shape = (kept,)
        _drop_hooks(small)
    if small is not None:
        _set_parameters(small, norm, parameters)
    if small is None or (type(small) is not nn.LayerNorm and not _computes_layer_norm(small, dim)):
        device = next(iter(parameters.values())).device if parameters else None
        small = CompactLayerNorm(kept, kept, torch.zeros(0), dim, norm.eps, "weight" in parameters,
                                 "bias" in parameters, device)
        _set_parameters(small, norm, parameters)
    return small.train(norm.training)


def _set_parameters(small: nn.Module, norm: nn.Module, parameters: dict[str, Tensor]) -> None:
    for name, value in parameters.items():
        setattr(small, name, nn.Parameter(value, requires_grad=getattr(norm, name).requires_grad))


def _computes_layer_norm(norm: nn.LayerNorm, dim: int) -> bool:
    """Whether ``norm`` computes ``F.layer_norm`` over dimension ``dim`` of a probe (a 4-d one for ``dim != -1``)."""
    parameter = norm.weight if norm.weight is not None else norm.bias
    kept = norm.normalized_shape[0]
    shape = (2, 3, 3, kept) if dim == -1 else (2, kept, 3, 3)
    generator = torch.Generator().manual_seed(0)
    probe = (torch.randn(shape, generator=generator) * 2 + 0.5).to(
        parameter.device if parameter is not None else None)
    try:
        with torch.no_grad():
            out = norm(probe)
            reference = F.layer_norm(probe.movedim(dim, -1), (kept,), norm.weight, norm.bias, norm.eps).movedim(-1,
                                                                                                              dim)
    except Exception:  # a subclass that reads its own shape elsewhere
        return False
    return isinstance(out, Tensor) and out.shape == reference.shape and bool(torch.allclose(out, reference, 1e-4,
                                                                                             1e-5))
