"""A real int8 model for CPU inference from a fake-quantized one, computed exactly on the host it runs on.

:func:`export_int8` runs ``torch.ao``'s FX graph mode (``prepare_fx`` / ``convert_fx``) on a float copy of the model,
so a user module works as written (functional activations, ``torch.flatten`` into a ``Linear``, residual additions)
where eager ``convert`` fails. The observers of the quantized layers do not recalibrate anything: they return the
scales of our quantizers (Jacob et al. 2018 integer arithmetic; TensorRT's symmetric scales): a signed input of ``b``
bits (``qmax = 2^(b-1) - 1``) as ``quint8`` with ``zero_point = qmax + 1`` and ``scale = amax / qmax``, an input
after a ReLU or an unsigned one with ``zero_point`` 0, weights ``qint8`` per channel with ``scale = amax / 127``.
Every quantized layer's input is clipped at its ``amax`` first (a quantized ``hardtanh`` on the integer codes),
exactly as its fake quantizer clips, so activations that outgrew their calibrated range match too.

The quantized engine is chosen for the host (:mod:`~lightning_compress.quantization.engines`): ``x86`` where it is
exact, ``qnnpack`` where full-range activations would saturate the ``x86`` kernels (x86 without VNNI). The
:class:`Int8Model` records it and runs under it; the result is checked against the fake-quantized model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.nn.intrinsic import _FusedModule
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping

from lightning_compress.quantization.counting import quantized_counts
from lightning_compress.quantization.engines import choose_engine, host_summary, quantized_engine
from lightning_compress.quantization.int8_weight import int8_weight_layer
from lightning_compress.quantization.quantizers import absmax, quantized_layers, remove_quantizers
from lightning_compress.quantization.verify import Int8MismatchError, check_agreement

__all__ = ["Int8MismatchError", "Int8Model", "deterministic_off", "export_int8", "quantized_counts"]

_CLIP_PREFIX = "_input_clip_"  # root-level Hardtanh modules, one per quantized layer, called right before it


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


class _AmaxObserver(MinMaxObserver):
    """Activation observer: our input quantizer's symmetric scale when ``amax`` is set, else min/max affine."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.update(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
        super().__init__(**kwargs)
        self.amax: float | None = None
        self.unsigned, self.qmax = False, 127

    @property
    def max_code(self) -> int:
        """The largest ``uint8`` code this observer's scale lets a clipped input take."""
        return self.qmax if self.unsigned else 2 * self.qmax + 1

    @torch.jit.export
    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if self.amax is None:
            return super().calculate_qparams()
        zero_point = 0 if self.unsigned else self.qmax + 1
        return torch.tensor([max(self.amax, 1e-12) / self.qmax]), torch.tensor([zero_point], dtype=torch.int32)


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


def _is_clip(node: Any) -> bool:
    return getattr(node, "op", None) == "call_module" and str(node.target).startswith(_CLIP_PREFIX)


def _insert_clips(model: nn.Module, scales: dict[str, dict[str, Any]]) -> torch.fx.GraphModule:
    """Trace ``model`` (torch.fx) and call a ``Hardtanh`` clip at ``amax`` right before every quantized layer.

    The clips are new root modules (``_input_clip_<i>``); the user's modules keep their names and types (a forward
    that checks ``isinstance`` of its own layers traces as written).
    """
    if "" in scales:  # the model is itself the quantized layer: give it a root to be called from
        model = nn.Sequential(model)
        scales["0"] = scales.pop("")
    traced = torch.fx.symbolic_trace(model)
    clips = {}
    for index, (name, s) in enumerate(scales.items()):
        clips[name] = f"{_CLIP_PREFIX}{index}"
        low = 0.0 if s["unsigned"] else -s["amax"]
        traced.add_submodule(clips[name], nn.Hardtanh(low, max(s["amax"], 1e-12)))
    for node in list(traced.graph.nodes):
        if node.op == "call_module" and node.target in clips and node.args:
            with traced.graph.inserting_before(node):
                clipped = traced.graph.call_module(clips[node.target], (node.args[0],))
            node.args = (clipped, *node.args[1:])
    traced.recompile()
    return traced


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


#: ops that keep a non-negative input non-negative and share its quantization parameters in torch.ao
_SIGN_KEEPING = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_SIGN_KEEPING_CALLS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
                       nn.functional.max_pool1d, nn.functional.max_pool2d, nn.functional.avg_pool1d,
                       nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool1d, nn.functional.adaptive_avg_pool2d,
                       nn.functional.adaptive_max_pool1d, nn.functional.adaptive_max_pool2d, nn.functional.dropout,
                       "flatten", "reshape", "view", "squeeze", "unsqueeze", "transpose", "permute", "contiguous",
                       "mean")


