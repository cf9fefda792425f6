"""LayerNorm over channels, shrunk exactly: the removed channels' constant inputs stay in its statistics. Pure torch.

A LayerNorm over ``C`` channels mixes them through its mean and variance, so a channel cannot simply go. In a pruned
(masked) network a removed channel reaches the norm as a known per-channel constant ``v_j`` (usually 0, see
:mod:`~lightning_compress.graph.dependency`) and leaves it as exactly 0 once its scale and shift are zeroed (as a
BatchNorm's are for pruned filters). Over the ``K`` kept channels the norm then computes

    mean = (sum_kept x + sum_removed v) / C,   var = (sum_kept (x - mean)^2 + sum_removed (v - mean)^2) / C,

which :class:`CompactLayerNorm` does, so compaction stays exact. It keeps the constants as a buffer and computes this
in one of two forms. The padded form puts them back beside the kept channels for one fused ``F.layer_norm`` over ``C``
and copies the kept channels out, contiguous (under autograd, tracing and compilation, on other devices and dtypes,
and for small inputs). Float CPU inference on inputs of at least ``CompactLayerNorm.closed_form_size`` padded elements
takes a closed form that never builds the ``C`` channels: with ``S`` the sum of all ``C`` inputs, ``d = x - S / C``
the centred kept inputs and ``vbar`` the constants' mean,

    C (var + eps) = sum_kept d^2 + sum_removed (v - vbar)^2 + (C - K) (S / C - vbar)^2 + C eps,

then ``d * rsqrt(var + eps) * weight + bias`` in place (two passes over ``x`` for the statistics, as stable as the
norm's own). It moves about half the memory of the padded form but makes eight torch calls to its three, which only
pays on large inputs.

Modules qualify when they normalise over their input's channel dimension alone: ``nn.LayerNorm`` over the last
dimension (channels-last blocks after a ``permute``), and subclasses checked numerically on the traced input
(torchvision's ``LayerNorm2d``, Hugging Face's ``ConvNextLayerNorm`` in either data format normalise over dimension
1).

>>> norm = nn.LayerNorm(4).eval()
>>> with torch.no_grad():
...     norm.weight[1] = 0; norm.bias[1] = 0
>>> x = torch.randn(3, 4); x[:, 1] = 0.5
>>> small = CompactLayerNorm.from_layernorm(norm, {1: 0.5}, dim=-1)
>>> bool(torch.allclose(small(x[:, [0, 2, 3]]), norm(x)[:, [0, 2, 3]], atol=1e-6))
True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.graph.tracing import Call

__all__ = ["CompactLayerNorm", "layernorm_dim", "layernorm_reason", "visit_layernorm"]

# bound once: CompactLayerNorm asks them per call (torch.compiler.is_compiling first, which dynamo folds to True)
_is_compiling, _is_tracing, _grad_enabled = torch.compiler.is_compiling, torch._C._is_tracing, torch.is_grad_enabled


class CompactLayerNorm(nn.LayerNorm):
    """A LayerNorm over ``channels`` channels along ``dim`` of which only ``normalized_shape[0]`` remain; the others
    entered it as the constants ``removed`` (saved with the state only when one is non-zero).

    Args:
        kept: channels that remain.
        channels: channels of the original norm.
        removed: the removed channels' constant inputs, ``channels - kept`` of them.
        dim: the channel dimension (-1: channels last; 1: channels first).
        eps, elementwise_affine, bias: as ``nn.LayerNorm``.
    """

    removed: Tensor

    def __init__(self, kept: int, channels: int, removed: Tensor, dim: int = -1, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__(kept, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype)
        if removed.numel() != channels - kept:
            raise ValueError(f"removed must hold {channels - kept} constants, got {removed.numel()}.")
        self.channels, self.dim = channels, dim
        self.register_buffer("removed", removed.detach().clone().to(device=device), persistent=False)

    @classmethod
    def from_layernorm(cls, norm: nn.LayerNorm, removed: dict[int, float], dim: int) -> CompactLayerNorm:
        """``norm`` (an ``nn.LayerNorm`` or a :class:`CompactLayerNorm`) without the channels in ``removed`` (index
        -> constant input); shares nothing with it."""
        size = norm.normalized_shape[0]
        keep = torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)
        constants = torch.tensor([removed[i] for i in sorted(removed)], dtype=torch.float32)
        channels = size
        if isinstance(norm, CompactLayerNorm):
            constants, channels = torch.cat([norm.removed.float().cpu(), constants]), norm.channels
        parameter = norm.weight if norm.weight is not None else norm.bias
        small = cls(len(keep), channels, constants, dim, norm.eps, norm.weight is not None, norm.bias is not None,
                    parameter.device if parameter is not None else None, parameter.dtype if parameter is not None
                    else None)
        with torch.no_grad():
            for name in ("weight", "bias"):
                if getattr(norm, name) is not None:
                    getattr(small, name).copy_(getattr(norm, name)[keep.to(getattr(norm, name).device)])
        return small.train(norm.training)

    closed_form_size = 65536
    """Padded input size (rows times ``channels``) from which inference on the CPU takes the closed form."""

    _inference: tuple[Any, ...] | None = None  # what inference on the last input's shape and dtype needs (see below)

    def forward(self, x: Tensor) -> Tensor:
        dim, last = self.dim % x.ndim, x.ndim - 1  # non-negative: ONNX export takes no negative permutation
        if dim != last:  # channels first: normalised channels last, as LayerNorm2d does
            return self._channels_last(x.movedim(dim, last)).movedim(last, dim)
        return self._channels_last(x)

    def _channels_last(self, x: Tensor) -> Tensor:
        # inference runs this per layer and call, where each Python step costs: what depends on the parameters,
        # constants and input shape only is prepared once, and the tensors are read without nn.Module.__getattr__
        if _is_compiling() or _is_tracing() or (_grad_enabled() and (
                x.requires_grad or any(p is not None and p.requires_grad for p in (self.weight, self.bias)))):
            return self._padded_form(x)
        try:
            weight, bias = self._parameters["weight"], self._parameters["bias"]
            constants: Tensor = self._buffers["removed"]  # type: ignore[assignment]
        except KeyError:  # a parametrization
            weight, bias, constants = self.weight, self.bias, self.removed
        try:
            key: tuple[Any, ...] | None = (
                x.shape, x.dtype, self.eps, self.closed_form_size, constants._version, constants.data_ptr(),
                None if weight is None else weight._version, None if weight is None else weight.data_ptr(),
                None if bias is None else bias._version, None if bias is None else bias.data_ptr())
        except RuntimeError:  # inference tensors (made under torch.inference_mode) count no versions: no cache
            key = None
        cache = self._inference
        if key is None or cache is None or cache[0] != key:  # another shape or dtype, or tensors changed
            cache = (key, *self._prepare(x, weight, bias, constants))
            if key is not None:
                self._inference = cache
        _, kept, padded_weight, padded_bias, tail, terms = cache
        if terms is not None:
            return self._closed_form(x, weight, bias, terms)
        if tail is None:  # nothing removed
            return F.layer_norm(x, (kept,), weight, bias, self.eps)
        full = torch.cat([x, tail], -1)  # contiguous result: the next Linear would copy a strided slice, slower
        return torch.narrow_copy(F.layer_norm(full, (self.channels,), padded_weight, padded_bias, self.eps), -1, 0,
                                 kept)

    def _padded_form(self, x: Tensor) -> Tensor:
        """Differentiable and traceable: shapes follow ``x``, and ONNX has no ``narrow_copy``."""
        kept = x.shape[-1]
        removed = self.channels - kept
        if not removed:
            return F.layer_norm(x, (kept,), self.weight, self.bias, self.eps)
        full = torch.cat([x, self.removed.to(x.dtype).expand(*x.shape[:-1], removed)], -1)
        weight = F.pad(self.weight, (0, removed)) if self.weight is not None else None
        bias = F.pad(self.bias, (0, removed)) if self.bias is not None else None
        return F.layer_norm(full, (self.channels,), weight, bias, self.eps)[..., :kept].contiguous()

    def _prepare(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, constants: Tensor) -> tuple[Any, ...]:
        """For inference on inputs shaped like ``x``: the kept channels, the padded scale and shift and the constants
        expanded beside the kept channels (``None`` where nothing was removed), and the closed form's constant
        terms where it applies (float CPU tensors of at least ``closed_form_size`` padded elements): the constants'
        sum and mean, and ``eps + sum (v - vbar)^2 / C`` as a 0-dim tensor."""
        kept = x.shape[-1]
        removed = self.channels - kept
        if not removed:
            return kept, None, None, None, None
        padded = tuple(F.pad(p.detach(), (0, removed)) if p is not None else None for p in (weight, bias))
        tail = constants.to(x.dtype).expand(*x.shape[:-1], removed)
        terms = None
        if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and all(p is None or p.dtype == x.dtype for p in (weight, bias))
                and x.numel() // kept * self.channels >= self.closed_form_size):
            values = constants.detach().double()
            vbar = float(values.mean())
            spread = float((values - vbar).square().sum())
            terms = (float(values.sum()), vbar, torch.tensor(self.eps + spread / self.channels, dtype=x.dtype,
                                                              device=x.device), removed)
        return kept, padded[0], padded[1], tail, terms

    def _closed_form(self, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     terms: tuple[float, float, Tensor, int]) -> Tensor:
        """The normalised kept channels without the removed ones (see the module docstring): the sum over all
        channels, the centred kept inputs (a new contiguous tensor), their norm and the constants' share of the
        variance, then two in-place passes."""
        channels = self.channels
        total, vbar, base, removed = terms
        s = x.sum(-1, keepdim=True)
        if total:
            s.add_(total)
        centred = torch.sub(x, s, alpha=1 / channels, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
        scale = torch.linalg.vector_norm(centred, dim=-1, keepdim=True)
        scale = torch.addcmul(base, scale, scale, value=1 / channels)  # eps + (sum_kept d^2 + sum_removed ...) / C
        shift = s.sub_(channels * vbar) if vbar else s  # C (mean - vbar)
        scale.addcmul_(shift, shift, value=removed / channels ** 3).rsqrt_()
        centred.mul_(scale)
        if weight is not None and bias is not None:
            return torch.addcmul(bias, centred, weight, out=centred)
        if weight is not None:
            return centred.mul_(weight)
        return centred.add_(bias) if bias is not None else centred

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave what inference prepared behind
        state = self.__dict__.copy()
        state.pop("_inference", None)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels={self.channels}, dim={self.dim}"

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if bool(self.removed.ne(0).any()):  # zeros (the masked case) leave the user's keys alone
            destination[prefix + "removed"] = self.removed if keep_vars else self.removed.detach()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        value = state_dict.pop(prefix + "removed", None)
        with torch.no_grad():
            if value is not None and value.shape == self.removed.shape:
                self.removed.copy_(value)
            elif value is None:
                self.removed.zero_()
        super()._load_from_state_dict(state_dict, prefix, *args)
        if value is not None and value.shape != self.removed.shape:
            args[-1].append(f"size mismatch for {prefix}removed: {tuple(value.shape)} in the checkpoint, "
                            f"{tuple(self.removed.shape)} here")


def layernorm_dim(module: nn.LayerNorm, x: Tensor, dims: tuple[int, ...]) -> int | str:
    """The channel dimension (-1 or another) over which ``module`` normalises ``x`` (whose channels lie along
    ``dims``), or why it does not qualify."""
    shape = tuple(module.normalized_shape)
    if len(dims) != 1 or shape != (x.shape[dims[0]],):
        return (f"LayerNorm over {list(shape)} of channels in dimensions {list(dims)} of {tuple(x.shape)}: only a "
                "norm over the channel dimension alone is shrunk")
    dim = -1 if dims[0] == x.dim() - 1 else dims[0]
    if isinstance(module, CompactLayerNorm):
        return dim if dim % x.dim() == module.dim % x.dim() else f"{type(module).__name__} over another dimension"
    if type(module) is nn.LayerNorm:
        return dim if dim == -1 else "LayerNorm over the last dimension, channels in another"
    generator = torch.Generator(device=x.device).manual_seed(0)
    probe = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 + 0.5
    try:
        out = module(probe)
    except Exception as error:  # a subclass with another signature
        return f"{type(module).__name__} could not be replayed ({type(error).__name__})"
    from lightning_compress.graph.layernorm_statistics import kept_layer_norm, kept_statistics

    hook = kept_statistics(module)  # pruned with layernorm_statistics="kept": statistics over the kept channels
    keep = hook.keep if hook is not None else torch.ones(shape, dtype=torch.bool)
    reference = kept_layer_norm(probe, keep, module.weight, module.bias, module.eps, dim)
    if not isinstance(out, Tensor) or out.shape != reference.shape or not torch.allclose(out, reference, 1e-4, 1e-5):
        return f"{type(module).__name__} does not compute a LayerNorm over its input's channel dimension"
    return dim


def visit_layernorm(graph: Any, call: Call, module: nn.LayerNorm) -> None:
    """The dependency analysis of a LayerNorm module's call (``graph``: a ``DependencyGraph``): the channels pass
    through as members (role ``layernorm``) with their constant inputs; a channel with zero scale leaves as its
    shift, any other as a non-constant."""
    x, y = call.args[0], call.output
    t = graph._get(x)
    dim = layernorm_dim(module, x, t.dims) if t is not None and isinstance(y, Tensor) else "an untraced input"
    if isinstance(dim, str):
        return graph._opaque(call, f"LayerNorm normalizes over them, removing one changes the statistics of the "
                                   f"others ({call.name!r}: {dim})")
    graph.layernorm_dims[call.name] = dim
    for i, (v, c) in enumerate(zip(t.vars, t.value.tolist(), strict=True)):
        graph.vars[v].members.append((call.name, "layernorm", i))
        graph.vars[v].norms.append((call.name, i, c))
    value = torch.full((len(t.vars),), torch.nan, dtype=torch.float64)
    if module.weight is not None:
        shift = module.bias.detach().cpu().double() if module.bias is not None else torch.zeros_like(value)
        value = torch.where(module.weight.detach().cpu() == 0, shift, value)
    graph._set(y, list(t.vars), value, t.dims)


def layernorm_reason(norms: list[tuple[str, int, float]]) -> str | None:
    """Why a pruned channel stays although every consumer could lose it: a LayerNorm reads it as a non-constant."""
    for name, _, value in norms:
        if math.isnan(value):
            return (f"LayerNorm {name!r} reads it as a non-constant, so removing it would change the statistics of "
                    "the others (zero its producers, depthwise filters and BatchNorm first)")
    return None
