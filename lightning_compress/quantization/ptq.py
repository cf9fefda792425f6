"""Quantizing a model outside Lightning: choose layers, attach quantizers, calibrate on data, and measure.

``quantize_model`` is the post-training entry point usable on any network (to quantize a teacher, say); the
callbacks in :mod:`~lightning_compress.quantization.qat_callback` decide when these steps run inside a Trainer.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.graph.layers import check_layer_pattern, select_layers
from lightning_compress.quantization import residual, residual_points
from lightning_compress.quantization.calibrators import (
    HistogramCalibrator,
    MaxCalibrator,
    validate_method,
    validate_percentile,
)
from lightning_compress.quantization.functional import validate_num_bits
from lightning_compress.quantization.quantizers import QuantSpec, absmax, attach_quantizer, check_quantizable
from lightning_compress.quantization.spec import validate_flag, validate_options, validate_reduce_range
from lightning_compress.quantization.uncalled import release_uncalled
from lightning_compress.utils.data import batch_labels
from lightning_compress.utils.modes import eval_mode
from lightning_compress.utils.outputs import model_inputs, model_logits, move_inputs, run_model

__all__ = ["CALIBRATIONS", "PTQ_MODES", "classification_accuracy", "quantize_model", "resolve_specs"]

CALIBRATIONS = ("global", "max", "percentile", "mse", "entropy", "kl")
PTQ_MODES = ("weight_only", "static", "dynamic")
_TYPES = ("Conv1d", "Conv2d", "Linear")


# ------------------------------------------------------------------------------------------ configuration


@dataclass
class _Calibration:
    """Validated calibration settings shared by QAT, PTQ and :func:`quantize_model`.

    ``start_bin`` past the histogram's last bin is clamped to it when the amax is computed.
    """

    method: str = "max"
    amax: float | dict[str, float] | None = None
    percentile: float = 99.99
    num_bins: int = 2048
    start_bin: int = 128

    def __post_init__(self) -> None:
        if self.method not in CALIBRATIONS:
            raise ValueError(f"Unknown calibration {self.method!r}; allowed: {', '.join(map(repr, CALIBRATIONS))}")
        if self.method != "global":
            validate_method(self.method)
        validate_percentile(self.percentile)
        _check_int("num_bins", self.num_bins, 2)
        _check_int("start_bin", self.start_bin, 0)
        self._check_amax()

    def _check_amax(self) -> None:
        if self.amax is None:
            if self.method == "global":
                raise ValueError("calibration='global' needs amax=<float> or amax={pattern: float}")
            return
        if not isinstance(self.amax, Mapping):
            _check_amax_value(self.amax)
            return
        if not self.amax:
            raise ValueError("global amax={} is empty; give one number or {pattern: number} covering every layer")
        for pattern, value in self.amax.items():
            check_layer_pattern(pattern, "global amax pattern")
            _check_amax_value(value, pattern)

    def calibrator(self, name: str, unsigned: bool) -> MaxCalibrator | HistogramCalibrator | None:
        if self.method == "global":
            return None
        if self.method == "max":
            return MaxCalibrator(unsigned=unsigned, name=name)
        return HistogramCalibrator(self.num_bins, unsigned=unsigned, name=name)

    def _pattern_amax(self, name: str) -> float | None:
        for pattern, value in self.amax.items():  # type: ignore[union-attr]
            if name == pattern or re.fullmatch(pattern, name):
                return float(value)
        return None

    def check_covers(self, names: Iterable[str]) -> None:
        """With a ``{pattern: amax}`` global amax, raise a ``ValueError`` naming every layer no pattern matches."""
        if self.method != "global" or not isinstance(self.amax, Mapping):
            return
        missing = [name for name in names if self._pattern_amax(name) is None]
        if missing:
            raise ValueError(f"calibration='global': no amax pattern in {list(self.amax)} matches layers {missing}; "
                             "add patterns for them or give one number")

    def global_amax(self, name: str) -> float:
        if not isinstance(self.amax, Mapping):
            return float(self.amax)  # type: ignore[arg-type]
        self.check_covers([name])
        return self._pattern_amax(name)  # type: ignore[return-value]

    def compute(self, name: str, calibrator: Any, num_bits: int) -> Tensor:
        if calibrator is None:
            return torch.tensor(self.global_amax(name))
        if isinstance(calibrator, MaxCalibrator):
            return calibrator.compute_amax().reshape(())
        if calibrator.counts.numel() == 0:
            raise RuntimeError(f"layer {name!r} received no calibration data")
        start = min(self.start_bin, calibrator.counts.numel() - 1)
        return calibrator.compute_amax(self.method, num_bits=num_bits, start_bin=start, percentile=self.percentile)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _check_amax_value(value: Any, pattern: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        where = "" if pattern is None else f" (pattern {pattern!r})"
        raise ValueError(f"global amax {value!r}{where} must be a finite positive number")


def _validate_calibration_batches(value: int | None) -> None:
    """``None`` (every batch) or a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"calibration_batches={value!r} must be a positive integer or None (every batch)")