def _after_relu(node: Any, root: nn.Module) -> bool:
    """Whether an FX node's value is the output of a ReLU (module, function, method, or a fused ``...ReLU``), seen
    through observers and ops that keep a non-negative tensor non-negative (pooling, flatten, reshape, dropout)."""
    while True:
        op = getattr(node, "op", None)
        if op == "call_module":
            module = root.get_submodule(node.target)
            fused = type(module).__module__.startswith("torch.ao.nn.intrinsic") and "ReLU" in type(module).__name__
            if isinstance(module, _RELUS) or fused:
                return True
            passes = isinstance(module, (_SIGN_KEEPING, _AmaxObserver, torch.ao.quantization.ObserverBase))
        elif op in ("call_function", "call_method"):
            if node.target in _RELU_CALLS:
                return True
            passes = node.target in _SIGN_KEEPING_CALLS
        else:
            return False
        if not passes or not node.args:
            return False
        node = node.args[0]


def _input_observers(node: Any, root: nn.Module) -> tuple[list[_AmaxObserver], Any]:
    """The observers on the path into a quantized layer (through its clip), and the node that produced the value.

    (FX shares one observer instance between a clip's input and output, which ``named_modules`` lists once: look
    every node's module up by its target.)
    """
    observers: list[_AmaxObserver] = []
    source: Any = node.args[0] if node.args else None
    while getattr(source, "op", None) == "call_module":
        module = root.get_submodule(source.target)
        if isinstance(module, _AmaxObserver):
            observers.append(module)
        elif not _is_clip(source):
            break
        source = source.args[0] if source.args else None
    return observers, source


def _output_layers(prepared: torch.fx.GraphModule, names: Iterable[str]) -> list[str]:
    """The quantized layers whose output reaches the model's output without passing another quantized layer."""
    names = set(names)
    found = []
    for node in prepared.graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        frontier, seen, reaches = list(node.users), set(), False
        while frontier and not reaches:
            user = frontier.pop()
            if user in seen or (user.op == "call_module" and user.target in names):
                continue
            seen.add(user)
            reaches = user.op == "output"
            frontier.extend(user.users)
        if reaches and node.target not in found:
            found.append(node.target)
    return found


def _pack_output_layers(converted: nn.Module, scales: dict[str, dict[str, Any]]) -> None:
    """Store each output layer's weight as int8 codes with our per-channel scale (a layer that computes in float
    what its fake-quantized layer computes)."""
    for name, s in scales.items():
        holder, child = name.rpartition(".")[::2] if "." in name else ("", name)
        parent = converted.get_submodule(holder) if holder else converted
        layer = getattr(parent, child)
        if isinstance(layer, _FusedModule):  # e.g. ConvReLU2d left float: pack its first module (BatchNorm folded)
            parent, child, layer = layer, "0", layer[0]
        ratio = absmax(layer.weight, 0).float().cpu() / s["w_ref"].clamp_min(1e-30)  # |BatchNorm factor| if folded
        amax = s["w_amax"] * torch.where(s["w_ref"] > 0, ratio, torch.ones_like(ratio))
        setattr(parent, child, int8_weight_layer(layer, amax, s["w_qmax"]))


def _set_input_observers(prepared: torch.fx.GraphModule, scales: dict[str, dict[str, Any]]) -> int:
    """Give the observers in front of each quantized layer (and of its clip) our scale; return the largest
    ``uint8`` code any of them lets an input take.

    A signed scale on a ReLU output is written with ``zero_point`` 0 and the same step (``amax / qmax``): the
    integers are those of the fake-quantized model, and torch.ao, which lowers ``op -> ReLU -> quantize`` to ``op ->
    quantize`` on the assumption that the output range starts at 0, then keeps the ReLU's effect. (With a middle
    zero point the negative values would pass.)
    """
    touched: dict[int, _AmaxObserver] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or node.target not in scales:
            continue
        s = scales[node.target]
        observers, source = _input_observers(node, prepared)
        relu = _after_relu(source, prepared)
        for observer in observers:
            if id(observer) in touched and observer.amax is not None and s["amax"] == observer.amax:
                continue  # the clip's input and output share this observer
            if observer.amax is None:
                observer.amax, observer.unsigned, observer.qmax = s["amax"], s["unsigned"], s["qmax"]
            else:  # one tensor feeding several quantized layers: the widest range, signed unless all unsigned
                observer.amax = max(observer.amax, s["amax"])
                if observer.unsigned != s["unsigned"]:
                    observer.unsigned, observer.qmax = False, min(observer.qmax, s["qmax"], 127)
            if relu:
                observer.unsigned = True  # same step (qmax kept), zero_point 0
            touched[id(observer)] = observer
    return max((observer.max_code for observer in touched.values()), default=0)


