"""Quantized layers as ONNX QuantizeLinear / DequantizeLinear pairs carrying our scales (a pre-export rewrite).

:func:`qdq_model` returns a copy of a fake-quantized network in which every quantized ``Conv1d`` / ``Conv2d`` /
``Linear`` (:mod:`~lightning_compress.quantization.quantizers`) becomes a :class:`QDQLayer`: its weight is stored
already quantized (an ``int8`` tensor; above 8 bits the float values it takes) with its per-channel scale, and its
input goes through one ``lightning_compress::qdq`` op. Both ops are registered custom ops (``torch.library``) that
compute exactly what :func:`~lightning_compress.quantization.fake_quantize` computes and translate, for
``torch.onnx.export`` (:func:`register_symbolics`), into

- input: ``QuantizeLinear -> DequantizeLinear`` with the input's scale (``int8`` for signed 8-bit data, ``uint8``
  for unsigned; a 7-bit input as ``uint8`` in ``[0, 127]`` with zero point ``-qmin``), preceded by ``Max`` / ``Min``
  only where the quantizer's range is narrower than the stored type's: a narrow signed range ``[-127, 127]`` clips at
  ``-amax`` (``round(x / s)`` below ``-127.5`` would otherwise give the unused code ``-128``); the top clip at
  ``amax`` is the type's own saturation;
- weight: an integer initializer and ``DequantizeLinear`` (per output channel).

A full 8-bit unsigned input (``unsigned="auto"`` / ``True`` after a ReLU) is a ``uint8`` QuantizeLinear only in the
integer layout (``integer_kernels=True``, for VNNI hosts); otherwise it is rounded with float operators and cast to
``uint8`` before its DequantizeLinear, so that onnxruntime does not fuse integer kernels that saturate on 8-bit
inputs without VNNI.

Batch norm that reads a quantized convolution's output and nothing else (right after it in an ``nn.Sequential``,
or found by tracing the forward) is folded into the dequantization scale and the bias, which is exact for the
quantized weight (``q * s * g = q * (s g)``; a negative factor negates the integers, exact in a symmetric narrow
range). Jacob et al. 2018 (integer-arithmetic-only inference); ONNX operators
QuantizeLinear / DequantizeLinear.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.graph.batchnorm import batchnorm_links
from lightning_compress.quantization.bias_rounding import rounded_biases
from lightning_compress.quantization.functional import qrange
from lightning_compress.quantization.quantizers import TensorQuantizer, is_quantized
from lightning_compress.quantization.residual import (
    INPUT_NAME,
    NAME,
    move_residual_quantizer,
    quantizer_module,
    residual_quantizers,
)

__all__ = ["Int8Embedding", "QDQLayer", "RoundedResidual", "batchnorm_folds", "exact_everywhere", "qdq_model",
           "quantized_weight", "register_symbolics"]

_SCALE_FLOOR = 1e-30


@torch.library.custom_op("lightning_compress::qdq", mutates_args=())
def qdq(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Per-tensor fake quantization ``scale * clamp(round(x / scale), qmin, qmax)`` (zero point 0)."""
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), torch.zeros((), dtype=torch.int32),
                                                 qmin, qmax)