def _validate_bit_widths(num_bits: int, bit_widths: Mapping[str, int] | None, reduce_range: bool = False) -> None:
    validate_num_bits(num_bits)
    validate_flag("reduce_range", reduce_range)
    if reduce_range:
        validate_reduce_range(num_bits)
    for pattern, bits in (bit_widths or {}).items():
        try:
            validate_num_bits(bits)
            if reduce_range:
                validate_reduce_range(bits)
        except ValueError as err:
            raise ValueError(f"bit_widths[{pattern!r}]: {err}") from None


def resolve_specs(
    target: nn.Module,
    *,
    layers: str | list[str] | None,
    exclude: str | list[str] | None,
    num_bits: int,
    bit_widths: Mapping[str, int] | None,
    per_channel: bool,
    unsigned: bool | str,
    learn: str,
    skip_first_and_last: bool = False,
    reduce_range: bool = False,
) -> dict[str, QuantSpec]:
    """The layers of ``target`` to quantize and how (``bit_widths`` patterns override ``num_bits``).

    ``skip_first_and_last`` leaves the first and the last chosen layer (definition order) in float.

    Raises:
        ValueError: a pattern (in ``layers`` or ``bit_widths``) matching no Conv1d/Conv2d/Linear, a selected layer
            of another type (a subclass), a flag that is not a bool, or nothing left to quantize (also when
            ``skip_first_and_last`` would skip the only one or two chosen layers).
    """
    validate_flag("skip_first_and_last", skip_first_and_last)
    chosen = select_layers(target, layers, types=_TYPES, exclude=exclude)
    if skip_first_and_last:
        chosen = _skip_first_and_last(chosen)
    if not chosen:
        raise ValueError(f"nothing to quantize in {type(target).__name__}: layers={layers!r}, exclude={exclude!r}")
    check_quantizable(chosen)
    bits = dict.fromkeys(chosen, num_bits)
    for pattern, width in (bit_widths or {}).items():
        for name in select_layers(target, pattern, types=_TYPES):
            if name in bits:
                bits[name] = width
    return {name: QuantSpec(bits[name], per_channel, unsigned, learn, reduce_range) for name in chosen}


def _skip_first_and_last(chosen: dict[str, nn.Module]) -> dict[str, nn.Module]:
    names = list(chosen)  # definition (named_modules) order
    if 0 < len(names) <= 2:
        raise ValueError(f"skip_first_and_last=True would skip every chosen layer {names}, leaving nothing to "
                         "quantize; use skip_first_and_last=False or choose more layers")
    return {name: chosen[name] for name in names[1:-1]}


def attach_all(target: nn.Module, specs: Mapping[str, QuantSpec]) -> dict[str, Any]:
    modules = dict(target.named_modules())
    return {name: attach_quantizer(modules[name], spec) for name, spec in specs.items()}


def _set_weight_amax(layers: Mapping[str, Any]) -> None:
    """Fix every weight ``amax`` at the current per-channel ``max |w|`` (LSQ: at the learned step)."""
    for layer in layers.values():
        wq = layer.weight_quantizer
        if wq.learn == "lsq":
            wq.sync_amax()
        else:
            wq.amax.copy_(absmax(layer.weight, wq.axis).reshape(wq.amax.shape))


def _calibration_pass(model: nn.Module, data: Any, max_batches: int | None, device: torch.device) -> int:
    seen = 0
    batches = [data] if isinstance(data, (Tensor, Mapping)) else data
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            run_model(model, move_inputs(model_inputs(batch), device))
            seen += 1
    return seen


def _start_calibration(layers: Mapping[str, Any], settings: _Calibration) -> dict[str, Any]:
    calibrators = {}
    for name, layer in layers.items():
        inq = layer.input_quantizer
        calibrators[name] = settings.calibrator(name, inq.unsigned)
        inq.calibrator, inq.min_seen = calibrators[name], float("inf")
    return calibrators


