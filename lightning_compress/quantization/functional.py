"""Linear quantization as pure functions: fake quantization with a straight-through gradient, integer
quantize / dequantize, affine (zero-point) parameters, LSQ and PACT.

Conventions (see ``REFERENCES.md`` section 3):

* Symmetric quantization is *narrow range*: signed ``b`` bits use ``[-(2^(b-1)-1), 2^(b-1)-1]`` (``[-127, 127]``
  at 8 bits), unsigned ``[0, 2^b-1]``; ``scale = amax / qmax``.
* Rounding is half to even (``torch.round``, as in torch's fused kernels).
* **Straight-through boundary** of :func:`fake_quantize`: torch's fused-kernel convention. The gradient is passed
  where the *rounded* value ``round(x / scale)`` lies in ``[qmin, qmax]`` and is zero elsewhere: for signed data
  where ``|x| < amax + scale / 2``, for unsigned data where ``-scale / 2 <= x < amax + scale / 2`` (at exactly
  ``qmax + 0.5`` half-to-even rounding goes out of range, since ``qmax`` is odd). This is what
  ``torch.ao.quantization.FakeQuantize`` does, so training and export agree. NVIDIA's pytorch-quantization passes
  the gradient where ``|x| <= amax`` instead; the two differ only in a band of half a step at the clipping edge.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "affine_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_affine",
    "lsq_fake_quantize",
    "lsq_grad_scale",
    "lsq_init_step",
    "pact_fake_quantize",
    "qrange",
    "quantize",
    "straight_through",
    "validate_num_bits",
]

MIN_BITS, MAX_BITS = 2, 16


def validate_num_bits(num_bits: int, low: int = MIN_BITS, high: int = MAX_BITS) -> None:
    """Raise a ``ValueError`` quoting ``num_bits`` unless it is an integer in ``[low, high]``."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not low <= num_bits <= high:
        raise ValueError(f"num_bits={num_bits!r} is not supported; allowed: integers from {low} to {high}")


def qrange(num_bits: int = 8, unsigned: bool = False, narrow_range: bool = True) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``num_bits`` quantizer.

    Args:
        num_bits: bit width, 2 to 16.
        unsigned: ``[0, 2^b - 1]`` instead of a signed range.
        narrow_range: signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric, TensorRT) instead of
            ``[-2^(b-1), 2^(b-1) - 1]``. Ignored when ``unsigned``.

    >>> qrange(8), qrange(8, unsigned=True), qrange(4, narrow_range=False)
    ((-127, 127), (0, 255), (-8, 7))
    """
    validate_num_bits(num_bits)
    if unsigned:
        return 0, (1 << num_bits) - 1
    qmax = (1 << (num_bits - 1)) - 1
    return (-qmax if narrow_range else -qmax - 1), qmax


def _channel_view(t: Tensor, ndim: int, axis: int) -> Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def straight_through(x: Tensor, rounded: Tensor) -> Tensor:
    """``rounded`` forward (bit for bit: ``x - x`` adds an exact zero), the gradient of ``x`` backward: the
    straight-through estimator (Bengio et al., 2013, "Estimating or Propagating Gradients Through Stochastic
    Neurons"), as ``torch.fake_quantize_per_tensor_affine`` passes it.

    >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
    >>> y = straight_through(x, torch.round(x)); y.sum().backward(); y.detach(), x.grad
    (tensor([0., 2.]), tensor([1., 1.]))
    """
    return rounded.detach() + (x - x.detach())


class _FakeQuantizeSTE(torch.autograd.Function):
    """Plain-autograd fake quantization with the fused kernels' straight-through boundary."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        q = torch.round(x * (1.0 / scale)) + zero_point
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return (q.clamp(qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize_affine(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    *,
    axis: int | None = None,
    fused: bool = True,
) -> Tensor:
    """Affine fake quantization ``s * (clamp(round(x / s) + zp, qmin, qmax) - zp)`` with a straight-through gradient.

    Uses ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` when ``fused`` and the shapes fit
    (one scale, or one scale per slice along ``axis``), a plain ``autograd.Function`` with the same boundary
    otherwise (e.g. ``scale`` broadcastable to ``x`` without an ``axis``). ``scale`` must be positive.

    Args:
        x: floating tensor.
        scale: step size, a scalar, a vector of ``x.shape[axis]`` entries, or broadcastable to ``x``.
        zero_point: integer offset, same shape as ``scale``.
        qmin: lowest integer level.
        qmax: highest integer level.
        axis: channel axis of a per-channel ``scale``.
        fused: allow torch's fused kernels (never while ``torch.export`` / ``torch.compile`` trace: the same
            arithmetic through the plain path).

    >>> fake_quantize_affine(torch.tensor([-1.0, 0.26, 3.0]), torch.tensor(0.1), torch.tensor(10), 0, 255)
    tensor([-1.0000,  0.3000,  3.0000])
    """
    if axis is not None:
        axis = axis % x.dim()
    fused = fused and not torch.compiler.is_compiling()  # the fused kernels have no meta kernel (torch.export)
    if fused and scale.numel() == 1 and axis is None:
        zp = zero_point.reshape(()).round().to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), zp, qmin, qmax)
    if fused and axis is not None and scale.numel() == x.shape[axis]:
        zp = zero_point.reshape(-1).round().to(torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1).float(), zp, axis, qmin, qmax)
    if axis is not None:
        scale, zero_point = _channel_view(scale, x.dim(), axis), _channel_view(zero_point, x.dim(), axis)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32  # as the fused kernels
    scale = scale.to(torch.float32).to(compute)
    out = _FakeQuantizeSTE.apply(x.to(compute), scale, zero_point.round().to(compute), qmin, qmax)
    return out.to(x.dtype)


