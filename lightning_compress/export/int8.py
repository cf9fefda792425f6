"""A real int8 model for CPU inference from a fake-quantized one, computed exactly on the host it runs on.

:func:`export_int8` runs ``torch.ao``'s FX graph mode (``prepare_fx`` / ``convert_fx``) on a float copy of the model,
so a user module works as written (functional activations, ``torch.flatten`` into a ``Linear``, residual additions)
where eager ``convert`` fails. The observers of the quantized layers do not recalibrate anything: they return the
scales of our quantizers (Jacob et al. 2018 integer arithmetic; TensorRT's symmetric scales): a signed input of ``b``
bits (``qmax = 2^(b-1) - 1``) as ``quint8`` with ``zero_point = qmax + 1`` and ``scale = amax / qmax``, an input
after a ReLU or an unsigned one with ``zero_point`` 0, weights ``qint8`` per channel with ``scale = amax / 127``.
Every quantized layer's input is clipped at its ``amax`` first (a quantized ``hardtanh`` on the integer codes),
exactly as its fake quantizer clips, so activations that outgrew their calibrated range match too.

The quantized engine is chosen for the host (:mod:`~lightning_compress.export.engines`): ``x86`` where it is
exact, ``qnnpack`` where full-range activations would saturate the ``x86`` kernels (x86 without VNNI). The
:class:`Int8Model` records it and runs under it; the result is checked against the fake-quantized model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.export.counting import quantized_counts
from lightning_compress.export.engines import choose_engine, exact_engines, host_summary, quantized_engine
from lightning_compress.export.int8_graph import (
    ResidualPointError,
    clips_as_calls,
    contiguous_before_clips,
    drop_point_markers,
    explicit_padding,
    insert_clips,
    output_layers,
    pack_output_layers,
    qconfig_mapping,
    set_input_observers,
    set_point_observers,
    views_as_reshapes,
)
from lightning_compress.export.int8_rewrites import constant_products_in_float
from lightning_compress.export.kernel_check import check_kernel, kernel_exactness
from lightning_compress.export.verify import Int8MismatchError, check_agreement
from lightning_compress.quantization.bias_rounding import rounded_biases
from lightning_compress.quantization.quantizers import absmax, quantized_layers, remove_quantizers
from lightning_compress.quantization.residual import residual_qparams, residual_quantizers

__all__ = ["METHODS", "Int8MismatchError", "Int8Model", "deterministic_off", "export_int8", "quantized_counts",
           "resolve_method"]

#: how :func:`export_int8` converts: torch.ao FX graph mode, module-by-module dynamic int8 Linear, or chosen per model
METHODS = ("auto", "fx", "dynamic")


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


@contextmanager
def fx_device_cache_released() -> Iterator[None]:
    """Empty torch.ao's per-module device cache after the block: its FX passes ask each prepared and converted model
    for its device through a ``functools.cache`` (torch 2.13), which keeps every copy alive (about 300 MB per export
    of a ConvNeXt-T at 64 images of 3x32x32)."""
    try:
        yield
    finally:
        from torch.ao.quantization.fx import utils

        clear = getattr(getattr(utils, "assert_and_get_unique_device", None), "cache_clear", None)
        if clear is not None:
            clear()


def spatial_means_flattened(converted: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``x.mean((a, a + 1))`` without ``keepdim`` as ``x.flatten(a, a + 1).mean(a)``, the same numbers: torch
    2.13's quantized ``mean`` over ``[2, 3]`` refuses a 1x1 input with channels-last strides, what a quantized
    convolution returns ("required rank 4 tensor to use channels_last format": ShuffleNetV2 on 32x32 images, in
    torch.ao's own FX flow too)."""
    for node in converted.graph.nodes:
        is_mean = (node.op, node.target) in (("call_method", "mean"), ("call_function", torch.mean))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if not is_mean or keepdim or not isinstance(dims, (list, tuple)) or len(dims) != 2:
            continue
        first, second = dims
        if not (isinstance(first, int) and isinstance(second, int) and second - first == 1 and first * second > 0):
            continue
        with converted.graph.inserting_before(node):
            flat = converted.graph.call_method("flatten", (node.args[0], first, second))
        node.op, node.target, node.args, node.kwargs = "call_method", "mean", (flat, first), {}
    converted.recompile()
    return converted


