"""Weight-only low-bit models with PACKED storage: the state dict really holds ``b``-bit codes, not floats.

:func:`export_packed` replaces every chosen ``Conv1d`` / ``Conv2d`` / ``Linear`` of a copy of a model by a
:class:`PackedConv1d` / :class:`PackedConv2d` / :class:`PackedLinear` that keeps, as buffers,

* ``packed``: the weight codes, ``num_bits`` bits each, packed densely into uint8 (two per byte at 4 bits, via
  :func:`~lightning_compress.quantization.nonlinear.pack_int4`; ``8 / b`` per byte for the other widths, codes
  laid little-endian across byte boundaries);
* the decoding table: ``scale`` (float32 per output channel) for ``"linear"``, ``codebook`` (float32, ``2^b``
  centroids) for ``"codebook"``, ``max_exponent`` (int8 per output channel) for ``"pow2"``;

plus the float ``bias``. ``forward`` decodes the weight and runs the float op, so the model computes in float32
exactly what the fake-quantized weight-only model computes (activations stay float); the saving is in storage
(``torch.save(model.state_dict())``), e.g. about 8x smaller weights at 4 bits. Codes per method:

* ``"linear"``: symmetric narrow range per output channel, as ``quantize_model(model, "weight_only",
  num_bits=b)``: ``scale = max|w_o| / qmax``, ``q = clamp(round(w / scale), -qmax, qmax)``; code ``q + qmax``.
  A layer that already carries our weight quantizer (QAT, PTQ) uses that quantizer's ``amax`` (learned or
  observed) and its own bit width instead.
* ``"codebook"``: a k-means codebook of ``2^b`` centroids per layer (:func:`kmeans_codebook`, Han et al. 2016);
  code = centroid index.
* ``"pow2"``: levels ``{0, +-2^e}`` with a per-channel ``e_max`` (:func:`pow2_quantize`, INQ rounding); code =
  ``sign << (b - 1) | j`` with ``j = 0`` for zero and ``j = e - e_min + 1`` otherwise.

The math never imports Lightning. The module keeps the weight's shape as a plain attribute: a state dict of a
packed model loads into a packed model of the same architecture (what :func:`export_packed` returns), not into
the float class.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.graph.layers import select_layers
from lightning_compress.quantization.functional import qrange, validate_num_bits
from lightning_compress.quantization.nonlinear import (
    kmeans_codebook,
    pack_int4,
    pow2_max_exponent,
    pow2_quantize,
    unpack_int4,
)
from lightning_compress.quantization.quantizers import absmax, is_quantized, remove_quantizers

__all__ = [
    "PACKED_METHODS",
    "PackedConv1d",
    "PackedConv2d",
    "PackedLinear",
    "export_packed",
    "pack_bits",
    "packed_layers",
    "unpack_bits",
]

PACKED_METHODS = ("linear", "codebook", "pow2")
_TYPES = ("Conv1d", "Conv2d", "Linear")


# ------------------------------------------------------------------------------------------------ bits


def pack_bits(codes: Tensor, num_bits: int) -> Tensor:
    """Pack unsigned ``num_bits``-bit codes (``[0, 2^b - 1]``) densely into uint8, little-endian: code ``i``
    occupies bits ``i*b .. i*b + b - 1`` of the stream (zero bits pad the last byte). At 4 bits this is exactly
    :func:`pack_int4`'s layout (and uses it); at 8 bits the codes themselves.

    >>> pack_bits(torch.tensor([1, 2, 3, 0, 3]), 2)  # 0b00_11_10_01, then 0b11
    tensor([57,  3], dtype=torch.uint8)
    """
    validate_num_bits(num_bits, 1, 8)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << num_bits):
        raise ValueError(f"codes in [{int(flat.min())}, {int(flat.max())}] do not fit {num_bits} unsigned bits")
    if num_bits == 8:
        return flat.to(torch.uint8)
    if num_bits == 4:
        return pack_int4(flat)
    bits = (flat.unsqueeze(1) >> torch.arange(num_bits, device=flat.device)) & 1
    bits = bits.reshape(-1)
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).reshape(-1, 8)
    return (bits << torch.arange(8, device=flat.device)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, num_bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as int64.

    >>> unpack_bits(torch.tensor([57, 3], dtype=torch.uint8), 2, 5)
    tensor([1, 2, 3, 0, 3])
    """
    validate_num_bits(num_bits, 1, 8)
    if packed.numel() * 8 < numel * num_bits:
        raise ValueError(f"{packed.numel()} bytes hold fewer than {numel} codes of {num_bits} bits")
    p = packed.reshape(-1)
    if num_bits == 8:
        return p[:numel].to(torch.int64)
    if num_bits == 4:
        return unpack_int4(p, (numel,)).to(torch.int64)
    bits = ((p.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=p.device)) & 1).reshape(-1)
    bits = bits[: numel * num_bits].reshape(numel, num_bits)
    return (bits << torch.arange(num_bits, device=p.device)).sum(dim=1)


