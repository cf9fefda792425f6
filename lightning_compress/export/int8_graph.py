"""The torch.ao FX side of the int8 export: observers that return our scales, input clips, output layers kept in
float, and the graph rewrites the converted model needs. Used by :func:`lightning_compress.export.int8.export_int8`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.nn.intrinsic import _FusedModule
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping

from lightning_compress.export.int8_rewrites import shared_grid_calls
from lightning_compress.export.int8_weight import int8_weight_layer
from lightning_compress.quantization.fx_ops import DROPOUT_MODULES
from lightning_compress.quantization.quantizers import absmax
from lightning_compress.quantization.residual import quantizer_module
from lightning_compress.quantization.residual_points import ModuleOutputTracer

_CLIP_PREFIX = "_input_clip_"  # root-level Hardtanh modules, one per quantized layer, called right before it
_POINT_PREFIX = "_residual_point_"  # root-level Identity modules marking the output of a residual quantizer's module


class ResidualPointError(ValueError):
    """A residual quantizer of the model has no place in the traced int8 graph."""


class _AmaxObserver(MinMaxObserver):
    """Activation observer: our input quantizer's symmetric scale when ``amax`` is set, else min/max affine."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.update(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
        super().__init__(**kwargs)
        self.amax: float | None = None
        self.unsigned, self.qmax = False, 127
        self.fixed: tuple[float, int] | None = None  # (scale, zero point) of a residual quantizer: used as they are

    @property
    def max_code(self) -> int:
        """The largest ``uint8`` code this observer's scale lets a clipped input take."""
        return self.qmax if self.unsigned else 2 * self.qmax + 1

    @torch.jit.export
    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if self.fixed is not None:
            return torch.tensor([self.fixed[0]]), torch.tensor([self.fixed[1]], dtype=torch.int32)
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


def _is_clip(node: Any) -> bool:
    return getattr(node, "op", None) == "call_module" and str(node.target).startswith(_CLIP_PREFIX)


def insert_clips(model: nn.Module, scales: dict[str, dict[str, Any]],
                 points: dict[str, tuple[float, int]] | None = None) -> torch.fx.GraphModule:
    """Trace ``model`` (torch.fx) and call a ``Hardtanh`` clip at ``amax`` right before every quantized layer (but
    those with unsigned 8-bit inputs, which quantization itself clamps alike), and
    an ``nn.Identity`` marker after the output of every module in ``points`` (:func:`insert_point_markers`).

    The clips are new root modules (``_input_clip_<i>``); the user's modules keep their names and types (a forward
    that checks ``isinstance`` of its own layers traces as written).
    """
    if "" in scales:  # the model is itself the quantized layer: give it a root to be called from
        model = nn.Sequential(model)
        scales["0"] = scales.pop("")
    tracer = ModuleOutputTracer()
    graph = tracer.trace(model)
    traced = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    insert_point_markers(traced, tracer, points or {})
    shared_grid_calls(traced)
    clips = {}
    for index, (name, s) in enumerate(scales.items()):
        if s["unsigned"] and s["qmax"] == 255:
            continue  # quint8 with zero point 0 clamps to [0, 255 * scale] itself: the clip would change nothing
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


def insert_point_markers(traced: torch.fx.GraphModule, tracer: ModuleOutputTracer,
                         points: dict[str, tuple[float, int]]) -> None:
    """Call a root ``nn.Identity`` (``_residual_point_<i>``, ``points`` order) on the output of each module named
    in ``points`` (on its first input for a ``"<module>:input"`` key), read by every former reader of that value;
    past a ReLU that is its only reader when the zero point is 0 (the quantizer then applies that ReLU itself), so
    torch.ao still fuses the ReLU.

    Raises:
        ResidualPointError: a module of ``points`` that is not called exactly once in the traced forward.
    """
    for index, (key, (_, zero_point)) in enumerate(points.items()):
        name, on_input = quantizer_module(key)
        called: Any = tracer.module_node(name)
        if on_input:  # the module's first input
            called = called.args[0] if called is not None and called.op == "call_module" and called.args else None
        if not isinstance(called, torch.fx.Node):
            raise ResidualPointError(f"the residual quantizer of {key!r} quantizes a module that the traced forward "
                                     f"does not call exactly once ({tracer.calls[name]} calls); re-create them")
        node = called
        users = list(node.users)
        if zero_point == 0 and not on_input and len(users) == 1 and _is_relu(users[0], traced):
            node = users[0]
        marker = f"{_POINT_PREFIX}{index}"
        traced.add_submodule(marker, nn.Identity())
        with traced.graph.inserting_after(node):
            marked = traced.graph.call_module(marker, (node,))
        node.replace_all_uses_with(marked, delete_user_cb=marked.__ne__)
    traced.recompile()


def set_point_observers(prepared: torch.fx.GraphModule, points: dict[str, tuple[float, int]]) -> list[str]:
    """Give the observer in front of each marker of :func:`insert_point_markers` the ``(scale, zero_point)`` of its
    residual quantizer; returns the names of the points whose observer already had another input scale (a
    quantized layer reads the tensor at a different step: the int8 model then uses the residual quantizer's)."""
    qparams = {f"{_POINT_PREFIX}{index}": (name, value) for index, (name, value) in enumerate(points.items())}
    differing = []
    for node in prepared.graph.nodes:
        if node.op != "call_module" or node.target not in qparams:
            continue
        name, (scale, zero_point) = qparams[node.target]
        observers, _ = _input_observers(node, prepared)
        if not observers:
            raise ResidualPointError(f"torch.ao does not quantize the output of {name!r} (it has a residual quantizer)")
        for observer in observers:
            if observer.amax is not None:
                step = max(observer.amax, 1e-12) / observer.qmax
                zero = 0 if observer.unsigned else observer.qmax + 1
                if abs(step - scale) > 1e-6 * scale or zero != zero_point:
                    differing.append(name)
            observer.fixed = (scale, zero_point)
    return differing