@qdq.register_fake
def _qdq_fake(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lightning_compress::dequantize_weight", mutates_args=())
def dequantize_weight(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    """``q * scale`` with ``scale`` per slice along ``axis`` (float32)."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.float() * scale.reshape(shape)


@dequantize_weight.register_fake
def _dequantize_weight_fake(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def exact_everywhere(qmin: int, qmax: int) -> bool:
    """Whether onnxruntime's x86 integer kernels compute an input of ``[qmin, qmax]`` exactly on every CPU: stored
    as ``uint8`` in ``[0, 127]`` (zero point ``-qmin``). Without AVX-512 VNNI they multiply ``uint8`` activations by
    ``int8`` weights in saturating 16-bit pair sums (``vpmaddubsw``), so 8-bit activations (and ``int8`` ones,
    shifted to ``uint8``) can overflow; 7-bit ones (``reduce_range=True``) cannot."""
    return qmax - qmin <= 127


def _onnx_dtype(qmin: int, qmax: int) -> tuple[torch.dtype, int, int, int] | None:
    """``(type, zero point, lowest, highest stored value)`` of an input of ``[qmin, qmax]``; ``None`` above 8
    bits."""
    if exact_everywhere(qmin, qmax):
        return torch.uint8, -qmin, 0, 255
    if qmin >= 0 and qmax <= 255:
        return torch.uint8, 0, 0, 255
    if qmin >= -128 and qmax <= 127:
        return torch.int8, 0, -128, 127
    return None


def _qdq_symbolic(g: Any, x: Any, scale: Any, qmin: Any, qmax: Any) -> Any:
    from torch.onnx import symbolic_helper

    low_q, high_q = symbolic_helper._get_const(qmin, "i", "qmin"), symbolic_helper._get_const(qmax, "i", "qmax")

    def bound(level: int) -> Any:
        return g.op("Mul", scale, g.op("Constant", value_t=torch.tensor(float(level))))

    found = _onnx_dtype(low_q, high_q)
    if found is None:  # above 8 bits: the same arithmetic in float operators (opset <= 20 has no int16 Q/DQ)
        levels = g.op("Clip", g.op("Round", g.op("Div", x, scale)), g.op("Constant", value_t=torch.tensor(
            float(low_q))), g.op("Constant", value_t=torch.tensor(float(high_q))))
        return g.op("Mul", levels, scale)
    dtype, zero_point, low, high = found
    if low_q + zero_point > low:  # the type's saturation is the quantizer's clipping where they coincide
        x = g.op("Max", x, bound(low_q))
    if high_q + zero_point < high:
        x = g.op("Min", x, bound(high_q))
    zero = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero), scale, zero)


def _dequantize_symbolic(g: Any, q: Any, scale: Any, axis: Any) -> Any:
    from torch.onnx import symbolic_helper

    return g.op("DequantizeLinear", q, scale, axis_i=symbolic_helper._get_const(axis, "i", "axis"))


def register_symbolics(opset: int) -> None:
    """Teach ``torch.onnx.export`` (the TorchScript exporter) our two ops as ONNX Q/DQ at ``opset``."""
    torch.onnx.register_custom_op_symbolic("lightning_compress::qdq", _qdq_symbolic, opset)
    torch.onnx.register_custom_op_symbolic("lightning_compress::dequantize_weight", _dequantize_symbolic, opset)


def quantized_weight(weight: Tensor, amax: Tensor, num_bits: int) -> tuple[Tensor, Tensor]:
    """``(integers, scale)`` of a weight as :func:`~lightning_compress.quantization.fake_quantize` quantizes it
    (narrow range, per output channel when ``amax`` has one entry per channel; an ``amax`` of 0 gives zeros).

    >>> q, s = quantized_weight(torch.tensor([[0.5, -1.0], [0.2, 0.1]]), torch.tensor([1.0, 0.2]), 8)
    >>> q.tolist(), s.mul(127).tolist()
    ([[64, -127], [127, 64]], [1.0, 0.20000000298023224])
    """
    qmin, qmax = qrange(num_bits)
    channels = weight.shape[0]
    amax = amax.detach().float().reshape(-1).expand(channels) if amax.numel() == 1 else amax.detach().float()
    valid = amax > 0
    scale = torch.where(valid, amax, torch.ones_like(amax)) / qmax
    view = [-1] + [1] * (weight.dim() - 1)
    q = torch.round(weight.detach().float() * (1.0 / scale).reshape(view)).clamp(qmin, qmax)
    q = q * valid.reshape(view)
    dtype = torch.int8 if num_bits <= 8 else torch.int32
    return q.to(dtype), torch.where(valid, scale, torch.full_like(scale, _SCALE_FLOOR))


class QDQLayer(nn.Module):
    """A quantized ``Conv1d`` / ``Conv2d`` / ``Linear`` for export: input through ``qdq``, weight as integers.

    Built by :func:`qdq_model` from a quantized layer; computes what the fake-quantized layer computes. A weight
    above 8 bits (or not quantized) is stored as the float values it takes.
    """

    weight_q: Tensor
    weight_scale: Tensor | None
    input_scale: Tensor
    bias: Tensor | None

    def __init__(self, layer: Any, bn: nn.BatchNorm1d | nn.BatchNorm2d | None = None,
                 integer_kernels: bool | None = None) -> None:
        super().__init__()
        inp, wq = layer.input_quantizer, layer.weight_quantizer
        _check_static(inp)
        self.kind = "linear" if isinstance(layer, nn.Linear) else f"conv{layer.weight.dim() - 2}d"
        if self.kind != "linear":
            if layer.padding_mode != "zeros":
                raise ValueError(f"padding_mode={layer.padding_mode!r} is not exported; only 'zeros'")
            self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding, layer.dilation,
                                                                     layer.groups)
            # read by models that pad in their forward (Hugging Face MobileNetV2's TensorFlow "same" padding)
            self.kernel_size, self.in_channels, self.out_channels = (layer.kernel_size, layer.in_channels,
                                                                     layer.out_channels)
        if wq.enabled and not wq.calibrating:  # a calibrating weight quantizer passes the float weight through
            q, scale = quantized_weight(layer.weight, wq.current_amax(layer.weight), wq.num_bits)
        else:
            q, scale = layer.weight.detach().float().clone(), torch.ones(layer.weight.shape[0])
        bias = layer.bias.detach().float().clone() if layer.bias is not None else None
        if bn is not None:
            q, scale, bias = _fold_bn(q, scale, bias, bn)
        stored_scale: Tensor | None = scale
        if q.dtype != torch.int8:  # ONNX Q/DQ up to opset 20 holds 8 bits: keep the exact float values
            q, stored_scale = dequantize_weight(q, scale, 0), None
        self.axis = 0
        if self.kind == "linear":  # stored (in, out): a MatMul over the constant, no Transpose at run time
            q, self.axis = q.t().contiguous(), 1
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", stored_scale)
        self.register_buffer("bias", bias)
        self.input_enabled = inp.enabled
        amax = inp.current_amax().detach().float().reshape(())
        self.qmin, self.qmax = qrange(inp.num_bits, inp.unsigned)
        self.input_zero = not bool(amax > 0)
        self.register_buffer("input_scale", (torch.ones(()) if self.input_zero else amax) / self.qmax)
        exact = exact_everywhere(self.qmin, self.qmax) and inp.num_bits <= 8
        self.integer_kernels = (exact if integer_kernels is None else integer_kernels) and self.input_enabled

    @property
    def weight(self) -> Tensor:
        """The float weight the layer computes with, in the original layout (models read ``layer.weight.dtype``)."""
        weight = self.weight_q if self.weight_scale is None else dequantize_weight(self.weight_q, self.weight_scale,
                                                                                   self.axis)
        return weight.t() if self.kind == "linear" else weight

    def _quantize_input(self, x: Tensor) -> Tensor:
        if self.qmax - self.qmin > 127 and self.qmin >= 0 and not self.integer_kernels:
            # a uint8 QuantizeLinear here would let onnxruntime fuse integer kernels, which saturate on 8-bit
            # inputs without VNNI; rounding in float operators, cast, then DequantizeLinear computes the same
            levels = torch.clamp(torch.round(x * (1.0 / self.input_scale)), self.qmin, self.qmax)
            return dequantize_weight(levels.to(torch.uint8), self.input_scale.reshape(()), 0)
        return qdq(x, self.input_scale, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        weight = f"weight {tuple(self.weight_q.shape)} {self.weight_q.dtype}"
        return f"{self.kind}, {weight}, input [{self.qmin}, {self.qmax}]"

    def forward(self, x: Tensor) -> Tensor:
        shape, reshaped = x.shape, False
        if self.kind == "linear":
            # onnxruntime fuses Q/DQ + MatMul over 3-d inputs into an integer MatMul, and MatMul + Add over 2-d ones
            # into a float Gemm: lay the input out for the kernel the layer should get
            if self.integer_kernels and x.dim() == 2:
                x, reshaped = x.unsqueeze(1), True
            elif not self.integer_kernels and x.dim() > 2:
                x, reshaped = x.reshape(-1, shape[-1]), True
        if self.input_enabled:
            x = self._quantize_input(x)
            if self.input_zero:
                x = x * 0.0
        weight = self.weight_q if self.weight_scale is None else dequantize_weight(self.weight_q, self.weight_scale,
                                                                                   self.axis)
        if self.kind == "linear":
            out = torch.matmul(x, weight)
            out = out + self.bias if self.bias is not None else out
            return out.reshape(*shape[:-1], out.shape[-1]) if reshaped else out
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        return conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _check_static(quantizer: TensorQuantizer) -> None:
    if quantizer.enabled and (quantizer.calibrating or quantizer.dynamic):
        state = "dynamic" if quantizer.dynamic else "calibrating"
        raise ValueError(f"an input quantizer is {state}: only static scales export (finish calibration, or use a "
                         "static PostTrainingQuantization / QuantizationAwareTraining model)")


def _fold_bn(q: Tensor, scale: Tensor, bias: Tensor | None,
             bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[Tensor, Tensor, Tensor]:
    """Fold eval-mode batch norm into the per-channel scale and the bias; a negative factor negates the integers."""
    var, mean = bn.running_var.detach().float(), bn.running_mean.detach().float()  # type: ignore[union-attr]
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(var)
    factor = gamma / torch.sqrt(var + bn.eps)
    sign = torch.where(factor < 0, -1, 1).to(q.dtype).reshape([-1] + [1] * (q.dim() - 1))  # exact: narrow range
    base = bias if bias is not None else torch.zeros_like(mean)
    return q * sign, (scale * factor.abs()).clamp_min(_SCALE_FLOOR), (base - mean) * factor + beta


def _usable_bn(layer: Any, bn: Any) -> bool:
    """Eval statistics and one channel per output channel of ``layer``: foldable."""
    return (isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn.track_running_stats
            and bn.running_var is not None and bn.num_features == layer.weight.shape[0])


def batchnorm_folds(model: nn.Module, example_inputs: Any = None) -> dict[str, str]:
    """``{quantized convolution: batch norm}`` pairs that fold exactly: the batch norm right after the convolution
    in an ``nn.Sequential``, and, traced on ``example_inputs`` (a tensor or a tuple of them), one anywhere in the
    forward (a residual block's ``self.bn1(self.conv1(x))``) that reads the convolution's output, is called once and
    is that output's only reader (:func:`~lightning_compress.graph.batchnorm.batchnorm_links`).
    """
    convs = {name: m for name, m in model.named_modules() if is_quantized(m) and m.weight.dim() > 2}
    folds: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for name, following in itertools.pairwise(names):
                full = f"{parent_name}.{name}" if parent_name else name
                if full in convs and _usable_bn(convs[full], parent._modules[following]):
                    folds[full] = f"{parent_name}.{following}" if parent_name else following
    tensors = (example_inputs,) if isinstance(example_inputs, Tensor) else example_inputs
    if isinstance(tensors, tuple) and tensors and all(isinstance(x, Tensor) for x in tensors):
        device = next(model.parameters()).device
        for conv, (bn, sole) in batchnorm_links(model, tuple(x.to(device) for x in tensors), list(convs)).items():
            if sole and _usable_bn(convs[conv], model.get_submodule(bn)):
                folds.setdefault(conv, bn)
    return folds


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` stored as int8 rows with one scale per row (weight-only, ``max |row| / 127``): the ONNX
    graph gathers the integers and the scales and multiplies them. Not what the PyTorch model computes (it keeps
    float tables): an opt-in of :func:`qdq_model` whose effect the export's verification measures."""

    table_q: Tensor
    row_scale: Tensor

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        if embedding.max_norm is not None:
            raise ValueError("an nn.Embedding with max_norm renormalises rows at run time; it is not exported as int8")
        q, scale = quantized_weight(embedding.weight, embedding.weight.detach().abs().amax(1), 8)
        self.register_buffer("table_q", q)
        self.register_buffer("row_scale", scale.reshape(-1, 1))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.table_q).float() * F.embedding(ids, self.row_scale)


def qdq_model(model: nn.Module, fold_bn: bool = True, integer_kernels: bool | None = None,
              embeddings: bool = False, example_inputs: Any = None) -> nn.Module:
    """An eval-mode copy of ``model`` with every quantized layer replaced by a :class:`QDQLayer` (with ``fold_bn``,
    the batch norms of :func:`batchnorm_folds` folded into their convolutions and replaced by ``nn.Identity``;
    ``example_inputs`` finds those outside an ``nn.Sequential``). Residual quantizers
    (:mod:`~lightning_compress.quantization.residual`) move to the modules that replace theirs and export as
    ``QuantizeLinear -> DequantizeLinear`` (``uint8``, their scale and zero point) in the integer layout, as
    :class:`RoundedResidual` float operators otherwise.

    ``integer_kernels``: lay out Linear layers so that onnxruntime runs them with integer kernels (``True``), float
    kernels over the int8 weights (``False``), or integer kernels only where they are exact on every x86 CPU
    (``None``: 7-bit inputs, see :func:`exact_everywhere`). ``embeddings``: store every ``nn.Embedding`` as an
    :class:`Int8Embedding` (a change of the model's numbers, opt-in).

    Raises:
        ValueError: a quantizer without a static scale (calibrating, dynamic), or a layer padding mode other than
            ``"zeros"``.
    """
    copied = copy.deepcopy(model).eval()
    rounded_biases(copied)  # the int32 biases the fake-quantized model simulates (bias_rounding)
    folds = batchnorm_folds(copied, example_inputs) if fold_bn else {}
    for parent_name, parent in list(copied.named_modules()):
        for name in list(parent._modules):
            child: Any = parent._modules[name]
            if embeddings and type(child) is nn.Embedding:
                parent._modules[name] = Int8Embedding(child)
            if child is None or not is_quantized(child):
                continue
            bn = folds.get(f"{parent_name}.{name}" if parent_name else name)
            norm: Any = copied.get_submodule(bn) if bn else None
            parent._modules[name] = QDQLayer(child, norm, integer_kernels)
            move_residual_quantizer(child, parent._modules[name])
    for bn in folds.values():
        identity = nn.Identity()
        move_residual_quantizer(copied.get_submodule(bn), identity)
        copied.set_submodule(bn, identity)
    layers = [m for m in copied.modules() if isinstance(m, QDQLayer)]
    if not (integer_kernels or (integer_kernels is None and all(layer.integer_kernels for layer in layers))):
        for name, quantizer in residual_quantizers(copied).items():
            if quantizer.kind == "mul":
                continue  # it already computes with float operators (a product requantized on codes)
            module, on_input = quantizer_module(name)
            holder, attribute = copied.get_submodule(module), INPUT_NAME if on_input else NAME
            holder._modules[attribute] = RoundedResidual(getattr(holder, attribute))
    return copied


class RoundedResidual(nn.Module):
    """A residual quantizer as float operators (``Div``, ``Round``, ``Clip``, ``Sub``, ``Mul``) for the float-kernel
    layout: the same numbers without a ``QuantizeLinear`` after a convolution, which would let onnxruntime fuse it
    into a ``QLinearConv`` (an integer kernel that saturates on 8-bit inputs without AVX-512 VNNI)."""

    scale: Tensor
    zero_point: Tensor

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.register_buffer("scale", quantizer.scale.detach().float().clone())  # type: ignore[operator]
        self.register_buffer("zero_point", quantizer.zero_point.detach().float().clone())  # type: ignore[operator]

    def forward(self, x: Tensor) -> Tensor:
        return (torch.clamp(torch.round(x / self.scale) + self.zero_point, 0, 255) - self.zero_point) * self.scale
