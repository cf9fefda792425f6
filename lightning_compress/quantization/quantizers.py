"""Quantizer modules and the layers they attach to, without changing the user's parameter keys.

A chosen ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` gets its ``__class__`` swapped in place for a static,
importable subclass (:class:`QuantConv1d`, :class:`QuantConv2d`, :class:`QuantLinear`: picklable and
deep-copyable) that owns two :class:`TensorQuantizer` submodules, ``input_quantizer`` (per tensor) and
``weight_quantizer`` (per output channel by default). Its ``weight`` and ``bias`` stay where they were, so the
user's keys are unchanged; the quantizers add ``<layer>.input_quantizer.amax`` and
``<layer>.weight_quantizer.amax`` buffers (and ``step`` / ``alpha`` parameters for LSQ / PACT), which a callback
re-creates in ``setup`` before Lightning loads a checkpoint. :func:`remove_quantizers` swaps the classes back and
:func:`float_state_dict` strips the extra keys from a state dict.

The math lives in :mod:`lightning_compress.quantization.functional`; this file never imports Lightning.
References: Jacob et al. 2018 (integer-arithmetic-only inference, fake quantization); Esser et al. 2019 (LSQ);
Choi et al. 2018 (PACT).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_compress.quantization.functional import (
    fake_quantize,
    lsq_fake_quantize,
    lsq_init_step,
    pact_fake_quantize,
    qrange,
    validate_num_bits,
)
from lightning_compress.quantization.residual import remove_residual_quantizers
from lightning_compress.quantization.spec import (  # noqa: F401  (re-exported: their home before spec.py)
    LEARN_MODES,
    QuantSpec,
    validate_flag,
    validate_learn,
    validate_reduce_range,
    validate_unsigned,
)

__all__ = [
    "LEARN_MODES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantNonDynamicallyQuantizableLinear",
    "QuantSpec",
    "TensorQuantizer",
    "attach_quantizer",
    "float_state_dict",
    "quantized_layers",
    "remove_quantizers",
]

_QUANTIZER_NAMES = ("input_quantizer", "weight_quantizer")
_EPS = 1e-8


def absmax(x: Tensor, axis: int | None = None) -> Tensor:
    """``max |x|`` over everything (``axis=None``) or per slice along ``axis``.

    >>> absmax(torch.tensor([[1.0, -3.0], [0.5, 0.0]]), axis=0)
    tensor([3.0000, 0.5000])
    """
    a = x.detach().abs()
    if axis is None:
        return a.max() if a.numel() else torch.zeros((), device=x.device)
    return a.transpose(0, axis).reshape(a.shape[axis], -1).amax(dim=1)


class TensorQuantizer(nn.Module):
    """Fake quantization of one tensor with its state: ``amax`` (buffer), LSQ ``step`` or PACT ``alpha``.

    Modes (plain attributes the owner sets): ``calibrating`` (pass ``x`` through unchanged and feed
    ``calibrator``), ``enabled`` (fake-quantize; otherwise pass through), ``observe`` (set ``amax`` to
    ``max |x|`` of every call first, per channel when ``axis`` is set: the weight observer), ``dynamic`` (use the
    current tensor's ``max |x|`` without storing it).

    Args:
        num_bits: 2 to 16.
        axis: channel axis of a per-channel quantizer (0 for weights), ``None`` for per tensor.
        channels: number of channels along ``axis``.
        unsigned: quantize to ``[0, 2^b - 1]``.
        learn: ``"none"``, ``"lsq"`` or ``"pact"``.

    >>> q = TensorQuantizer(4)
    >>> _ = q.amax.fill_(1.0)
    >>> q(torch.tensor([0.1, 0.6, -2.0]))  # scale 1/7
    tensor([ 0.1429,  0.5714, -1.0000])
    """

    amax: Tensor
    step: nn.Parameter
    alpha: nn.Parameter

    def __init__(
        self, num_bits: int = 8, *, axis: int | None = None, channels: int = 1, unsigned: bool = False,
        learn: str = "none",
    ) -> None:
        super().__init__()
        validate_num_bits(num_bits)
        self.num_bits, self.axis, self.unsigned, self.learn = num_bits, axis, unsigned, validate_learn(learn)
        shape = (channels,) if axis is not None else ()
        self.register_buffer("amax", torch.zeros(shape))
        if learn == "lsq":
            self.step = nn.Parameter(torch.ones(shape))
        elif learn == "pact":
            self.alpha = nn.Parameter(torch.ones(()))
        self.enabled, self.calibrating, self.observe, self.dynamic = True, False, False, False
        #: after calibration, become unsigned if every value seen was non-negative (``reduce_range`` inputs)
        self.sign_from_data = False
        self.calibrator: Any = None
        #: maps a batch's max |x| to the range all ranks agree on (DDP: an all-reduce MAX); set while calibrating
        self.range_reducer: Callable[[float], float] | None = None
        self.min_seen = float("inf")
        self.tracker: Any = None  # a qat_ranges.RangeTracker moving ``amax`` at every call while set (QAT steps)

    @property
    def qmax(self) -> int:
        return qrange(self.num_bits, self.unsigned)[1]

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, axis={self.axis}, unsigned={self.unsigned}, learn={self.learn!r}"

    def _collect(self, x: Tensor) -> None:
        if x.numel():
            self.min_seen = min(self.min_seen, float(x.detach().min()))
        if hasattr(self.calibrator, "range_max"):  # histogram: every rank grows its bins alike
            top = float(absmax(x)) if x.numel() else 0.0
            if self.range_reducer is not None:
                top = float(self.range_reducer(top))
            self.calibrator.collect(x, range_max=top)
        else:
            self.calibrator.collect(x)

    def _step_view(self, x: Tensor) -> Tensor:
        step = self.step.abs().clamp_min(_EPS)
        if self.axis is None:
            return step
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return step.view(shape)

    def current_amax(self, x: Tensor | None = None) -> Tensor:
        """The clipping threshold the next call uses: learned (``step * qmax`` or ``alpha``), observed or stored."""
        if self.learn == "lsq":
            return self.step.detach().abs() * self.qmax
        if self.learn == "pact":
            return self.alpha.detach().abs().reshape(())
        if (self.observe or self.dynamic) and x is not None:
            amax = absmax(x, self.axis)
            if self.observe:
                with torch.no_grad():
                    self.amax.copy_(amax)
            return amax
        return self.amax

    def init_learned(self, x: Tensor | None = None) -> None:
        """Initialise LSQ ``step`` / PACT ``alpha`` in place (the optimizer keeps the same tensors).

        With ``x`` (a weight) LSQ uses the paper's ``2 mean|x| / sqrt(Q_P)``; without, ``amax / qmax`` of the
        calibrated ``amax`` (and PACT ``alpha = amax``).
        """
        with torch.no_grad():
            if self.learn == "lsq":
                if x is not None:
                    value = lsq_init_step(x, self.num_bits, unsigned=self.unsigned, axis=self.axis)
                else:
                    value = self.amax / float(self.qmax)
                self.step.copy_(value.clamp_min(_EPS).to(self.step))
            elif self.learn == "pact":
                self.alpha.copy_(self.amax.clamp_min(_EPS).to(self.alpha))

    def sync_amax(self, x: Tensor | None = None) -> None:
        """Write the threshold in use into the ``amax`` buffer (for logging, export and float-free checkpoints)."""
        with torch.no_grad():
            self.amax.copy_(self.current_amax(x).reshape(self.amax.shape).to(self.amax))

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            if self.calibrator is not None:
                self._collect(x)
            return x
        if not self.enabled:
            return x
        if self.tracker is not None:
            with torch.no_grad():
                self.amax.copy_(self.tracker.update(x).reshape(self.amax.shape).to(self.amax))
        if self.learn == "lsq":
            return lsq_fake_quantize(x, self._step_view(x), num_bits=self.num_bits, unsigned=self.unsigned)
        if self.learn == "pact":
            return pact_fake_quantize(x, self.alpha.abs().clamp_min(_EPS), num_bits=self.num_bits)
        return fake_quantize(x, self.current_amax(x), num_bits=self.num_bits, unsigned=self.unsigned, axis=self.axis)


class _QuantLayer:
    """Shared forward of the quantized layers: fake-quantize the input and the weight, then the float op."""

    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer
    measure_error: bool
    last_error: Tensor | None
    weight: Any
    bias: Any

    def _float_op(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self._float_op(self.input_quantizer(x), self.weight_quantizer(self.weight))
        if self.measure_error:  # one extra float pass of this layer only, on demand
            with torch.no_grad():
                self.last_error = F.mse_loss(out.detach(), self._float_op(x, self.weight)).detach()
        return out


class QuantConv1d(_QuantLayer, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized input and weight (made by :func:`attach_quantizer`)."""

    def _float_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input and weight (made by :func:`attach_quantizer`)."""

    def _float_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantLinear(_QuantLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized input and weight (made by :func:`attach_quantizer`)."""

    def _float_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)


