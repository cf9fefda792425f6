"""A real int8 model for CPU inference from a fake-quantized one, and how to count what it costs.

:func:`export_int8` runs ``torch.ao``'s FX graph mode (``prepare_fx`` / ``convert_fx`` with the x86 backend) on a
float copy of the model, so a user module works as written (functional activations, ``torch.flatten`` into a
``Linear``, residual additions) where eager ``convert`` fails. The observers of the quantized layers do not
recalibrate anything: they return the scales of our quantizers (Jacob et al. 2018 integer arithmetic; TensorRT's
symmetric scales): a signed input ``[-127, 127]`` as ``quint8`` with ``zero_point`` 128 and ``scale = amax / 127``,
an unsigned one with ``zero_point`` 0 and ``scale = amax / 255``, weights ``qint8`` per channel with ``scale =
amax / 127``. :func:`quantized_counts` counts parameters, bytes and multiply-adds of such a model from its packed
weights (``torch.utils.flop_counter`` and ``parameters()`` see none of them).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.quantization.quantizers import absmax, quantized_layers, remove_quantizers

__all__ = ["Int8Model", "deterministic_off", "export_int8", "quantized_counts"]


@contextmanager
def deterministic_off() -> Iterator[None]:
    """Turn ``torch.use_deterministic_algorithms`` off inside the block and restore it (and ``warn_only``) after.

    Quantized CPU kernels refuse deterministic mode, which ``Trainer(deterministic=True)`` leaves on.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        if enabled:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


class Int8Model(nn.Module):
    """The converted graph module; its forward runs with deterministic mode temporarily off (and restored)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with deterministic_off():
            return self.model(*args, **kwargs)


class _AmaxObserver(MinMaxObserver):
    """Activation observer: our input quantizer's symmetric scale when ``amax`` is set, else min/max affine."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.update(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
        super().__init__(**kwargs)
        self.amax: float | None = None
        self.unsigned, self.qmax = False, 127

    @torch.jit.export
    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if self.amax is None:
            return super().calculate_qparams()
        amax = max(self.amax, 1e-12)
        if self.unsigned:
            return torch.tensor([amax / self.qmax]), torch.tensor([0], dtype=torch.int32)
        return torch.tensor([amax / self.qmax]), torch.tensor([128], dtype=torch.int32)