def _finish_calibration(layers: Mapping[str, Any], calibrators: Mapping[str, Any], settings: _Calibration,
                        strategy: Any = None) -> None:
    """Reduce the statistics across ranks (if ``strategy``), set every input ``amax``, initialise LSQ / PACT."""
    for name, layer in layers.items():
        calibrator, inq = calibrators.get(name), layer.input_quantizer
        if strategy is not None and calibrator is not None:
            _reduce_calibrator(calibrator, strategy)
        _choose_sign(inq, calibrator, strategy)
        inq.amax.copy_(settings.compute(name, calibrator, inq.num_bits).to(inq.amax))
        inq.calibrating, inq.calibrator, inq.range_reducer = False, None, None
        inq.init_learned()
        layer.weight_quantizer.init_learned(layer.weight if layer.weight_quantizer.learn == "lsq" else None)


def _choose_sign(quantizer: Any, calibrator: Any, strategy: Any = None) -> None:
    """A ``sign_from_data`` input whose calibration data (on every rank) were all non-negative becomes unsigned."""
    if not quantizer.sign_from_data or quantizer.unsigned:
        return
    low = quantizer.min_seen
    if strategy is not None:
        device = getattr(strategy, "root_device", torch.device("cpu"))
        low = float(strategy.reduce(torch.tensor(low, dtype=torch.float64, device=device), reduce_op="min"))
    if 0 <= low < math.inf:
        quantizer.unsigned = True
        if calibrator is not None:
            calibrator.unsigned = True


def _reduce_calibrator(calibrator: Any, strategy: Any) -> None:
    """All-reduce one calibrator's statistics so every rank computes the amax of the global batches."""
    device = getattr(strategy, "root_device", torch.device("cpu"))  # NCCL reduces CUDA tensors only
    if isinstance(calibrator, MaxCalibrator):
        if calibrator.amax is not None:
            calibrator.amax = strategy.reduce(calibrator.amax.to(device), reduce_op="max").cpu()
        return
    # bins grew alike on every rank (range all-reduced per batch), so the counts add up bin by bin
    calibrator.counts = strategy.reduce(calibrator.counts.to(device), reduce_op="sum").cpu().to(torch.int64)
    top = torch.tensor(calibrator.max, dtype=torch.float64, device=device)
    calibrator.max = float(strategy.reduce(top, reduce_op="max"))


def _set_modes(layers: Mapping[str, Any], phase: str, learn: str) -> None:
    for layer in layers.values():
        inq, wq = layer.input_quantizer, layer.weight_quantizer
        inq.dynamic = wq.dynamic = False
        inq.calibrating = False
        inq.enabled = wq.enabled = phase != "calibrating"
        wq.observe = phase == "training" and wq.learn != "lsq"


# ------------------------------------------------------------------------------------------------- QAT


