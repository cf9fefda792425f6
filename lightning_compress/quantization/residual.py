"""Residual quantizers: the tensors an int8 graph stores in 8 bits besides the quantized layers' inputs.

A fake-quantized network quantizes the input of every quantized layer; its int8 export (``torch.ao`` FX graph mode,
:func:`~lightning_compress.export.int8.export_int8`) also stores in 8 bits every tensor between quantized operators:

- the output of a quantized layer (after its folded BatchNorm) that feeds something other than a quantized layer,
  e.g. a residual addition (``bn2`` of a ResNet block, its ``downsample``): an 8-bit affine ``quint8`` tensor whose
  scale and zero point a min/max observer chooses (kind ``"range"``);
- a tensor that feeds a quantized layer and something else (a ResNet block's output feeds the next block's first
  convolution and its identity shortcut; the stem's pooled output): stored once, at the step of the consuming
  layers' input quantizer, with the ``quint8`` codes 0..255 (kind ``"consumers"``), so the shortcut carries those
  quantized values;
- the output of an op with fixed output quantization in torch.ao (sigmoid, hardsigmoid: scale 1/256, zero point 0;
  tanh: 2/256, 128), e.g. a squeeze-excitation gate (kind ``"fixed"``);
- the output of an average pooling of such a tensor: torch.ao averages its codes and rounds to the same grid (kind
  ``"pool"``, on the pooling module: it averages the codes too, so ties round as the int8 kernel rounds them; a
  float average of the values rounds them at random, and a squeeze-excitation gate spreads each flip over a whole
  channel);
- the product of two such tensors (a squeeze-excitation gate times its input): torch.ao's ``quantized::mul``
  multiplies the codes exactly and requantizes ``round(c * m)`` with ``m = s_a * s_b / s_out`` in float32 (kind
  ``"mul"``, on the module whose output the product is: it recovers the integer product of the codes from the float
  one and rounds alike; products of a 1/256 gate fall on exact ties in about 1% of the values, which the float
  product then rounds at random: 2.6e-4 of MobileNetV3-Small's products differed, and the network amplifies each).

A :class:`ResidualQuantizer` at each of these points makes the fake-quantized model compute what the int8 model
computes; :func:`export_int8` then uses their scales instead of observing. Each is a submodule named
``residual_quantizer`` of the module whose output it quantizes (its ``scale`` / ``zero_point`` buffers are in the
state dict), applied by a forward hook. A tensor that no module returns (the first addition of a Swin block) is
quantized instead by an ``input_residual_quantizer`` of the module that reads it first, which a forward pre-hook
applies in place, so its later readers (the addition after) read the rounded tensor too; :func:`residual_quantizers`
lists it as ``"<module>:input"``. (Concatenations are left to their readers: torch.ao shares one observer among a
concatenation's inputs and the concatenations that read it, as in DenseNet.) The points are found by tracing the
model with ``torch.fx`` (:mod:`~lightning_compress.quantization.residual_points`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.quantization.bias_rounding import remove_bias_rounding
from lightning_compress.quantization.functional import affine_qparams, straight_through

__all__ = ["INPUT", "INPUT_NAME", "KINDS", "NAME", "ResidualQuantizer", "check_residual_options",
           "finish_residual_quantizers", "hook_residual_quantizer", "move_residual_quantizer", "quantizer_module",
           "remove_residual_quantizers", "residual_qparams", "residual_quantizers"]

#: the attribute (and state-dict key part) of the quantizer on the module whose output it quantizes
NAME = "residual_quantizer"
INPUT_NAME = "input_residual_quantizer"
INPUT = ":input"  # the suffix of an input quantizer's key in residual_quantizers()
KINDS = ("range", "consumers", "fixed", "pool", "mul")
QMIN, QMAX = 0, 255  # quint8 codes, as torch.ao stores activations


class ResidualQuantizer(nn.Module):
    """8-bit affine fake quantization ``s * (clamp(round(x / s) + z, 0, 255) - z)`` of one module's output.

    Args:
        kind: ``"range"``: ``scale`` / ``zero_point`` from the min / max of the calibration data (torch.ao's
            ``MinMaxObserver`` for ``quint8``); ``"consumers"``: the step of the input quantizers of ``consumers``
            (the widest, zero point 0 after a ReLU or when all are unsigned, else ``qmax + 1``); ``"fixed"``: the
            ``fixed`` ``(scale, zero_point)`` torch.ao gives the op's output; ``"pool"``: on an average pooling, the
            grid of the quantizer of ``consumers[0]`` (the module whose output is pooled), averaging codes;
            ``"mul"``: the product of two tensors on the grids of the quantizers of ``operands``, requantized as
            ``quantized::mul`` does, to the grid of ``consumers`` (as ``"consumers"``; ``"range"`` without them).
        consumers: names of the quantized layers whose input this tensor is (for ``"consumers"``), or of the module
            whose quantizer gives the grid (``"pool"``).
        relu: the tensor is a ReLU's output (non-negative).
        fixed: ``(scale, zero_point)`` of a ``"fixed"`` quantizer.
        operands: for ``"mul"``, the names of the two modules whose residual quantizers hold the factors' grids.

    >>> q = ResidualQuantizer()
    >>> q.calibrating = True
    >>> _ = q(torch.tensor([-1.0, 3.0]))
    >>> q.finish_range(); round(q.scale.item() * 255, 4), q.zero_point.item()
    (4.0, 64)
    """

    scale: Tensor
    zero_point: Tensor
    operand_scales: Tensor

    def __init__(self, kind: str = "range", consumers: tuple[str, ...] = (), relu: bool = False,
                 fixed: tuple[float, int] | None = None, operands: tuple[str, ...] = ()) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not supported; allowed: {KINDS}")
        if (kind == "fixed") != (fixed is not None):
            raise ValueError(f"fixed={fixed!r} goes with kind='fixed' only, and kind='fixed' needs it")
        if (kind == "mul") != (len(operands) == 2):
            raise ValueError(f"operands={operands!r}: two go with kind='mul' only, and kind='mul' needs them")
        self.kind, self.consumers, self.relu = kind, tuple(consumers), bool(relu)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.operands = tuple(operands)
        if kind == "mul":
            self.register_buffer("operand_scales", torch.ones(2, dtype=torch.float64))
        self.calibrating, self.enabled = False, True
        if fixed is not None:
            self.set_qparams(*fixed)
        self.min_seen, self.max_seen = math.inf, -math.inf

    def extra_repr(self) -> str:
        consumers = f", consumers={list(self.consumers)}" if self.consumers else ""
        return f"kind={self.kind!r}{consumers}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            if x.numel():
                self.min_seen = min(self.min_seen, float(x.detach().min()))
                self.max_seen = max(self.max_seen, float(x.detach().max()))
            return x
        if not self.enabled:
            return x
        if self.kind == "mul":
            return self.multiply(x)
        return torch.fake_quantize_per_tensor_affine(x, self.scale.float(), self.zero_point.int(), QMIN, QMAX)

    def multiply(self, product: Tensor) -> Tensor:
        """The float product of two factors on the grids of ``operand_scales`` as ``quantized::mul`` requantizes it:
        the integer product ``c`` of the codes (exact in float32 up to 2^24, recovered by rounding ``product /
        (s_a s_b)``), then ``clamp(round(c * m) + z, 0, 255)`` with ``m = s_a * s_b * (1 / s)`` in float32, ties
        to even.

        >>> q = ResidualQuantizer("mul", operands=("gate", "x"))
        >>> q.set_qparams(0.1, 0); _ = q.operand_scales.copy_(torch.tensor([1 / 256, 0.1]))
        >>> q(torch.tensor([128 / 256 * 0.1, 384 / 256 * 0.1]))  # codes 0.5 -> 0 and 1.5 -> 2 (half to even)
        tensor([0.0000, 0.2000])
        """
        first, second = (float(v) for v in self.operand_scales)
        scale, zero_point = self.scale.float(), self.zero_point.float()
        codes = torch.round(product.float() / (first * second))
        multiplier = (torch.tensor(first, dtype=torch.float32) * torch.tensor(second, dtype=torch.float32)
                      * (1.0 / scale.cpu())).to(product.device)
        out = torch.clamp(torch.round(codes * multiplier) + zero_point, QMIN, QMAX)
        return straight_through(product, ((out - zero_point) * scale).to(product.dtype))

    def pool(self, module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
        """``module``'s average pooling of ``x`` computed on the codes of this grid and rounded half to even (the
        integer sum is exact in float, so ties are exact); ``output`` as it is while calibrating or disabled."""
        if self.calibrating or not self.enabled:
            return output
        scale, zero_point = self.scale.float(), self.zero_point.float()
        codes = torch.clamp(torch.round(x / scale) + zero_point, QMIN, QMAX)
        averaged = module.forward(codes)  # not through __call__: no hooks
        return straight_through(output, (torch.clamp(torch.round(averaged), QMIN, QMAX) - zero_point) * scale)

    def finish_range(self) -> None:
        """Set ``scale`` / ``zero_point`` from the range seen while calibrating (a ``"range"`` quantizer), and stop
        calibrating."""
        self.calibrating = False
        if math.isinf(self.min_seen):
            raise RuntimeError("a residual quantizer saw no calibration data")
        low = max(self.min_seen, 0.0) if self.relu else self.min_seen  # hooked before the ReLU it stands for
        scale, zero_point = affine_qparams(low, max(self.max_seen, low), QMIN, QMAX)
        self.set_qparams(float(scale), int(zero_point))

    def finish_consumers(self, inputs: list[tuple[float, bool, int]]) -> None:
        """Set the step of the consuming layers' input quantizers, given as ``(amax, unsigned, qmax)`` in graph
        order, combined as the int8 export combines them (the widest ``amax``; signed unless all are unsigned)."""
        if not inputs:
            raise RuntimeError("a residual quantizer has no quantized consumer left")
        amax, unsigned, qmax = inputs[0]
        for other_amax, other_unsigned, other_qmax in inputs[1:]:
            amax = max(amax, other_amax)
            if other_unsigned != unsigned:
                unsigned, qmax = False, min(qmax, other_qmax, 127)
        unsigned = unsigned or self.relu
        self.set_qparams(max(amax, 1e-12) / qmax, 0 if unsigned else qmax + 1)

    def set_qparams(self, scale: float, zero_point: int) -> None:
        if not (scale > 0 and math.isfinite(scale)) or not QMIN <= zero_point <= QMAX:
            raise ValueError(f"scale={scale!r} must be finite and positive, zero_point={zero_point!r} in [0, 255]")
        with torch.no_grad():
            self.scale.fill_(scale)
            self.zero_point.fill_(zero_point)


class _ApplyResidualQuantizer:
    """The forward hook that passes a module's output through its ``residual_quantizer`` (picklable)."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        quantizer = getattr(module, NAME)
        if not isinstance(output, Tensor):
            return output
        if isinstance(quantizer, ResidualQuantizer) and quantizer.kind == "pool" and args:
            return quantizer.pool(module, args[0], output)
        return quantizer(output)