class _WeightAmaxObserver(PerChannelMinMaxObserver):
    """Per-channel weight observer returning ``amax / qmax`` of our weight quantizer.

    After BatchNorm folding the weight of channel ``o`` is scaled by ``c_o``; the observer sees ``max|w_f|`` and
    scales ``amax`` by ``max|w_f| / ref_absmax`` (``ref_absmax`` the unfolded per-channel max), which is exactly
    ``|c_o|`` and leaves the integer weights unchanged.
    """

    def __init__(self, amax: Tensor | None = None, ref_absmax: Tensor | None = None, qmax: int = 127,
                 **kwargs: Any) -> None:
        kwargs.update(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        super().__init__(**kwargs)
        self.amax, self.ref_absmax, self.qmax = amax, ref_absmax, qmax

    @torch.jit.export
    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if self.amax is None or self.ref_absmax is None:
            return super().calculate_qparams()
        seen = torch.maximum(-self.min_val, self.max_val)
        ratio = torch.where(self.ref_absmax > 0, seen / self.ref_absmax.clamp_min(1e-30), torch.ones_like(seen))
        scale = (self.amax * ratio / self.qmax).clamp_min(1e-12).float()
        return scale, torch.zeros_like(scale, dtype=torch.int64)


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _layer_scales(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Read every quantized layer's scales and clamp its float weight to the weight ``amax`` (in the copy)."""
    scales: dict[str, dict[str, Any]] = {}
    for name, layer in quantized_layers(model).items():
        inq, wq = layer.input_quantizer, layer.weight_quantizer
        if not inq.enabled or inq.calibrating or inq.dynamic:
            raise ValueError(
                f"layer {name!r} has no static input scale (quantizer disabled, calibrating or dynamic); "
                "export_int8 needs calibrated (static) input quantizers"
            )
        if inq.num_bits > 8 or wq.num_bits > 8:
            raise ValueError(f"layer {name!r} uses {max(inq.num_bits, wq.num_bits)} bits; export_int8 needs <= 8")
        w_amax = wq.current_amax(layer.weight).detach().float().reshape(-1).cpu()
        channels = layer.weight.shape[0]
        w_amax = w_amax.expand(channels).clone() if w_amax.numel() == 1 else w_amax
        with torch.no_grad():
            bound = w_amax.view(-1, *([1] * (layer.weight.dim() - 1))).to(layer.weight)
            layer.weight.copy_(torch.maximum(torch.minimum(layer.weight, bound), -bound))
        scales[name] = {
            "amax": float(inq.current_amax()),
            "unsigned": bool(inq.unsigned or inq.learn == "pact"),
            "qmax": inq.qmax,
            "w_amax": w_amax,
            "w_ref": absmax(layer.weight, 0).float().cpu(),
            "w_qmax": wq.qmax,
        }
    if not scales:
        raise ValueError("export_int8 found no quantized layer; attach quantizers (QAT or PTQ static) first")
    return scales


def _qconfig_mapping(model: nn.Module, scales: dict[str, dict[str, Any]]) -> QConfigMapping:
    default_weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    mapping = QConfigMapping().set_global(QConfig(activation=_AmaxObserver, weight=default_weight))
    for name, module in model.named_modules():
        if name and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name not in scales:
            mapping.set_module_name(name, None)  # layers the user left float stay float
    for name, s in scales.items():
        weight = _WeightAmaxObserver.with_args(amax=s["w_amax"], ref_absmax=s["w_ref"], qmax=s["w_qmax"])
        mapping.set_module_name(name, QConfig(activation=_AmaxObserver, weight=weight))
    return mapping


_RELUS = (nn.ReLU, nn.ReLU6)
_RELU_CALLS = (torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu6, "relu", "relu_")


def _after_relu(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether an FX node's value is the output of a ReLU (module, function, method, or a fused ``...ReLU``)."""
    if getattr(node, "op", None) == "call_module":
        module = modules.get(node.target)
        fused = type(module).__module__.startswith("torch.ao.nn.intrinsic") and "ReLU" in type(module).__name__
        return isinstance(module, _RELUS) or fused
    return getattr(node, "op", None) in ("call_function", "call_method") and node.target in _RELU_CALLS


def _set_input_observers(prepared: torch.fx.GraphModule, scales: dict[str, dict[str, Any]]) -> None:
    """Give each quantized layer's input observer our scale.

    A signed scale on a ReLU output is written with ``zero_point`` 0 and the same step (``amax / 127``): the integers
    are those of the fake-quantized model, and torch.ao, which lowers ``op -> ReLU -> quantize`` to ``op ->
    quantize`` on the assumption that the output range starts at 0, then keeps the ReLU's effect. (With ``zero_point``
    128 the negative values would pass.) Values above ``amax`` are not clipped there (up to ``2 * amax``).
    """
    modules = dict(prepared.named_modules())
    for node in prepared.graph.nodes:
        if node.op != "call_module" or node.target not in scales or not node.args:
            continue
        source = node.args[0]
        observer = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
        if not isinstance(observer, _AmaxObserver):
            continue
        s = scales[node.target]
        if observer.amax is None:
            observer.amax, observer.unsigned, observer.qmax = s["amax"], s["unsigned"], s["qmax"]
        else:  # one tensor feeding several quantized layers: the widest range, signed unless all unsigned
            observer.amax = max(observer.amax, s["amax"])
            if observer.unsigned != s["unsigned"]:
                observer.unsigned, observer.qmax = False, min(observer.qmax, s["qmax"], 127)
        if source.args and _after_relu(source.args[0], modules):
            observer.unsigned = True  # same step (qmax kept), zero_point 0


def export_int8(model: nn.Module, example_inputs: Any) -> nn.Module:
    """A real int8 CPU model (x86 backend) that uses the calibrated or learned scales of ``model``'s quantizers.

    ``model`` is a model with quantizers attached (by ``QuantizationAwareTraining`` or ``quantize_model(...,
    "static")``); it is not modified. A float copy is traced with ``torch.ao``'s FX graph mode, BatchNorm is
    folded into the preceding convolution (its weight scales follow, so the integer weights are those of the
    fake-quantized model), and every quantized layer gets our scales: input ``amax`` (``quint8``, ``zero_point``
    128 signed / 0 unsigned) and per-channel weight ``amax`` (``qint8``; weights are first clamped to it).

    Intermediate tensors that have no quantizer of ours (the output of a residual addition, a pooling, the
    final logits) are observed with a min/max affine observer on ``example_inputs``: pass a representative batch.
    When one tensor feeds several quantized layers (a block input feeding a convolution and a shortcut), it is
    quantized once with the largest of their input ``amax`` values. Layers quantized below 8 bits export on the
    8-bit grid of their own scale (the integers are exact; activations are clipped at the 8-bit range, not at
    theirs). Layers without quantizers stay float.

    The returned :class:`Int8Model` runs with ``torch.use_deterministic_algorithms`` temporarily off (quantized
    kernels refuse it) and restores the setting after each call.

    Args:
        model: the fake-quantized model (any device; the export is on CPU).
        example_inputs: a batch (tensor or tuple of positional inputs) used to trace and to observe intermediates.

    Returns:
        An ``nn.Module`` running int8 kernels on CPU.

    Raises:
        ValueError: if ``model`` has no quantized layer, or one with a dynamic / uncalibrated input or > 8 bits.
    """
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    float_model = copy.deepcopy(model).cpu().eval()
    scales = _layer_scales(float_model)
    remove_quantizers(float_model)
    args = tuple(a.detach().cpu() if isinstance(a, Tensor) else a for a in _as_args(example_inputs))
    mapping = _qconfig_mapping(float_model, scales)
    with deterministic_off(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(shared|TypedStorage|quantize_fx|quantized tensor creation)")
        prepared = prepare_fx(float_model, mapping, example_inputs=args)
        prepared(*args)
        _set_input_observers(prepared, scales)
        converted = _views_as_reshapes(convert_fx(prepared))
        _check_runs(converted, args)
    return Int8Model(converted).eval()


def _views_as_reshapes(converted: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``x.view(...)`` as ``x.reshape(...)``: quantized convolutions return channels-last strides, which ``view``
    rejects (``x.view(x.size(0), -1)`` into the classifier); ``reshape`` copies only where ``view`` would fail."""
    changed = False
    for node in converted.graph.nodes:
        if node.op == "call_method" and node.target == "view":
            node.target, changed = "reshape", True
    if changed:
        converted.recompile()
    return converted


def _check_runs(converted: nn.Module, args: tuple[Any, ...]) -> None:
    """Run the int8 model once on the example batch, so a model that cannot run fails here, not at its first use."""
    try:
        converted(*args)
    except Exception as error:
        raise RuntimeError(
            f"the int8 model converted by torch.ao fails on the example inputs ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); the float and fake-quantized models are unchanged"
        ) from error


# ------------------------------------------------------------------------------------------------ counting


_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)


def _packed_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    for name, module in model.named_modules():
        if hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            yield name, module


def _weight_packed_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    for name, module in model.named_modules():
        if callable(getattr(module, "payload_bytes", None)) and callable(getattr(module, "dequantized_weight", None)):
            yield name, module


def _packed_macs(module: Any, output: Any) -> int:
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, Tensor) or out.dim() == 0:
        return 0
    weight = module.weight()
    per_output = weight[0].numel()  # in_channels / groups * kernel, or in_features
    return int(out.numel() // max(out.shape[0], 1) * per_output) if out.dim() > 1 else int(out.numel() * per_output)


def quantized_counts(model: nn.Module, example_inputs: Any | None = None) -> dict[str, int]:
    """Parameters, bytes and multiply-adds of a model with ``torch.ao`` quantized (packed-weight) layers.

    Packed layers (quantized ``Conv*``, ``Linear``, their fused ``...ReLU`` variants) count their int8 weight
    elements and float bias from ``module.weight()`` / ``module.bias()``; the weight-only packed layers of
    :func:`~lightning_compress.quantization.packed.export_packed` count their original weight elements and their
    packed payload (codes and decoding table; their float bias counts as a float parameter); float parameters
    elsewhere count as usual. Multiply-adds are for ONE sample (like
    :func:`lightning_compress.measure.count_macs`): the packed layers from their output shapes (forward hooks), the
    float rest from ``torch.utils.flop_counter``.

    Returns:
        ``{"parameters", "quantized_parameters", "nonzero_parameters", "weight_bytes", "macs"}`` (non-zero:
        integer weights other than their zero point, e.g. pruned entries stay pruned); ``weight_bytes`` is the payload
        (1 byte per int8 weight, 4 per float bias, scale and zero point per channel, 4 bytes per float
        parameter); ``macs`` is 0 without ``example_inputs``.
    """
    quantized = bytes_ = nonzero = 0
    for _, module in _packed_layers(model):
        weight, bias = module.weight(), module.bias()
        quantized += weight.numel() + (bias.numel() if bias is not None else 0)
        nonzero += int(torch.count_nonzero(weight.int_repr() - weight.q_per_channel_zero_points().view(
            -1, *([1] * (weight.dim() - 1))) if weight.qscheme() in _PER_CHANNEL else weight.int_repr()
            - weight.q_zero_point()))
        nonzero += int(torch.count_nonzero(bias)) if bias is not None else 0
        bytes_ += weight.numel() * weight.element_size() + (bias.numel() * 4 if bias is not None else 0)
        bytes_ += 8 * weight.shape[0] if weight.qscheme() in _PER_CHANNEL else 8
    for _, module in _weight_packed_layers(model):  # packed low-bit layers (packed.py): bias is a float parameter
        quantized += module.weight_numel()
        nonzero += int(torch.count_nonzero(module.dequantized_weight()))
        bytes_ += module.payload_bytes()
    floats = sum(p.numel() for p in model.parameters())
    counts = {"parameters": quantized + floats, "quantized_parameters": quantized,
              "nonzero_parameters": nonzero + sum(int(torch.count_nonzero(p.detach())) for p in model.parameters()),
              "weight_bytes": bytes_ + 4 * floats, "macs": 0}
    if example_inputs is None:
        return counts
    packed_macs: list[int] = []
    handles = [m.register_forward_hook(lambda mod, _i, out: packed_macs.append(_packed_macs(mod, out)))
               for _, m in _packed_layers(model)]
    args = tuple(a[:1] if isinstance(a, Tensor) else a for a in _as_args(example_inputs))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    counts["macs"] = sum(packed_macs) + counter.get_total_flops() // 2
    return counts
