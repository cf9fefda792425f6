"""What a model costs: parameters, bytes, multiply-adds, latency. Pure functions, no Lightning.

Every compression family feeds these: a masked model reports dense and non-zero multiply-adds, a compacted model
fewer of both, an exported int8 model fewer bytes.
"""

from __future__ import annotations

import io
import numbers
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.utils.modes import eval_mode
from lightning_compress.utils.outputs import first_tensor_of, map_inputs, run_model

#: The keys of a measurement whose ratio "baseline / this" says how many times smaller or faster a model is.
RATIO_KEYS = ("parameters", "nonzero_parameters", "size_bytes", "macs", "nonzero_macs", "latency_ms")


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once).

    >>> count_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    """Number of non-zero parameter elements.

    >>> layer = nn.Linear(3, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.zero_()
    >>> count_nonzero_parameters(layer)
    2
    """
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def state_size_bytes(model: nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict())``, the file a user would ship."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _as_args(example_inputs: Any) -> Any:
    """Inputs for :func:`~lightning_compress.utils.outputs.run_model`: a tuple of positional inputs, or a dictionary
    of keyword inputs (a Hugging Face batch without its labels)."""
    return example_inputs if isinstance(example_inputs, (tuple, dict)) else (example_inputs,)


def _first_sample(example_inputs: Any) -> Any:
    return map_inputs(_as_args(example_inputs), lambda x: x[:1])