class _ApplyInputResidualQuantizer:
    """The forward pre-hook that rounds a module's first input through its ``input_residual_quantizer`` in place
    (picklable): the other readers of that tensor read it rounded too, as the int8 graph stores it. A view (whose
    base other ops may read) or a tensor autograd tracks is not changed in place: the module alone reads it rounded."""

    def __call__(self, module: nn.Module, args: Any) -> Any:
        quantizer = getattr(module, INPUT_NAME)
        if not args or not isinstance(args[0], Tensor):
            return None
        rounded = quantizer(args[0])
        if rounded is args[0]:
            return None
        if args[0]._base is not None or (torch.is_grad_enabled() and args[0].requires_grad):
            return (rounded, *args[1:])
        args[0].copy_(rounded)
        return None


def residual_quantizers(model: nn.Module) -> dict[str, ResidualQuantizer]:
    """``{name of the module whose output is quantized: quantizer}``, and ``{name + ":input": quantizer}`` for the
    quantizers of a module's input (``named_modules`` order)."""
    found = {}
    for name, module in model.named_modules():
        for attribute, suffix in ((NAME, ""), (INPUT_NAME, INPUT)):
            quantizer = module._modules.get(attribute)
            if isinstance(quantizer, ResidualQuantizer):
                found[name + suffix] = quantizer
    return found