def _is_relu(node: Any, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _RELUS)
    return node.op in ("call_function", "call_method") and node.target in _RELU_CALLS


def qconfig_mapping(model: nn.Module, scales: dict[str, dict[str, Any]]) -> QConfigMapping:
    default_weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    mapping = QConfigMapping().set_global(QConfig(activation=_AmaxObserver, weight=default_weight))
    for name, module in model.named_modules():
        if name and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name not in scales:
            mapping.set_module_name(name, None)  # layers the user left float stay float
    for call in _LAYER_CALLS:  # so do layers called through their weights, which quantize_model leaves float
        mapping.set_object_type(call, None)
    for name, s in scales.items():
        weight = _WeightAmaxObserver.with_args(amax=s["w_amax"], ref_absmax=s["w_ref"], qmax=s["w_qmax"])
        mapping.set_module_name(name, QConfig(activation=_AmaxObserver, weight=weight))
    return mapping


_LAYER_CALLS = (nn.functional.linear, nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)
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
    """The observers on the path into a quantized layer (through its clip and dropouts), and the node that produced
    the value.

    (FX shares one observer instance between a clip's input and output, which ``named_modules`` lists once: look
    every node's module up by its target.)
    """
    observers: list[_AmaxObserver] = []
    source: Any = node.args[0] if node.args else None
    while getattr(source, "op", None) == "call_module":
        module = root.get_submodule(source.target)
        if isinstance(module, _AmaxObserver):
            observers.append(module)
        elif not (_is_clip(source) or isinstance(module, DROPOUT_MODULES)):  # a dropout passes the codes of its input
            break
        source = source.args[0] if source.args else None
    return observers, source


def output_layers(prepared: torch.fx.GraphModule, names: Iterable[str]) -> list[str]:
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


def pack_output_layers(converted: nn.Module, scales: dict[str, dict[str, Any]]) -> None:
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


def set_input_observers(prepared: torch.fx.GraphModule, scales: dict[str, dict[str, Any]]) -> int:
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


def views_as_reshapes(converted: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``x.view(...)`` as ``x.reshape(...)``: quantized convolutions return channels-last strides, which ``view``
    rejects (``x.view(x.size(0), -1)`` into the classifier); ``reshape`` copies only where ``view`` would fail."""
    changed = False
    for node in converted.graph.nodes:
        if node.op == "call_method" and node.target == "view":
            node.target, changed = "reshape", True
    if changed:
        converted.recompile()
    return converted


def drop_point_markers(converted: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove the ``nn.Identity`` markers of :func:`insert_point_markers` once converted (their observers are gone:
    each was one more module call per residual point at inference)."""
    markers = [n for n in converted.graph.nodes if n.op == "call_module" and str(n.target).startswith(_POINT_PREFIX)]
    for node in markers:
        node.replace_all_uses_with(node.args[0])
        converted.graph.erase_node(node)
        converted.delete_submodule(str(node.target))
    if markers:
        converted.recompile()
    return converted


def clips_as_calls(converted: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Each clip module as a direct call of ``aten::hardtanh`` (its quantized kernel): the same integer clamp
    without a module call's Python layers, which cost several percent of a small model's batch-1 latency."""
    clips = [n for n in converted.graph.nodes if _is_clip(n)]
    for node in clips:
        clip = converted.get_submodule(str(node.target))
        assert isinstance(clip, nn.Hardtanh)
        with converted.graph.inserting_before(node):
            call = converted.graph.call_function(torch.ops.aten.hardtanh,
                                                 (node.args[0], clip.min_val, clip.max_val))
        node.replace_all_uses_with(call)
        converted.graph.erase_node(node)
        converted.delete_submodule(str(node.target))
    if clips:
        converted.recompile()
    return converted


def contiguous_before_clips(converted: torch.fx.GraphModule) -> None:
    """``x.contiguous()`` in front of every clip: qnnpack's quantized ``hardtanh`` / ``clamp`` read a channels-last
    input (what quantized convolutions return) as if it were contiguous and scramble it (torch 2.13)."""
    for node in list(converted.graph.nodes):
        if _is_clip(node) and node.args:
            with converted.graph.inserting_before(node):
                contiguous = converted.graph.call_method("contiguous", (node.args[0],))
            node.args = (contiguous, *node.args[1:])
    converted.recompile()


def explicit_padding(model: nn.Module) -> list[str]:
    """Give every convolution with ``padding="valid"`` / ``"same"`` (Hugging Face's EfficientNet, MobileNetV2) the
    equal integer padding it stands for, in place: torch.ao's quantized convolutions take integers only. A
    ``"same"`` that needs unequal padding (an even effective kernel) is left and named in the returned list."""
    uneven = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd) or not isinstance(module.padding, str):
            continue
        if module.padding == "valid":
            module.padding = (0,) * len(module.kernel_size)
            continue
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            uneven.append(name)
            continue
        module.padding = tuple(t // 2 for t in total)
        module._reversed_padding_repeated_twice = [p for t in reversed(total) for p in (t // 2, t // 2)]
    return uneven