def export_int8(model: nn.Module, example_inputs: Any, *, engine: str = "auto", min_agreement: float | None = 0.99,
                check_inputs: Any = None) -> Int8Model:
    """A real int8 CPU model that uses the calibrated or learned scales of ``model``'s quantizers, checked against it.

    ``model`` is a model with quantizers attached (by ``QuantizationAwareTraining`` or ``quantize_model(...,
    "static")``); it is not modified. A float copy is traced with ``torch.ao``'s FX graph mode, BatchNorm is
    folded into the preceding convolution or linear layer (its weight scales follow, so the integer weights are
    those of the fake-quantized model), every quantized layer's input is clipped at its ``amax`` and quantized with
    our scale, and its weight per channel with our weight ``amax`` (``qint8``; weights are first clamped to it).

    Intermediate tensors that have no quantizer of ours (the output of a residual addition, a pooling, the
    final logits) are observed with a min/max affine observer on ``example_inputs``: pass a representative batch.
    When one tensor feeds several quantized layers (a block input feeding a convolution and a shortcut), it is
    quantized once with the largest of their input ``amax`` values. Layers without quantizers stay float.

    The engine: ``"auto"`` picks the fastest one that computes these activations exactly on this CPU (``x86``
    when every activation code stays within 127 or the CPU has VNNI, else ``qnnpack``; see
    :mod:`~lightning_compress.quantization.engines`); a named engine that would saturate here is refused. The
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
        check_inputs: more inputs (a tensor, a tuple, or an iterable of batches) to check on, e.g. held-out data.

    Returns:
        An :class:`Int8Model` running int8 kernels on CPU; its ``verification`` holds the agreement, the largest
        absolute output difference and the engine.

    Raises:
        ValueError: if ``model`` has no quantized layer, or one with a dynamic / uncalibrated input or > 8 bits; an
            unknown engine or one that cannot compute the model exactly on this host.
        Int8MismatchError: (a ``ValueError``) if the agreement is below ``min_agreement``.
    """
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement={min_agreement!r} must be in [0, 1] or None")
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    float_model = copy.deepcopy(model).cpu().eval()
    scales = _layer_scales(float_model)
    remove_quantizers(float_model)
    float_model = _insert_clips(float_model, scales)
    args = tuple(a.detach().cpu() if isinstance(a, Tensor) else a for a in _as_args(example_inputs))
    mapping = _qconfig_mapping(float_model, scales)
    with deterministic_off(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(shared|TypedStorage|quantize_fx|quantized tensor creation)")
        prepared = prepare_fx(copy.deepcopy(float_model), mapping, example_inputs=args)
        outputs = _output_layers(prepared, scales)
        if outputs:  # computed in float on quantized inputs and weights: logits are not requantized
            for name in outputs:
                mapping.set_module_name(name, None)
            prepared = prepare_fx(float_model, mapping, example_inputs=args)
        prepared(*args)
        max_code = _set_input_observers(prepared, scales)
        chosen = choose_engine(max_code, engine)
        with quantized_engine(chosen):
            converted = _views_as_reshapes(convert_fx(prepared))
            _pack_output_layers(converted, {name: scales[name] for name in outputs})
            if chosen == "qnnpack":
                _contiguous_before_clips(converted)
            _check_runs(converted, args)
    int8 = Int8Model(converted, chosen).eval()
    int8.verification = {"engine": chosen, "max_activation_code": max_code, **host_summary(),
                         **check_agreement(model, int8, args, check_inputs, min_agreement)}
    return int8


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


def _contiguous_before_clips(converted: torch.fx.GraphModule) -> None:
    """``x.contiguous()`` in front of every clip: qnnpack's quantized ``hardtanh`` / ``clamp`` read a channels-last
    input (what quantized convolutions return) as if it were contiguous and scramble it (torch 2.13)."""
    for node in list(converted.graph.nodes):
        if _is_clip(node) and node.args:
            with converted.graph.inserting_before(node):
                contiguous = converted.graph.call_method("contiguous", (node.args[0],))
            node.args = (contiguous, *node.args[1:])
    converted.recompile()


def _check_runs(converted: nn.Module, args: tuple[Any, ...]) -> None:
    """Run the int8 model once on the example batch, so a model that cannot run fails here, not at its first use."""
    try:
        converted(*args)
    except Exception as error:
        raise RuntimeError(
            f"the int8 model converted by torch.ao fails on the example inputs ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); the float and fake-quantized models are unchanged"
        ) from error