# ------------------------------------------------------------------------------------------ encoding


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(-1, *([1] * (ndim - 1)))


def _encode_linear(w: Tensor, num_bits: int, amax: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    qmin, qmax = qrange(num_bits)
    amax = amax.detach().float().reshape(-1).expand(w.shape[0]).to(w.device)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)) / qmax  # as fake_quantize computes it
    q = torch.round(w.detach().float() * (1.0 / _channel_view(scale, w.dim()))).clamp(qmin, qmax)
    q = torch.where(_channel_view(amax > 0, w.dim()), q, torch.zeros_like(q))  # amax 0: zeros, as fake_quantize
    return (q + qmax).to(torch.int64), {"scale": scale}


def _encode_codebook(w: Tensor, num_bits: int) -> tuple[Tensor, dict[str, Tensor]]:
    codebook, idx = kmeans_codebook(w, num_bits)
    return idx.to(torch.int64), {"codebook": codebook.float()}


def _encode_pow2(w: Tensor, num_bits: int) -> tuple[Tensor, dict[str, Tensor]]:
    e_max = pow2_max_exponent(w, axis=0)
    levels = pow2_quantize(w.detach().float(), num_bits=num_bits, max_exponent=e_max, axis=0)
    e_min = _channel_view(e_max - ((1 << (num_bits - 1)) - 2), w.dim()).to(torch.int64)
    _, exponent = torch.frexp(levels.abs())  # a level 2^e has frexp exponent e + 1, so j = e - e_min + 1
    j = torch.where(levels != 0, exponent.to(torch.int64) - e_min, torch.zeros_like(e_min))
    sign = (levels < 0).to(torch.int64)
    if e_max.abs().max() > 127:
        raise ValueError("pow2 exponents outside int8; weights too large or too small to pack")
    return (sign << (num_bits - 1)) | j, {"max_exponent": e_max.to(torch.int8)}


# ------------------------------------------------------------------------------------------- modules