class Int8Model(nn.Module):
    """The converted graph module, run under the quantized engine it was converted for (:attr:`engine`) with
    deterministic mode temporarily off; both settings are restored after each call.

    Attributes:
        engine: the ``torch.backends.quantized`` engine the packed weights were made for.
        verification: the agreement with the fake-quantized model measured at export (see ``check_agreement``).
    """

    def __init__(self, model: nn.Module, engine: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.engine = engine or torch.backends.quantized.engine
        self.verification: dict[str, Any] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with deterministic_off(), quantized_engine(self.engine):
            return self.model(*args, **kwargs)


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


def export_int8(model: nn.Module, example_inputs: Any, *, engine: str = "auto", min_agreement: float | None = 0.99,
                check_inputs: Any = None, method: str = "auto") -> Int8Model:
    """A real int8 CPU model that uses the calibrated or learned scales of ``model``'s quantizers, checked against it.

    ``model`` is a model with quantizers attached (by ``QuantizationAwareTraining`` or ``quantize_model(...,
    "static")``); it is not modified. A float copy is traced with ``torch.ao``'s FX graph mode, BatchNorm is
    folded into the preceding convolution or linear layer (its weight scales follow, so the integer weights are
    those of the fake-quantized model), every quantized layer's input is clipped at its ``amax`` and quantized with
    our scale, and its weight per channel with our weight ``amax`` (``qint8``; weights are first clamped to it).

    Intermediate tensors that have no quantizer of ours (the output of a residual addition, a pooling, the
    final logits) are observed with a min/max affine observer on ``example_inputs``: pass a representative batch.
    A model quantized with ``quantize_model(..., residual_quantizers=True)`` has quantizers at those tensors
    (:mod:`~lightning_compress.quantization.residual`): their scales and zero points are used instead, so the int8
    model computes what the fake-quantized model computes; their int32 bias rounding
    (:mod:`~lightning_compress.quantization.bias_rounding`) is written into the biases, so ``qnnpack``, which stores
    biases as int32, and the float-bias engines compute the same.
    When one tensor feeds several quantized layers (a block input feeding a convolution and a shortcut), it is
    quantized once with the largest of their input ``amax`` values. Layers without quantizers stay float.

    The engine: ``"auto"`` picks the fastest one that computes these activations exactly on this CPU (``x86``
    when every activation code stays within 127 or the CPU has VNNI, else ``qnnpack``; see
    :mod:`~lightning_compress.export.engines`); a named engine that would saturate here is refused. The
    returned :class:`Int8Model` runs under that engine and with ``torch.use_deterministic_algorithms`` temporarily
    off (quantized kernels refuse it), restoring both after each call.

    Args:
        model: the fake-quantized model (any device; the export is on CPU).
        example_inputs: a batch (tensor or tuple of positional inputs) used to trace, to observe intermediates and
            to check the result.
        engine: ``"auto"``, ``"x86"``, ``"fbgemm"``, ``"onednn"`` or ``"qnnpack"``.
        min_agreement: the smallest share of samples on which the int8 and the fake-quantized model must predict
            the same class (argmax of the last dimension; for one output per sample, a relative error within 5%);
            ``None`` skips the check (the numbers are still in :attr:`Int8Model.verification`).
        check_inputs: more inputs (a tensor, run 64 samples at a time; a tuple; or an iterable of batches) to
            check on, e.g. held-out data.
        method: ``"fx"`` (above), ``"dynamic"`` (:func:`~lightning_compress.export.int8_dynamic.export_int8_dynamic`:
            int8 ``Linear`` / ``Conv1D`` swapped module by module, activations quantized per call, no tracing) or
            ``"auto"``: ``"dynamic"`` for transformers (attention modules, ``Conv1D``), else ``"fx"``.

    Returns:
        An :class:`Int8Model` running int8 kernels on CPU; its ``verification`` holds the agreement, the largest
        absolute output difference, the engine and ``kernel``: every int8 Conv / Linear's output codes on the
        first 4 samples of the example batch recomputed with integer arithmetic (``wrong`` codes: an engine error;
        ``near_tie``: float rounding every engine may do, which a sensitive network can still amplify into
        disagreement).

    Raises:
        ValueError: if ``model`` has no quantized layer, or one with a dynamic / uncalibrated input or > 8 bits; an
            unknown engine or one that cannot compute the model exactly on this host; a model FX cannot trace
            (Python on sizes or values in its forward), or a convolution with uneven ``padding="same"``.
        Int8MismatchError: (a ``ValueError``) if the agreement is below ``min_agreement``, or (with
            ``min_agreement`` set) if an int8 layer's kernel computed codes that integer arithmetic does not give
            (:func:`~lightning_compress.export.kernel_check.kernel_exactness`).
    """
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement={min_agreement!r} must be in [0, 1] or None")
    if resolve_method(model, method) == "dynamic":
        from lightning_compress.export.int8_dynamic import export_int8_dynamic

        return export_int8_dynamic(model, example_inputs, engine=engine, min_agreement=min_agreement,
                                   check_inputs=check_inputs)
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    float_model = copy.deepcopy(model).cpu().eval()
    scales = _layer_scales(float_model)
    points = residual_qparams(float_model)
    rounded_biases(float_model)  # the int32 biases the fake-quantized model simulates (bias_rounding)
    remove_quantizers(float_model)
    uneven = explicit_padding(float_model)
    if uneven:
        raise ValueError(f"convolutions {uneven} use padding='same' with an even kernel (unequal padding), which "
                         "torch.ao's int8 convolutions cannot run; use export_onnx, or pad explicitly")
    try:
        float_model = insert_clips(float_model, scales, points)
    except ResidualPointError:
        raise
    except Exception as error:  # symbolic tracing of data-dependent Python (int(size), branches on values)
        raise ValueError(
            f"torch.ao FX cannot trace {type(model).__name__} for the int8 model ({type(error).__name__}: "
            f"{error}); export_onnx exports it with the same scales, or method='dynamic' makes its Linear layers "
            "int8") from error
    args = tuple(a.detach().cpu() if isinstance(a, Tensor) else a for a in _as_args(example_inputs))
    mapping = qconfig_mapping(float_model, scales)
    with deterministic_off(), fx_device_cache_released(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(shared|TypedStorage|quantize_fx|quantized tensor creation)")
        prepared = prepare_fx(copy.deepcopy(float_model), mapping, example_inputs=args)
        outputs = output_layers(prepared, scales)
        if outputs:  # computed in float on quantized inputs and weights: logits are not requantized
            for name in outputs:
                mapping.set_module_name(name, None)
            prepared = prepare_fx(float_model, mapping, example_inputs=args)
        prepared(*args)
        max_code = set_input_observers(prepared, scales)
        differing = set_point_observers(prepared, points)
        if differing:
            warnings.warn(f"the residual quantizers of {differing} have another step than the input quantizers "
                          "that read their tensor; the int8 model uses the residual quantizers'", stacklevel=2)
        chosen = choose_engine(max_code, engine)
        with quantized_engine(chosen):
            converted = spatial_means_flattened(views_as_reshapes(drop_point_markers(convert_fx(prepared))))
            constant_products_in_float(converted)
            pack_output_layers(converted, {name: scales[name] for name in outputs})
            if chosen == "qnnpack":
                contiguous_before_clips(converted)
            clips_as_calls(converted)
            kernel = _run_checked(converted, args, chosen, [e for e in exact_engines(max_code) if e != chosen])
    if min_agreement is not None:
        check_kernel(kernel, chosen)
    int8 = Int8Model(converted, chosen).eval()
    int8.verification = {"engine": chosen, "max_activation_code": max_code, **host_summary(), "kernel": kernel,
                         **check_agreement(model, int8, args, check_inputs, min_agreement, _advice(model))}
    return int8


#: why a static model without residual quantizers may disagree, and the fix
RESIDUAL_ADVICE = ("The fake-quantized model keeps in float the tensors the int8 graph stores in 8 bits (outputs "
                   "feeding residual additions, activations, squeeze-excitation gates): quantize it with "
                   "residual_quantizers=True (quantize_model, PostTrainingQuantization), which took a ResNet-50 from "
                   "88% to 98% agreement. ")


def _advice(model: nn.Module) -> str:
    return "" if residual_quantizers(model) else RESIDUAL_ADVICE


def resolve_method(model: nn.Module, method: str) -> str:
    """``"fx"`` or ``"dynamic"`` for ``model`` (``"auto"``: dynamic for transformers).

    Raises:
        ValueError: an unknown method, or ``"fx"`` for a transformer (FX tracing fails on it).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {METHODS}")
    from lightning_compress.export.int8_dynamic import is_transformer

    transformer = is_transformer(model)
    if method == "fx" and transformer:
        raise ValueError(f"method='fx' cannot export {type(model).__name__}: FX graph mode does not trace attention "
                         "modules (nn.MultiheadAttention, Hugging Face attention and Conv1D); use method='dynamic' "
                         "(or 'auto')")
    return "dynamic" if method == "dynamic" or (method == "auto" and transformer) else "fx"


def _run_checked(converted: nn.Module, args: tuple[Any, ...], engine: str, others: list[str]) -> dict[str, Any]:
    """Run the int8 model once on the example batch with the kernel check (:func:`kernel_exactness`), so a model
    that cannot run fails here, not at its first use (e.g. ``qnnpack``'s addition refuses input / output scale
    ratios outside [2^-14, 2^8))."""
    try:
        return kernel_exactness(converted, args)
    except Exception as error:
        raise RuntimeError(
            f"the int8 model converted by torch.ao for engine {engine!r} fails on the example inputs "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); the float and "
            f"fake-quantized models are unchanged. Other engines that compute it exactly here: {others}"
        ) from error