def fake_quantize(
    x: Tensor,
    amax: Tensor | float,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    axis: int | None = None,
    fused: bool = True,
) -> Tensor:
    """Linear symmetric (narrow range) fake quantization with a straight-through gradient.

    ``scale = amax / qmax``; output ``scale * clamp(round(x / scale), qmin, qmax)``. The gradient passes where
    ``round(x / scale)`` is in ``[qmin, qmax]`` (module docstring). An ``amax`` of zero (or below) gives zeros and a
    zero gradient for that tensor or channel, never NaN.

    Args:
        x: floating tensor.
        amax: clipping threshold: a scalar for per-tensor, a vector of ``x.shape[axis]`` entries (or any shape
            with that many entries) for per-channel.
        num_bits: 2 to 16.
        unsigned: quantize to ``[0, 2^b - 1]`` (e.g. after a ReLU); negative values clip to 0.
        axis: channel axis for a per-channel ``amax`` (0 for the output channels of a weight).
        fused: use torch's fused fake-quant kernels (default); ``False`` forces the plain autograd path.

    Raises:
        ValueError: ``num_bits`` outside 2..16, or ``amax`` of the wrong size for ``axis``.

    >>> fake_quantize(torch.tensor([-1.0, 0.02, 0.6, 2.0]), 1.0, num_bits=4)  # scale 1/7, 0.6 -> 4/7
    tensor([-1.0000,  0.0000,  0.5714,  1.0000])
    >>> fake_quantize(torch.tensor([[0.3, 1.2], [0.3, 1.2]]), torch.tensor([1.0, 2.0]), num_bits=2, axis=0)
    tensor([[0., 1.],
            [0., 2.]])
    """
    qmin, qmax = qrange(num_bits, unsigned)
    amax_t = torch.as_tensor(amax, dtype=torch.float32, device=x.device).detach()
    if axis is not None and amax_t.numel() not in (1, x.shape[axis]):
        raise ValueError(
            f"amax has {amax_t.numel()} entries; per-channel along axis={axis} needs {x.shape[axis]} (or 1)"
        )
    if axis is None and amax_t.numel() > 1 and amax_t.dim() > x.dim():
        raise ValueError(f"amax of shape {tuple(amax_t.shape)} does not broadcast to x of shape {tuple(x.shape)}")
    valid = amax_t > 0
    scale = torch.where(valid, amax_t, torch.ones_like(amax_t)) / qmax
    out = fake_quantize_affine(x, scale, torch.zeros_like(scale), qmin, qmax, axis=axis, fused=fused)
    if not isinstance(amax, Tensor) and float(amax) > 0:  # known on the host: no mask, no data-dependent branch
        return out
    # a tensor amax: always mask (multiplying by 1 changes nothing), so the graph has no branch on the data
    # (``torch.export``) and no host sync on an accelerator
    mask = _channel_view(valid, x.dim(), axis % x.dim()) if axis is not None and valid.numel() > 1 else valid
    return out * mask.to(out.dtype)


def quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    qmin: int,
    qmax: int,
    *,
    axis: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Integers ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (torch's convention).

    Args:
        x: floating tensor.
        scale: step size (scalar, per-channel vector along ``axis``, or broadcastable to ``x``).
        zero_point: integer offset, shaped like ``scale``.
        qmin: lowest level.
        qmax: highest level.
        axis: channel axis of vector ``scale`` / ``zero_point``.
        dtype: integer dtype of the result; by default the smallest of int8, uint8, int16, int32 that holds
            ``[qmin, qmax]``.

    >>> quantize(torch.tensor([-1.0, 0.26, 3.0]), 0.1, 10, 0, 255)
    tensor([ 0, 13, 40], dtype=torch.uint8)
    """
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zp_t = torch.as_tensor(zero_point, device=x.device)
    if axis is not None and scale_t.dim() > 0:
        scale_t, zp_t = _channel_view(scale_t, x.dim(), axis), _channel_view(zp_t, x.dim(), axis)
    q = (torch.round(x.float() * (1.0 / scale_t)) + zp_t).clamp(qmin, qmax)
    return q.to(dtype or _int_dtype(qmin, qmax))


def dequantize(q: Tensor, scale: Tensor | float, zero_point: Tensor | int, *, axis: int | None = None) -> Tensor:
    """Real values ``scale * (q - zero_point)`` of integers ``q`` (float32).

    >>> dequantize(torch.tensor([0, 13, 40], dtype=torch.uint8), 0.1, 10)
    tensor([-1.0000,  0.3000,  3.0000])
    """
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    zp_t = torch.as_tensor(zero_point, device=q.device)
    if axis is not None and scale_t.dim() > 0:
        scale_t, zp_t = _channel_view(scale_t, q.dim(), axis), _channel_view(zp_t, q.dim(), axis)
    return (q.to(torch.float32) - zp_t.to(torch.float32)) * scale_t


def _int_dtype(qmin: int, qmax: int) -> torch.dtype:
    for dtype in (torch.int8, torch.uint8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int32


def affine_qparams(
    min_val: Tensor | float,
    max_val: Tensor | float,
    qmin: int,
    qmax: int,
    *,
    eps: float = torch.finfo(torch.float32).eps,
) -> tuple[Tensor, Tensor]:
    """Asymmetric ``(scale, zero_point)`` from an observed range, as torch's observers compute them.

    The range is widened to include 0 (so that 0 is exact), ``scale = (max - min) / (qmax - qmin)`` (at least
    ``eps``), ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``; then ``q = round(x / scale) +
    zero_point``. Works elementwise on per-channel ``min_val`` / ``max_val``.

    >>> affine_qparams(-1.0, 3.0, 0, 255)
    (tensor(0.0157), tensor(64, dtype=torch.int32))
    """
    lo = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    if bool((lo > hi).any()):
        raise ValueError(f"min_val={min_val!r} exceeds max_val={max_val!r}")
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=eps)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


# --------------------------------------------------------------------------------------------------- LSQ


def _lsq_range(num_bits: int, unsigned: bool, narrow_range: bool) -> tuple[int, int]:
    qmin, qmax = qrange(num_bits, unsigned, narrow_range)
    return -qmin, qmax  # (Q_N, Q_P)


def lsq_grad_scale(numel: int, num_bits: int = 8, *, unsigned: bool = False) -> float:
    """LSQ gradient scale ``g = 1 / sqrt(N * Q_P)`` (Esser et al. 2019), ``N`` the number of weights (or features)
    one step size serves.

    >>> round(lsq_grad_scale(1000, 8), 6)
    0.002806
    """
    _, q_p = _lsq_range(num_bits, unsigned, True)
    return 1.0 / math.sqrt(max(int(numel), 1) * q_p)


def lsq_init_step(x: Tensor, num_bits: int = 8, *, unsigned: bool = False, axis: int | None = None) -> Tensor:
    """LSQ initial step ``s = 2 mean|x| / sqrt(Q_P)`` (Esser et al. 2019), per tensor or per slice along ``axis``.

    >>> lsq_init_step(torch.tensor([1.0, -3.0]), 4)
    tensor(1.5119)
    """
    _, q_p = _lsq_range(num_bits, unsigned, True)
    a = x.detach().abs().float()
    mean = a.mean() if axis is None else a.transpose(0, axis).reshape(a.shape[axis], -1).mean(dim=1)
    return 2.0 * mean / math.sqrt(q_p)


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, q_n: int, q_p: int, grad_scale: float) -> Tensor:
        v = x / step
        clipped = v.clamp(-q_n, q_p)
        v_bar = torch.round(clipped)
        ctx.save_for_backward(v, v_bar)
        ctx.q_n, ctx.q_p, ctx.grad_scale, ctx.step_shape = q_n, q_p, grad_scale, step.shape
        return v_bar * step

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        v, v_bar = ctx.saved_tensors
        low, high = v <= -ctx.q_n, v >= ctx.q_p
        inside = ~(low | high)
        # d v_hat / d s: round(v) - v inside, -Q_N below, Q_P above (Esser et al. 2019, eq. 3)
        d_step = torch.where(inside, v_bar - v, v_bar)
        grad_step = (grad * d_step * ctx.grad_scale).sum_to_size(ctx.step_shape)
        return grad * inside, grad_step, None, None, None


def lsq_fake_quantize(
    x: Tensor,
    step: Tensor,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    grad_scale: float | None = None,
    narrow_range: bool = True,
) -> Tensor:
    """LSQ fake quantization ``round(clip(x / s, -Q_N, Q_P)) * s`` with a learnable step ``s``.

    Esser et al. 2019, "Learned Step Size Quantization". Gradients: ``x`` gets 1 where ``-Q_N < x / s < Q_P``
    and 0 where clipped (``x / s <= -Q_N`` or ``>= Q_P``); ``s`` gets ``g * (round(x / s) - x / s)`` inside and
    ``g * (-Q_N)`` / ``g * Q_P`` outside, summed over the elements that share it. ``Q_P = 2^(b-1) - 1``; ``Q_N =
    Q_P`` (narrow range, as the rest of this package) or ``2^(b-1)`` with ``narrow_range=False`` (the paper);
    unsigned ``Q_N = 0``, ``Q_P = 2^b - 1``.

    Args:
        x: tensor to quantize.
        step: positive step size, scalar or broadcastable to ``x`` (per channel: shape ``(C, 1, ...)``).
        num_bits: 2 to 16.
        unsigned: unsigned range.
        grad_scale: ``g``; default ``1 / sqrt(N * Q_P)`` with ``N = x.numel() / step.numel()``.
        narrow_range: symmetric signed range.

    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> y = lsq_fake_quantize(torch.tensor([0.3, 0.9, 9.0]), s, num_bits=3, grad_scale=1.0)
    >>> y.sum().backward(); y.detach(), s.grad
    (tensor([0.5000, 1.0000, 1.5000]), tensor(3.6000))
    """
    q_n, q_p = _lsq_range(num_bits, unsigned, narrow_range)
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(max(x.numel() // max(step.numel(), 1), 1) * q_p)
    return _LSQ.apply(x, step, q_n, q_p, float(grad_scale))


# -------------------------------------------------------------------------------------------------- PACT


class _PACT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, levels: int) -> Tensor:
        ctx.save_for_backward(x, alpha)
        a = alpha.clamp_min(torch.finfo(torch.float32).tiny)
        y = torch.minimum(x.clamp_min(0), a)
        return torch.round(y * (levels / a)) * (a / levels)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, alpha = ctx.saved_tensors
        above = x >= alpha
        grad_x = grad * ((x >= 0) & ~above)
        grad_alpha = (grad * above).sum_to_size(alpha.shape)
        return grad_x, grad_alpha, None


def pact_fake_quantize(x: Tensor, alpha: Tensor, *, num_bits: int = 8) -> Tensor:
    """PACT activation quantization (Choi et al. 2018): clip to ``[0, alpha]`` with a learned ``alpha``, then
    quantize uniformly to ``2^b - 1`` steps: ``round(y (2^b - 1) / alpha) alpha / (2^b - 1)``.

    Gradients (straight-through on the rounding): ``x`` gets 1 on ``0 <= x < alpha``, else 0; ``alpha`` gets 1
    where ``x >= alpha``, else 0 (summed). Add the paper's L2 penalty on ``alpha`` to the loss yourself.

    >>> a = torch.tensor(2.0, requires_grad=True)
    >>> y = pact_fake_quantize(torch.tensor([-1.0, 0.7, 3.0]), a, num_bits=2)
    >>> y.sum().backward(); y.detach(), a.grad
    (tensor([0.0000, 0.6667, 2.0000]), tensor(1.))
    """
    validate_num_bits(num_bits)
    return _PACT.apply(x, alpha, (1 << num_bits) - 1)