def quantizer_module(key: str) -> tuple[str, bool]:
    """The module name in a :func:`residual_quantizers` key, and whether the quantizer is on its input."""
    return (key[:-len(INPUT)], True) if key.endswith(INPUT) else (key, False)


def hook_residual_quantizer(module: nn.Module, quantizer: ResidualQuantizer, on_input: bool = False) -> None:
    if on_input:
        module.add_module(INPUT_NAME, quantizer)
        if not any(isinstance(h, _ApplyInputResidualQuantizer) for h in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_ApplyInputResidualQuantizer())
        return
    module.add_module(NAME, quantizer)
    if not any(isinstance(h, _ApplyResidualQuantizer) for h in module._forward_hooks.values()):
        module.register_forward_hook(_ApplyResidualQuantizer())


def _unhook(module: nn.Module) -> dict[bool, ResidualQuantizer]:
    """Remove ``module``'s residual quantizers and their hooks: ``{on its input: quantizer}``."""
    for hooks, kind in ((module._forward_hooks, _ApplyResidualQuantizer),
                        (module._forward_pre_hooks, _ApplyInputResidualQuantizer)):
        for key in [k for k, h in hooks.items() if isinstance(h, kind)]:
            del hooks[key]
    found = {on_input: module._modules.pop(attribute, None) for on_input, attribute in ((False, NAME),
                                                                                          (True, INPUT_NAME))}
    return {on_input: q for on_input, q in found.items() if isinstance(q, ResidualQuantizer)}


