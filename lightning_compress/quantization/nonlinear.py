"""Non-linear weight quantization: power-of-two (logarithmic) levels and k-means codebooks, with straight-through
fake quantization, and 4-bit packing (two codes per byte) for real-size storage.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_compress.quantization.functional import validate_num_bits

__all__ = [
    "codebook_fake_quantize",
    "codebook_quantize",
    "kmeans_codebook",
    "pack_int4",
    "pow2_fake_quantize",
    "pow2_max_exponent",
    "pow2_quantize",
    "unpack_int4",
]


# ------------------------------------------------------------------------------------------ power of two


def _nearest_pow2_exponent(m: Tensor) -> Tensor:
    """``e`` with ``0.75 * 2^e <= m < 1.5 * 2^e`` (the power of two nearest to ``m > 0`` in linear distance).
    Exact: from ``frexp`` (``m = f 2^E``, ``f`` in ``[0.5, 1)``), ``e = E - 1 + (f >= 0.75)``."""
    mantissa, exponent = torch.frexp(m)
    return exponent.to(torch.int32) - 1 + (mantissa >= 0.75).to(torch.int32)


def _reduce_absmax(w: Tensor, axis: int | None) -> Tensor:
    a = w.detach().abs()
    if axis is None:
        return a.max()
    return a.transpose(0, axis).reshape(a.shape[axis], -1).amax(dim=1)


def _channel_view(t: Tensor, ndim: int, axis: int | None) -> Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def pow2_max_exponent(w: Tensor, *, axis: int | None = None) -> Tensor:
    """Largest exponent ``n1 = floor(log2(4 max|w| / 3))`` (INQ, Zhou et al. 2017): ``max|w|`` rounds to ``2^n1``.

    >>> pow2_max_exponent(torch.tensor([0.1, -0.74])), pow2_max_exponent(torch.tensor([[0.8], [0.2]]), axis=0)
    (tensor(-1, dtype=torch.int32), tensor([ 0, -2], dtype=torch.int32))
    """
    peak = _reduce_absmax(w, axis).float()
    return _nearest_pow2_exponent(peak.clamp_min(torch.finfo(torch.float32).tiny))


def pow2_quantize(
    w: Tensor, *, num_bits: int = 4, max_exponent: Tensor | None = None, axis: int | None = None
) -> Tensor:
    """Round each weight to the nearest of ``{0, +-2^e : e_max - 2^(b-1) + 2 <= e <= e_max}`` in linear distance.

    One bit is the sign and the other ``b - 1`` bits code ``2^(b-1) - 1`` magnitudes plus zero (Miyashita et al.
    2016; levels and rounding as INQ, Zhou et al. 2017: ``|w|`` in ``[0.75, 1.5) 2^e`` goes to ``2^e``, values at or
    above ``0.75 * 2^e_max`` saturate to ``2^e_max``, values below half the smallest level go to 0).

    Args:
        w: weights.
        num_bits: 2 to 8 (2 bits: ternary ``{0, +-2^e_max}``).
        max_exponent: ``e_max`` (integer tensor); default :func:`pow2_max_exponent` of ``w``.
        axis: per-channel ``e_max`` along this axis.

    >>> pow2_quantize(torch.tensor([0.9, -0.3, 0.12, 0.05, 0.02]), num_bits=3)  # levels 0, 1/4, 1/2, 1
    tensor([ 1.0000, -0.2500,  0.0000,  0.0000,  0.0000])
    """
    validate_num_bits(num_bits, 2, 8)
    e_max = pow2_max_exponent(w, axis=axis) if max_exponent is None else torch.as_tensor(max_exponent)
    e_max = _channel_view(e_max.to(torch.int32).to(w.device), w.dim(), axis)
    e_min = e_max - ((1 << (num_bits - 1)) - 2)
    m = w.detach().abs().float()
    e = _nearest_pow2_exponent(m.clamp_min(torch.finfo(torch.float32).tiny))
    e = torch.maximum(torch.minimum(e, e_max), e_min)
    magnitude = torch.ldexp(torch.ones_like(m), e)
    keep = m >= torch.ldexp(torch.ones_like(m), e_min - 1)
    return (torch.sign(w.detach()).float() * magnitude * keep).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, quantized: Tensor, passes: Tensor) -> Tensor:
        ctx.save_for_backward(passes)
        return quantized

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (passes,) = ctx.saved_tensors
        return grad * passes, None, None


def pow2_fake_quantize(
    w: Tensor, *, num_bits: int = 4, max_exponent: Tensor | None = None, axis: int | None = None
) -> Tensor:
    """:func:`pow2_quantize` with a straight-through gradient, passed where ``|w| < 1.5 * 2^e_max`` (the weight
    rounds to ``2^e_max`` or below without saturating), zero above.

    >>> w = torch.tensor([0.9, 1.6, -0.3], requires_grad=True)
    >>> pow2_fake_quantize(w, num_bits=3, max_exponent=torch.tensor(0)).sum().backward(); w.grad
    tensor([1., 0., 1.])
    """
    validate_num_bits(num_bits, 2, 8)
    e_max = pow2_max_exponent(w, axis=axis) if max_exponent is None else torch.as_tensor(max_exponent)
    q = pow2_quantize(w, num_bits=num_bits, max_exponent=e_max, axis=axis)
    e_view = _channel_view(e_max.to(w.device), w.dim(), axis)
    limit = 1.5 * torch.ldexp(torch.ones(e_view.shape, device=w.device), e_view)
    return _StraightThrough.apply(w, q, (w.detach().abs() < limit).to(w.dtype))


# --------------------------------------------------------------------------------------------- k-means


def _assign(w: Tensor, codebook: Tensor) -> Tensor:
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(w, midpoints)  # ties go to the lower centroid


def kmeans_codebook(w: Tensor, num_bits: int = 4, *, iters: int = 50) -> tuple[Tensor, Tensor]:
    """1-D k-means (Lloyd) codebook of ``2^b`` centroids for a weight tensor (Deep Compression, Han et al. 2016).

    Deterministic linear initialisation over ``[min, max]`` (the paper's best choice); stops early when the
    assignment no longer changes. An empty cluster keeps its centroid.

    Args:
        w: weights.
        num_bits: 1 to 8; ``2^b`` centroids.
        iters: maximum Lloyd iterations.

    Returns:
        ``(codebook, indices)``: sorted float32 centroids ``(2^b,)`` and uint8 indices shaped like ``w``.

    >>> codebook, idx = kmeans_codebook(torch.tensor([0.0, 0.1, 1.0, 1.1, 2.0, 2.1, 3.0, 3.3]), num_bits=2)
    >>> codebook, idx
    (tensor([0.0500, 1.0500, 2.0500, 3.1500]), tensor([0, 0, 1, 1, 2, 2, 3, 3], dtype=torch.uint8))
    """
    validate_num_bits(num_bits, 1, 8)
    if iters < 1:
        raise ValueError(f"iters={iters!r} must be >= 1")
    flat = w.detach().reshape(-1).float().cpu()  # small, and CPU index_add_ is deterministic
    k = 1 << num_bits
    codebook = torch.linspace(float(flat.min()), float(flat.max()), k, device=flat.device)
    assign = _assign(flat, codebook)
    for _ in range(iters):
        sums = torch.zeros(k, device=flat.device).index_add_(0, assign, flat)
        members = torch.bincount(assign, minlength=k)
        codebook = torch.where(members > 0, sums / members.clamp_min(1), codebook).sort().values
        new_assign = _assign(flat, codebook)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return codebook.to(w.device), assign.to(torch.uint8).reshape(w.shape).to(w.device)


def codebook_quantize(w: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest centroid of a sorted ``codebook`` for each weight (uint8).

    >>> codebook_quantize(torch.tensor([-1.0, 0.4, 0.6, 5.0]), torch.tensor([0.0, 1.0]))
    tensor([0, 0, 1, 1], dtype=torch.uint8)
    """
    return _assign(w.detach().float(), codebook.detach().float()).to(torch.uint8)


class _CodebookFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, codebook: Tensor) -> Tensor:
        idx = _assign(w.detach(), codebook.detach())
        ctx.save_for_backward(idx)
        ctx.k = codebook.numel()
        return codebook[idx].to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (idx,) = ctx.saved_tensors
        return grad, _segment_sum(grad.reshape(-1), idx.reshape(-1), ctx.k)