def quantize_model(
    model: nn.Module,
    mode: str = "static",
    calibration_data: Tensor | Iterable[Any] | None = None,
    *,
    num_bits: int = 8,
    calibration: str = "max",
    amax: float | dict[str, float] | None = None,
    layers: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    bit_widths: dict[str, int] | None = None,
    per_channel: bool = True,
    unsigned: bool | str = False,
    calibration_batches: int | None = None,
    percentile: float = 99.99,
    num_bins: int = 2048,
    start_bin: int = 128,
    inplace: bool = False,
    reduce_range: bool = False,
    residual_quantizers: bool = False,
) -> nn.Module:
    """Post-training quantization of a model: a fake-quantized copy in eval mode (e.g. to quantize a teacher).

    Weights are quantized per output channel (``amax = max |w|``, fixed). Calibration runs the float model
    (every quantizer off), as NVIDIA's pytorch-quantization does. ``mode``: ``"weight_only"`` (inputs
    stay float), ``"static"`` (input ``amax`` calibrated on ``calibration_data`` with ``calibration``, or given
    with ``"global"``), ``"dynamic"`` (input ``amax = max |x|`` of each batch at run time). A static result can be
    exported with :func:`lightning_compress.quantization.export_int8`.

    Args:
        model: the float model (left unchanged unless ``inplace``).
        mode: ``"weight_only"``, ``"static"`` or ``"dynamic"``.
        calibration_data: a tensor or an iterable of batches (a DataLoader), for ``"static"``.
        num_bits: 2 to 16.
        calibration: ``"max"``, ``"percentile"``, ``"mse"``, ``"entropy"``, ``"kl"`` or ``"global"``.
        amax: the global threshold (number or ``{pattern: number}``) for ``"global"``.
        layers: names or regexes of the layers to quantize; default every Conv1d / Conv2d / Linear.
        exclude: names or regexes to leave float.
        bit_widths: ``{pattern: bits}`` overriding ``num_bits``.
        per_channel: per-output-channel weight ``amax``.
        unsigned: non-negative inputs; ``"auto"``: unsigned where the calibration data were non-negative.
        calibration_batches: at most this many batches of ``calibration_data`` (a positive integer; ``None``: all).
        percentile: for ``"percentile"``, in ``(0, 100]``.
        num_bins: histogram bins (>= 2).
        start_bin: first candidate bin of the mse / entropy searches (>= 0; clamped to the last bin).
        inplace: quantize ``model`` itself instead of a deep copy.
        reduce_range: inputs one bit narrower, for an int8 export that runs exactly under the ``x86`` kernels on
            any x86 CPU (see :class:`~lightning_compress.quantization.quantizers.QuantSpec`).
        residual_quantizers: also quantize, as the int8 export stores them, the outputs of layers that feed additions
            and the residual stream (:mod:`~lightning_compress.quantization.residual`; static mode on data only).

    Raises:
        ValueError: bad settings (as :class:`QuantizationAwareTraining`; also a global amax that is not finite,
            or a ``{pattern: amax}`` that misses a layer), a static mode without data, NaN / Inf in calibration
            data (naming the layer). Settings and layer patterns are checked before the model is changed.

    >>> qm = quantize_model(nn.Sequential(nn.Linear(4, 2)), "static", torch.randn(8, 4))
    >>> type(qm[0]).__name__, qm[0].input_quantizer.amax.item() > 0
    ('QuantLinear', True)
    """
    if mode not in PTQ_MODES:
        raise ValueError(f"Unknown mode {mode!r}; allowed: {', '.join(map(repr, PTQ_MODES))}")
    _validate_bit_widths(num_bits, bit_widths, reduce_range)
    settings = _Calibration(calibration, amax, percentile, num_bins, start_bin)
    _validate_calibration_batches(calibration_batches)
    validate_options(unsigned, per_channel=per_channel, inplace=inplace)
    with_residual = residual.check_residual_options(residual_quantizers, mode, settings.method)
    if mode == "static" and calibration_data is None and calibration != "global":
        raise ValueError("mode='static' needs calibration_data (or calibration='global' with amax)")
    qmodel = model if inplace else copy.deepcopy(model)
    specs = resolve_specs(qmodel, layers=layers, exclude=exclude, num_bits=num_bits, bit_widths=bit_widths,
                          per_channel=per_channel, unsigned=unsigned, learn="none", reduce_range=reduce_range)
    settings.check_covers(specs)  # before anything is attached (inplace leaves the model untouched)
    quantized = attach_all(qmodel, specs)
    points = residual_points.set_residual_quantizers(qmodel, with_residual)  # calibrated in the float pass
    _set_modes(quantized, "frozen", "none")
    with torch.no_grad():
        _set_weight_amax(quantized)
    for layer in quantized.values():
        layer.input_quantizer.enabled = mode != "weight_only"
        layer.input_quantizer.dynamic = mode == "dynamic"
    if mode == "static":
        calibrators = _start_calibration(quantized, settings)
        if calibration_data is not None and settings.method != "global":
            for layer in quantized.values():  # calibrate the float model (NVIDIA / TensorRT flow)
                layer.input_quantizer.calibrating, layer.weight_quantizer.enabled = True, False
            device = next(iter(quantized.values())).weight.device
            try:
                _calibration_pass(qmodel, calibration_data, calibration_batches, device)
            finally:
                for layer in quantized.values():
                    layer.input_quantizer.calibrating, layer.weight_quantizer.enabled = False, True
            release_uncalled(quantized, "quantize_model")  # read through their weights: float, with the reason
        with torch.no_grad():
            _finish_calibration(quantized, calibrators, settings)
            residual.finish_residual_quantizers(points, quantized)
    return qmodel.eval()


def classification_accuracy(model: nn.Module, loader: Iterable[Any], device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on batches with labels (``(inputs, targets, ...)`` or a dictionary, see
    :func:`~lightning_compress.utils.data.batch_labels`), in eval mode without gradients; batches without labels
    are skipped."""
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            targets = batch_labels(batch)
            if targets is None:
                continue
            inputs, targets = move_inputs(model_inputs(batch), device), targets.to(device)
            correct += int((model_logits(model, inputs).argmax(dim=1) == targets).sum())
            total += int(targets.numel())
    return correct / max(total, 1)