def remove_residual_quantizers(model: nn.Module) -> list[str]:
    """Delete every residual quantizer of ``model`` and its hook (and the bias rounding hooks of
    :mod:`~lightning_compress.quantization.bias_rounding`); returns their :func:`residual_quantizers` keys."""
    remove_bias_rounding(model)
    names = list(residual_quantizers(model))
    for name in names:
        _unhook(model.get_submodule(quantizer_module(name)[0]))
    return names


def move_residual_quantizer(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (a module replacing ``old`` in an export rewrite) the residual quantizers of ``old``, if any."""
    for on_input, quantizer in _unhook(old).items():
        hook_residual_quantizer(new, quantizer, on_input)


def check_residual_options(residual: Any, mode: str, method: str) -> bool:
    """``residual_quantizers`` is a bool, and ``True`` only with a static mode calibrated on data."""
    if not isinstance(residual, bool):
        raise ValueError(f"residual_quantizers={residual!r} must be True or False")
    if residual and (mode != "static" or method == "global"):
        raise ValueError(f"residual_quantizers=True needs mode='static' with a calibration on data (got mode={mode!r}, "
                         f"calibration={method!r}): the ranges of residual outputs are calibrated min / max")
    return residual


def finish_residual_quantizers(quantizers: Mapping[str, ResidualQuantizer], layers: Mapping[str, Any]) -> None:
    """Set every quantizer's scale: ``"range"`` ones from their calibration range, ``"consumers"`` ones from the
    calibrated input quantizers of their consumers among ``layers`` (``{name: quantized layer}``).

    Raises:
        RuntimeError: naming a quantizer that saw no data, or whose consumers were all left float.
    """
    pools = {name: q for name, q in quantizers.items() if q.kind == "pool"}
    for name, quantizer in quantizers.items():
        quantizer.calibrating = False
        try:
            if quantizer.kind in ("fixed", "pool"):
                continue
            if quantizer.kind == "range" or (quantizer.kind == "mul" and not quantizer.consumers):
                quantizer.finish_range()
            else:
                quantizer.finish_consumers([
                    (float(inq.current_amax()), bool(inq.unsigned or inq.learn == "pact"), inq.qmax)
                    for inq in (layers[c].input_quantizer for c in quantizer.consumers if c in layers)
                    if inq.enabled and not inq.dynamic])
        except RuntimeError as error:
            raise RuntimeError(f"residual quantizer of {name!r}: {error}") from None
    for name, quantizer in pools.items():
        source = quantizers.get(quantizer.consumers[0]) if quantizer.consumers else None
        if source is None:
            raise RuntimeError(f"residual quantizer of {name!r}: the quantizer of its input is gone")
        quantizer.set_qparams(float(source.scale), int(source.zero_point))
    for name, quantizer in quantizers.items():
        if quantizer.kind != "mul":
            continue
        factors = [quantizers.get(operand) for operand in quantizer.operands]
        if any(factor is None for factor in factors):
            raise RuntimeError(f"residual quantizer of {name!r}: the quantizer of a factor is gone")
        with torch.no_grad():
            quantizer.operand_scales.copy_(torch.tensor([float(f.scale) for f in factors if f is not None]))


def residual_qparams(model: nn.Module) -> dict[str, tuple[float, int]]:
    """``{module name: (scale, zero_point)}`` of the residual quantizers of ``model``, for an export (not the
    ``"pool"`` ones: the int8 pooling keeps its input's grid by itself).

    Raises:
        ValueError: a residual quantizer is disabled or still calibrating.
    """
    found = {}
    for name, quantizer in residual_quantizers(model).items():
        if quantizer.kind == "pool":
            continue
        if quantizer.calibrating or not quantizer.enabled:
            state = "calibrating" if quantizer.calibrating else "disabled"
            raise ValueError(f"the residual quantizer of {name!r} is {state}; an export needs calibrated ones")
        found[name] = (float(quantizer.scale), int(quantizer.zero_point))
    return found