def check_integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` when it is an integer (not a bool) of at least ``minimum``, else a ``ValueError``.

    >>> check_integer("runs", 3, 1)
    3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _weight_density(module: nn.Module) -> float | None:
    weight = getattr(module, "weight", None)
    decode = getattr(module, "dequantized_weight", None)  # weight-only packed layers (quantization.packed)
    if weight is None and callable(decode):
        weight = decode()
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        return None
    return float(torch.count_nonzero(weight.detach())) / weight.numel()


def _flop_module(model: nn.Module, modules: dict[str, nn.Module], key: str) -> nn.Module | None:
    """The module a ``FlopCounterMode`` key names: ``"Root.a.b"`` is ``a.b``, ``"Root"`` the model itself."""
    if "." in key:
        return modules.get(key.split(".", 1)[1])
    return model if key == type(model).__name__ else None


def count_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Multiply-adds of one forward pass for ONE sample, counted by ``torch.utils.flop_counter``.

    Returns:
        ``(dense_macs, nonzero_macs)``: the second scales each leaf layer's multiply-adds by the fraction of its
        weight that is non-zero, i.e. the work a sparse kernel would do on a masked (not compacted) model.

    >>> count_macs(nn.Linear(4, 3), torch.zeros(5, 4))
    (12, 12)
    """
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        run_model(model, _first_sample(example_inputs))
    dense = counter.get_total_flops() // 2
    modules = dict(model.named_modules())
    saved = 0.0
    for key, ops in counter.get_flop_counts().items():
        module = _flop_module(model, modules, key)
        density = _weight_density(module) if module is not None and not list(module.children()) else None
        if density is not None:
            saved += (1.0 - density) * sum(ops.values()) / 2
    return int(dense), round(dense - saved)


def _int8_density(module: Any) -> float:
    """Fraction of a ``torch.ao`` packed layer's int8 weight entries other than their zero point."""
    from lightning_compress.export.counting import _PER_CHANNEL

    weight = module.weight()
    codes = weight.int_repr().int()
    if weight.qscheme() in _PER_CHANNEL:
        zero = weight.q_per_channel_zero_points().view(-1, *([1] * (weight.dim() - 1)))
    else:
        zero = torch.tensor(weight.q_zero_point())
    return float(torch.count_nonzero(codes - zero)) / max(codes.numel(), 1)


def _packed_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(dense, nonzero)`` multiply-adds for ONE sample of the ``torch.ao`` packed (int8) layers alone, which
    ``torch.utils.flop_counter`` does not see; non-zero scales each by its share of non-zero int8 weights."""
    from lightning_compress.export.counting import _packed_layers
    from lightning_compress.export.counting import _packed_macs as layer_macs

    counted: list[tuple[int, float]] = []
    handles = [module.register_forward_hook(
        lambda mod, _inputs, out: counted.append((layer_macs(mod, out), _int8_density(mod))))
        for _, module in _packed_layers(model)]
    try:
        with eval_mode(model), torch.no_grad():
            run_model(model, _first_sample(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return sum(m for m, _ in counted), round(sum(m * d for m, d in counted))


def measure_latency(
    model: nn.Module, example_inputs: Any, *, runs: int = 20, warmup: int = 5, num_threads: int | None = 1
) -> dict[str, Any]:
    """Median CPU wall time of ``model(*example_inputs)`` in eval mode after ``warmup`` untimed runs.

    Args:
        model: the model (run where it is; pass CPU inputs for CPU latency).
        example_inputs: a tensor or a tuple of positional inputs; its first dimension is the batch size recorded.
        runs: timed repetitions.
        warmup: untimed repetitions first.
        num_threads: torch intra-op threads during the measurement (``None`` keeps the current setting).

    Returns:
        ``{"latency_ms", "batch_size", "num_threads", "runs", "warmup"}``.
    """
    runs, warmup = check_integer("runs", runs, 1), check_integer("warmup", warmup, 0)
    if num_threads is not None:
        num_threads = check_integer("num_threads", num_threads, 1)
    args = _as_args(example_inputs)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with eval_mode(model), torch.inference_mode():
            for _ in range(warmup):
                run_model(model, args)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                run_model(model, args)
                times.append(time.perf_counter() - start)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    first = first_tensor_of(args)
    return {
        "latency_ms": statistics.median(times) * 1e3,
        "batch_size": int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1,
        "num_threads": threads,
        "runs": runs,
        "warmup": warmup,
    }


def compute_ratios(report: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """``baseline / report`` for every size, compute and latency key (above 1 means smaller or faster), and
    ``accuracy_delta`` = accuracy - baseline accuracy when both are known.

    >>> compute_ratios({"parameters": 50, "accuracy": 0.9}, {"parameters": 100, "accuracy": 0.95})
    {'parameters': 2.0, 'accuracy_delta': -0.05}
    """
    ratios: dict[str, float] = {}
    for key in RATIO_KEYS:
        new, old = report.get(key), baseline.get(key)
        if new and old is not None:
            ratios[key] = float(old) / float(new)
    if report.get("accuracy") is not None and baseline.get("accuracy") is not None:
        ratios["accuracy_delta"] = round(float(report["accuracy"]) - float(baseline["accuracy"]), 10)
    return ratios


#: The numbers of a reference shown next to this model's in the references section and table.
REFERENCE_KEYS = ("accuracy", "parameters", "size_bytes", "macs", "latency_ms")


def compare_with_references(report: dict[str, Any], references: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """For each named reference report: its key numbers (:data:`REFERENCE_KEYS`, plus its latency settings) and
    ``ratios`` reference / ``report`` (:func:`compute_ratios`), with the accuracy difference also in points
    (``accuracy_delta_points`` = 100 x (accuracy - reference accuracy), for accuracies in [0, 1]).

    >>> compare_with_references({"parameters": 50, "accuracy": 0.91},
    ...                         {"teacher": {"parameters": 200, "accuracy": 0.95, "macs": 7}})["teacher"]["ratios"]
    {'parameters': 4.0, 'accuracy_delta': -0.04, 'accuracy_delta_points': -4.0}
    """
    compared: dict[str, Any] = {}
    for name, reference in references.items():
        entry: dict[str, Any] = {key: reference.get(key) for key in REFERENCE_KEYS}
        if isinstance(reference.get("latency"), dict):
            entry["latency"] = dict(reference["latency"])
        ratios = compute_ratios(report, reference)
        if "accuracy_delta" in ratios:
            ratios["accuracy_delta_points"] = round(100.0 * ratios["accuracy_delta"], 8)
        entry["ratios"] = ratios
        compared[name] = entry
    return compared


def measure_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    accuracy: float | None = None,
    baseline: nn.Module | dict[str, Any] | None = None,
    baseline_accuracy: float | None = None,
    latency_runs: int = 20,
    warmup: int = 5,
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """Measure ``model`` on ``example_inputs`` and, given a baseline model or report, add ``ratios``.

    Args:
        model: the model to measure.
        example_inputs: a batch (tensor or tuple); latency uses the whole batch, multiply-adds one sample.
        accuracy: the model's accuracy, if known.
        baseline: a model measured the same way, or an earlier report dictionary.
        baseline_accuracy: the baseline model's accuracy (a report dictionary carries its own).
        latency_runs: timed repetitions.
        warmup: untimed repetitions first.
        num_threads: torch threads during the latency measurement.

    Returns:
        The report dictionary (schema in the README): ``parameters``, ``nonzero_parameters``, ``size_bytes``,
        ``macs``, ``nonzero_macs``, ``latency_ms``, ``latency`` (batch size, threads, runs), ``accuracy`` and, with a
        baseline, ``baseline`` and ``ratios``.
    """
    from lightning_compress.export.int8 import quantized_counts

    latency = measure_latency(model, example_inputs, runs=latency_runs, warmup=warmup, num_threads=num_threads)
    macs, nonzero_macs = count_macs(model, example_inputs)
    parameters, nonzero = count_parameters(model), count_nonzero_parameters(model)
    if quantized_counts(model)["quantized_parameters"]:
        packed = quantized_counts(model, example_inputs)
        # torch.ao's quantized modules hide packed weights from parameters() and from flop_counter.
        packed_dense, packed_nonzero = _packed_macs(model, example_inputs)
        saved = (macs - nonzero_macs) + (packed_dense - packed_nonzero)  # zeros of the float and the int8 layers
        parameters, nonzero, macs = packed["parameters"], packed["nonzero_parameters"], packed["macs"]
        nonzero_macs = macs - saved
    report: dict[str, Any] = {
        "model": type(model).__name__,
        "parameters": parameters,
        "nonzero_parameters": nonzero,
        "size_bytes": state_size_bytes(model),
        "macs": macs,
        "nonzero_macs": nonzero_macs,
        "latency_ms": latency["latency_ms"],
        "latency": latency,
        "accuracy": accuracy,
    }
    if isinstance(baseline, nn.Module):
        baseline = measure_model(baseline, example_inputs, accuracy=baseline_accuracy, latency_runs=latency_runs,
                                 warmup=warmup, num_threads=num_threads)
    if baseline is not None:
        baseline = {k: v for k, v in baseline.items() if k not in ("baseline", "ratios")}
        report["baseline"] = baseline
        report["ratios"] = compute_ratios(report, baseline)
    return report


def _format_value(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "latency_ms":
        return f"{value:.3f}"
    if key == "accuracy":
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return f"{value:,}"


def _versus_baseline(key: str, ratios: dict[str, float]) -> str:
    """The "vs baseline" cell: ``2.00x`` (baseline / model), or for accuracy ``-5.00 points`` (model - baseline)."""
    if key == "accuracy":
        delta = ratios.get("accuracy_delta")
        return "-" if delta is None else f"{100 * delta:+.2f} points"
    ratio = ratios.get(key)
    return "-" if ratio is None else f"{ratio:.2f}x"


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (with "baseline" and "vs baseline" columns when a baseline is present: the
    ratio baseline / model, for accuracy the change model - baseline in points)."""
    keys = (*RATIO_KEYS, "accuracy")
    baseline, ratios = report.get("baseline"), report.get("ratios", {})
    header = "| metric | model |" + (" baseline | vs baseline |" if baseline else "")
    lines = [header, "|---|---:|" + ("---:|---:|" if baseline else "")]
    for key in keys:
        row = f"| {key} | {_format_value(key, report.get(key))} |"
        if baseline:
            row += f" {_format_value(key, baseline.get(key))} | {_versus_baseline(key, ratios)} |"
        lines.append(row)
    if baseline:
        lines.append("")
        lines.append("vs baseline: baseline / model for sizes, multiply-adds and latency (above 1: this model is "
                     "smaller or faster); for accuracy, model - baseline in points (x 100, accuracies in [0, 1]).")
    latency = report.get("latency", {})
    if latency:
        lines.append("")
        lines.append(f"Latency: median of {latency['runs']} runs after {latency['warmup']} warm-up runs, "
                     f"batch size {latency['batch_size']}, {latency['num_threads']} thread(s), CPU.")
    export = report.get("int8_export")
    if export:
        agreement = export.get("agreement")
        lines.append("")
        lines.append(f"Measured: the int8 model written by Int8Export ({export.get('path')}, "
                     f"{_format_value('size_bytes', export.get('size_bytes'))} bytes); accuracy is "
                     f"{report.get('accuracy_metric')}; the fake-quantized model had "
                     f"{_format_value('accuracy', report.get('fake_quant_accuracy'))} "
                     f"({report.get('fake_quant_accuracy_metric')}); top-1 agreement int8 / fake-quantized "
                     + ("-" if agreement is None else f"{100 * agreement:.2f}%") + ".")
    if report.get("references"):
        lines += ["", format_references_markdown(report)]
    return "\n".join(lines)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_references_markdown(report: dict[str, Any]) -> str:
    """The comparison table of a report with ``references``: a row per reference and one for this model.

    >>> print(format_references_markdown({"accuracy": 0.9, "parameters": 50, "references": {"teacher":
    ...     {"accuracy": 0.95, "parameters": 200, "ratios": {"parameters": 4.0, "accuracy_delta_points": -5.0}}}}))
    ... # doctest: +NORMALIZE_WHITESPACE
    How this model compares with each reference (ratios: the reference / this model, above 1 means this model is
    smaller or faster; accuracy change: this model - the reference, in points):
    <BLANKLINE>
    | model | accuracy | parameters | size (bytes) | MACs | latency (ms) | accuracy change (points) | x fewer parameters | x smaller | x fewer MACs | x faster |
    |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
    | teacher | 0.9500 | 200 | - | - | - | -5.00 | 4.00x | - | - | - |
    | **this model** | 0.9000 | 50 | - | - | - | | | | | |
    """  # noqa: E501
    keys = REFERENCE_KEYS
    lines = [
        "How this model compares with each reference (ratios: the reference / this model, above 1 means this model "
        "is\nsmaller or faster; accuracy change: this model - the reference, in points):",
        "",
        "| model | accuracy | parameters | size (bytes) | MACs | latency (ms) | accuracy change (points) "
        "| x fewer parameters | x smaller | x fewer MACs | x faster |",
        "|---|" + "---:|" * 10,
    ]
    notes = []
    own_latency = report.get("latency") or {}
    for name, entry in report["references"].items():
        ratios = entry.get("ratios", {})
        points = ratios.get("accuracy_delta_points")
        cells = [_format_value(key, entry.get(key)) for key in keys]
        cells.append("-" if points is None else f"{points:+.2f}")
        cells += [_times(ratios.get(key)) for key in ("parameters", "size_bytes", "macs", "latency_ms")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        latency = entry.get("latency") or {}
        settings = ("batch_size", "num_threads")
        if latency and own_latency and any(latency.get(k) != own_latency.get(k) for k in settings):
            notes.append(f"Latency of {name!r} was measured with batch size {latency.get('batch_size')} and "
                         f"{latency.get('num_threads')} thread(s), this model's with batch size "
                         f"{own_latency.get('batch_size')} and {own_latency.get('num_threads')}: not directly "
                         "comparable.")
    lines.append("| **this model** | " + " | ".join(_format_value(key, report.get(key)) for key in keys)
                 + " |" + " |" * 5)
    return "\n".join(lines + (["", *notes] if notes else []))