class QuantNonDynamicallyQuantizableLinear(_QuantLayer, NonDynamicallyQuantizableLinear):
    """``MultiheadAttention.out_proj`` with fake-quantized input and weight, where it is called as a layer."""

    def _float_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)


QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    NonDynamicallyQuantizableLinear: QuantNonDynamicallyQuantizableLinear,
}
_FLOAT_CLASSES = {quant: base for base, quant in QUANT_CLASSES.items()}


def is_quantized(module: nn.Module) -> bool:
    return type(module) in _FLOAT_CLASSES


def float_base(module: nn.Module) -> type[nn.Module] | None:
    """The Conv1d / Conv2d / Linear class whose computation ``module`` runs: its own type, or the base of a subclass
    that only adds construction (Hugging Face's ``EfficientNetDepthwiseConv2d``: same ``forward``); else ``None``."""
    if type(module) in QUANT_CLASSES:
        return type(module)
    for base in QUANT_CLASSES:
        if isinstance(module, base) and all(getattr(type(module), method, None) is getattr(base, method, None)
                                            for method in ("forward", "_conv_forward")):
            return base
    return None


def check_quantizable(layers: Mapping[str, nn.Module]) -> None:
    """Raise a ``ValueError`` naming every layer that does not compute as a Conv1d, Conv2d or Linear (a subclass
    with its own ``forward``), unless already quantized."""
    bad = {n: type(m).__name__ for n, m in layers.items() if float_base(m) is None and not is_quantized(m)}
    if bad:
        raise ValueError(
            f"cannot quantize layers {bad}: only nn.Conv1d, nn.Conv2d and nn.Linear (or subclasses that keep their "
            "forward) are supported; exclude them with exclude=[...]"
        )