class _PackedWeight(nn.Module):
    """Shared storage and decoding of the packed layers. Buffers: ``packed`` and the method's table."""

    packed: Tensor

    def _init_packed(self, weight: Tensor, bias: Tensor | None, num_bits: int, method: str,
                     amax: Tensor | None = None) -> None:
        validate_num_bits(num_bits, 2, 8)
        if method not in PACKED_METHODS:
            raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(map(repr, PACKED_METHODS))}")
        self.num_bits, self.method, self.weight_shape = num_bits, method, tuple(weight.shape)
        if method == "linear":
            codes, tables = _encode_linear(weight, num_bits, absmax(weight, 0) if amax is None else amax)
        elif method == "codebook":
            codes, tables = _encode_codebook(weight, num_bits)
        else:
            codes, tables = _encode_pow2(weight, num_bits)
        self.register_buffer("packed", pack_bits(codes, num_bits))
        for name, table in tables.items():
            self.register_buffer(name, table)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def dequantized_weight(self) -> Tensor:
        """The float32 weight the layer computes with (decoded from ``packed`` at every call)."""
        codes = unpack_bits(self.packed, self.num_bits, self.weight_numel()).reshape(self.weight_shape)
        buffers = dict(self.named_buffers())
        if self.method == "linear":
            qmax = qrange(self.num_bits)[1]
            return (codes - qmax).float() * _channel_view(buffers["scale"], codes.dim())
        if self.method == "codebook":
            return buffers["codebook"][codes]
        half = 1 << (self.num_bits - 1)
        j, negative = codes & (half - 1), codes >= half
        e_min = _channel_view(buffers["max_exponent"].to(torch.int64) - (half - 2), codes.dim())
        ones = torch.ones(codes.shape, device=codes.device)
        magnitude = torch.where(j > 0, torch.ldexp(ones, (e_min + j - 1).float()), torch.zeros_like(ones))
        return torch.where(negative, -magnitude, magnitude)

    def weight_numel(self) -> int:
        """Elements of the original weight."""
        numel = 1
        for size in self.weight_shape:
            numel *= size
        return numel

    def payload_bytes(self) -> int:
        """Bytes of the packed weight and its decoding table (the bias is counted as a float parameter)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, num_bits={self.num_bits}, method={self.method!r}"


class PackedLinear(_PackedWeight):
    """``nn.Linear`` with a packed ``num_bits`` weight (made by :func:`export_packed`)."""

    def __init__(self, layer: nn.Linear, num_bits: int = 4, method: str = "linear", amax: Tensor | None = None
                 ) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init_packed(layer.weight, layer.bias, num_bits, method, amax)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


class _PackedConv(_PackedWeight):
    _conv: Any

    def __init__(self, layer: nn.Conv1d | nn.Conv2d, num_bits: int = 4, method: str = "linear",
                 amax: Tensor | None = None) -> None:
        super().__init__()
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode={layer.padding_mode!r} is not supported by packed layers; use 'zeros'")
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.groups, self.in_channels, self.out_channels = layer.groups, layer.in_channels, layer.out_channels
        self._init_packed(layer.weight, layer.bias, num_bits, method, amax)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        return type(self)._conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PackedConv1d(_PackedConv):
    """``nn.Conv1d`` with a packed ``num_bits`` weight (made by :func:`export_packed`)."""

    _conv = staticmethod(F.conv1d)


class PackedConv2d(_PackedConv):
    """``nn.Conv2d`` with a packed ``num_bits`` weight (made by :func:`export_packed`)."""

    _conv = staticmethod(F.conv2d)


_PACKED: dict[type[nn.Module], type[_PackedWeight]] = {
    nn.Linear: PackedLinear, nn.Conv1d: PackedConv1d, nn.Conv2d: PackedConv2d}


def packed_layers(model: nn.Module) -> dict[str, _PackedWeight]:
    """``{name: layer}`` of every packed layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _PackedWeight)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def export_packed(model: nn.Module, *, num_bits: int = 4, method: str = "linear",
                  layers: str | list[str] | None = None) -> nn.Module:
    """A copy of ``model`` whose chosen layers store their weights packed at ``num_bits`` (weight-only).

    Its predictions equal those of the fake-quantized weight-only model: for ``"linear"`` that of
    ``quantize_model(model, "weight_only", num_bits=num_bits)``; for ``"codebook"`` / ``"pow2"`` the float model
    with every chosen weight replaced by its k-means centroid / power-of-two level (module docstring). Layers that
    carry our quantizers (QAT, PTQ) are exported weight-only: with ``"linear"`` at their own bit width and weight
    ``amax``; their input quantizers are dropped. The copy is on CPU, in eval mode.

    Args:
        model: the float (or fake-quantized) model; not modified.
        num_bits: 2 to 8.
        method: ``"linear"``, ``"codebook"`` or ``"pow2"``.
        layers: names or regexes of the layers to pack; default every Conv1d / Conv2d / Linear.

    Returns:
        The packed model (``torch.save(state_dict)`` holds the codes, not float weights).

    Raises:
        ValueError: ``num_bits`` outside 2..8, an unknown method, a pattern matching no layer, or a quantized layer
            with more than 8 weight bits.

    >>> packed = export_packed(nn.Sequential(nn.Linear(64, 8)), num_bits=4)
    >>> type(packed[0]).__name__, packed[0].packed.dtype, packed[0].packed.numel()
    ('PackedLinear', torch.uint8, 256)
    """
    validate_num_bits(num_bits, 2, 8)
    if method not in PACKED_METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(map(repr, PACKED_METHODS))}")
    copied = copy.deepcopy(model).cpu().eval()
    chosen = select_layers(copied, layers, types=_TYPES)
    own: dict[str, tuple[int, Tensor]] = {}
    for name, layer in chosen.items():
        if is_quantized(layer) and method == "linear":
            wq: Any = layer.weight_quantizer
            if wq.num_bits > 8:
                raise ValueError(f"layer {name!r} uses {wq.num_bits} weight bits; packed export needs 2..8")
            own[name] = (wq.num_bits, wq.current_amax(layer.weight).detach().clone())
    remove_quantizers(copied)
    unsupported = {n: type(m).__name__ for n, m in chosen.items() if type(m) not in _PACKED}
    if unsupported:
        raise ValueError(f"cannot pack layers {unsupported}: only exact nn.Conv1d, nn.Conv2d and nn.Linear")
    for name, layer in chosen.items():
        bits, amax = own.get(name, (num_bits, None))
        packed = _PACKED[type(layer)](layer, bits, method, amax)
        packed.train(False)
        _set_submodule(copied, name, packed)
    return copied
