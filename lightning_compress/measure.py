"""What a model costs: parameters, bytes, multiply-adds, latency. Pure functions, no Lightning.

Every compression family feeds these: a masked model reports dense and non-zero multiply-adds, a compacted model
fewer of both, an exported int8 model fewer bytes.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _first_sample(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(x[:1] if isinstance(x, torch.Tensor) else x for x in _as_args(example_inputs))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _weight_density(module: nn.Module) -> float | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        return None
    return float(torch.count_nonzero(weight.detach())) / weight.numel()


def count_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Multiply-adds of one forward pass for ONE sample, counted by ``torch.utils.flop_counter``.

    Returns:
        ``(dense_macs, nonzero_macs)``: the second scales each leaf layer's multiply-adds by the fraction of its
        weight that is non-zero, i.e. the work a sparse kernel would do on a masked (not compacted) model.

    >>> count_macs(nn.Linear(4, 3), torch.zeros(5, 4))
    (12, 12)
    """
    with _eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*_first_sample(example_inputs))
    dense = counter.get_total_flops() // 2
    modules = dict(model.named_modules())
    saved = 0.0
    for key, ops in counter.get_flop_counts().items():
        name = key.split(".", 1)[1] if "." in key else None
        module = modules.get(name) if name is not None else None
        density = _weight_density(module) if module is not None and not list(module.children()) else None
        if density is not None:
            saved += (1.0 - density) * sum(ops.values()) / 2
    return int(dense), round(dense - saved)


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
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs!r}, warmup={warmup!r}.")
    args = _as_args(example_inputs)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with _eval_mode(model), torch.inference_mode():
            for _ in range(warmup):
                model(*args)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                model(*args)
                times.append(time.perf_counter() - start)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    first = args[0]
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
    from lightning_compress.quantization.export import quantized_counts

    latency = measure_latency(model, example_inputs, runs=latency_runs, warmup=warmup, num_threads=num_threads)
    macs, nonzero_macs = count_macs(model, example_inputs)
    parameters, nonzero = count_parameters(model), count_nonzero_parameters(model)
    if quantized_counts(model)["quantized_parameters"]:
        packed = quantized_counts(model, example_inputs)
        # torch.ao's quantized modules hide packed weights from parameters() and from flop_counter.
        parameters, nonzero, macs, nonzero_macs = (packed["parameters"], packed["nonzero_parameters"],
                                                   packed["macs"], packed["macs"])
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


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (with baseline and ratio columns when a baseline is present)."""
    keys = (*RATIO_KEYS, "accuracy")
    baseline, ratios = report.get("baseline"), report.get("ratios", {})
    header = "| metric | model |" + (" baseline | ratio (baseline / model) |" if baseline else "")
    lines = [header, "|---|---:|" + ("---:|---:|" if baseline else "")]
    for key in keys:
        row = f"| {key} | {_format_value(key, report.get(key))} |"
        if baseline:
            ratio_key = "accuracy_delta" if key == "accuracy" else key
            ratio = ratios.get(ratio_key)
            shown = "-" if ratio is None else (f"{ratio:+.4f}" if key == "accuracy" else f"{ratio:.2f}x")
            row += f" {_format_value(key, baseline.get(key))} | {shown} |"
        lines.append(row)
    latency = report.get("latency", {})
    if latency:
        lines.append("")
        lines.append(f"Latency: median of {latency['runs']} runs after {latency['warmup']} warm-up runs, "
                     f"batch size {latency['batch_size']}, {latency['num_threads']} thread(s), CPU.")
    return "\n".join(lines)