def _segment_sum(values: Tensor, idx: Tensor, k: int, *, by_sort: bool | None = None) -> Tensor:
    """``out[j] = sum(values[idx == j])``; on CUDA under deterministic algorithms by sorting (``index_add_`` uses
    atomics there), else ``index_add_``."""
    if by_sort is None:
        by_sort = values.is_cuda and torch.are_deterministic_algorithms_enabled()
    if not by_sort:
        return torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, idx, values)
    order = torch.argsort(idx, stable=True)
    running = torch.cat([values.new_zeros(1, dtype=torch.float64), torch.cumsum(values[order].double(), 0)])
    ends = torch.cumsum(torch.bincount(idx, minlength=k), 0)
    starts = ends - torch.bincount(idx, minlength=k)
    return (running[ends] - running[starts]).to(values.dtype)


def codebook_fake_quantize(w: Tensor, codebook: Tensor) -> Tensor:
    """Replace each weight by its nearest centroid. Gradients: straight-through to ``w``; each centroid gets the
    sum of the gradients of the weights assigned to it (Han et al. 2016, centroid fine-tuning).

    >>> c = torch.tensor([0.0, 1.0], requires_grad=True)
    >>> y = codebook_fake_quantize(torch.tensor([0.2, 0.9, 0.7]), c); y.backward(torch.tensor([1.0, 2.0, 3.0]))
    >>> y.detach(), c.grad
    (tensor([0., 1., 1.]), tensor([1., 5.]))
    """
    return _CodebookFakeQuant.apply(w, codebook)


# -------------------------------------------------------------------------------------------- packing


def pack_int4(values: Tensor) -> Tensor:
    """Pack 4-bit integers two per byte: element ``2i`` in the low nibble, ``2i + 1`` in the high nibble (a zero
    nibble pads an odd count). Accepts ``[0, 15]`` or, signed, ``[-8, 7]`` (two's complement nibbles).

    >>> pack_int4(torch.tensor([1, 2, 15, -1, 7]))
    tensor([ 33, 255,   7], dtype=torch.uint8)
    """
    v = values.reshape(-1).to(torch.int16)
    if v.numel() and (int(v.min()) < -8 or int(v.max()) > 15):
        raise ValueError(f"values in [{int(v.min())}, {int(v.max())}] do not fit 4 bits; allowed [-8, 15]")
    nibbles = (v & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: Tensor, shape: tuple[int, ...] | torch.Size, *, signed: bool = False) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 values of ``shape`` (``[-8, 7]`` when ``signed``, else ``[0, 15]``).

    >>> unpack_int4(torch.tensor([33, 255, 7], dtype=torch.uint8), (5,), signed=True)
    tensor([ 1,  2, -1, -1,  7], dtype=torch.int8)
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    if packed.numel() * 2 < numel:
        raise ValueError(f"{packed.numel()} bytes hold at most {packed.numel() * 2} values, shape {tuple(shape)}")
    p = packed.reshape(-1).to(torch.uint8)
    nibbles = torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:numel].to(torch.int8)
    if signed:
        nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return nibbles.reshape(shape)