def attach_quantizer(module: Any, spec: QuantSpec) -> Any:
    """Turn ``module`` in place into its quantized class with fresh quantizers (``amax`` 0, modes default).

    An already quantized layer keeps its quantizers when they match ``spec`` (``fit`` called twice), and gets
    fresh ones otherwise. Returns the module.

    >>> layer = attach_quantizer(nn.Linear(3, 2), QuantSpec(num_bits=8))
    >>> type(layer).__name__, sorted(layer.state_dict())
    ('QuantLinear', ['bias', 'input_quantizer.amax', 'weight', 'weight_quantizer.amax'])
    """
    check_quantizable({"": module})
    unsigned = spec.unsigned is True or spec.learn == "pact"
    if is_quantized(module):
        inp, wq = module.input_quantizer, module.weight_quantizer
        signs = inp.unsigned == unsigned or (inp.sign_from_data and not unsigned)  # unsigned from its data: same
        same = (inp.learn == spec.learn and signs and wq.num_bits == spec.num_bits
                and inp.num_bits == spec.input_bits and (wq.axis == 0) == spec.per_channel)
        if same:
            return module
        _detach(module)
    device = module.weight.device
    channels = module.weight.shape[0]
    weight_learn = "lsq" if spec.learn == "lsq" else "none"
    base = float_base(module)
    assert base is not None
    if type(module) is not base:  # a subclass that only adds construction: restored by _detach
        module.__dict__["_float_class"] = type(module)
    module.__class__ = QUANT_CLASSES[base]
    module.add_module("input_quantizer", TensorQuantizer(spec.input_bits, unsigned=unsigned, learn=spec.learn))
    module.input_quantizer.sign_from_data = (spec.reduce_range or spec.unsigned == "auto") and not unsigned
    module.add_module("weight_quantizer", TensorQuantizer(
        spec.num_bits, axis=0 if spec.per_channel else None, channels=channels, learn=weight_learn))
    module.input_quantizer.to(device)
    module.weight_quantizer.to(device)
    module.measure_error, module.last_error = False, None
    return module


def _detach(module: Any) -> None:
    for name in _QUANTIZER_NAMES:
        if name in module._modules:
            del module._modules[name]
    for attr in ("measure_error", "last_error"):
        module.__dict__.pop(attr, None)
    module.__class__ = module.__dict__.pop("_float_class", None) or _FLOAT_CLASSES[type(module)]


def quantized_layers(model: nn.Module) -> dict[str, Any]:
    """``{name: layer}`` of every quantized layer in ``model`` (``named_modules`` order)."""
    return {name: module for name, module in model.named_modules() if is_quantized(module)}


def remove_quantizers(model: nn.Module) -> list[str]:
    """Swap every quantized layer of ``model`` back to its float class and delete its quantizers (and the residual
    quantizers of :mod:`~lightning_compress.quantization.residual`).

    Returns the names of the layers restored. The float weights are untouched (fake quantization never writes
    them), so the model is exactly the float model that was trained.

    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> _ = attach_quantizer(model[0], QuantSpec())
    >>> remove_quantizers(model), type(model[0]).__name__, sorted(model.state_dict())
    (['0'], 'Linear', ['0.bias', '0.weight'])
    """
    remove_residual_quantizers(model)
    names = []
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            _detach(module)
            names.append(name)
    return names


def float_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the quantizer entries, loadable (strictly) into a fresh float model.

    >>> float_state_dict({"fc.weight": 1, "fc.input_quantizer.amax": 2, "fc.weight_quantizer.step": 3})
    {'fc.weight': 1}
    """
    def is_quantizer_key(key: str) -> bool:
        parts = key.split(".")
        return any(part in (*_QUANTIZER_NAMES, "residual_quantizer") for part in parts[:-1])

    return {key: value for key, value in state_dict.items() if not is_quantizer_key(key)}
