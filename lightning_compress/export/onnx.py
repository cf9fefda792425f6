"""ONNX and ``torch.export`` of float, compacted and fake-quantized networks, verified in onnxruntime.

:func:`export_onnx` writes one ``.onnx`` file (``torch.onnx.export``'s TorchScript-based exporter, weights inside,
a dynamic batch axis): a float or compacted network as it is, a fake-quantized one through
:func:`~lightning_compress.export.qdq.qdq_model` (QuantizeLinear / DequantizeLinear with our scales, integer
weights). Before writing, it runs the ONNX model in onnxruntime on the example inputs (and ``check_inputs``) and
compares it with the PyTorch model: ``agreement`` (argmax) and ``max_abs_diff``; below ``min_agreement`` (or above
``max_abs_diff``) it raises :class:`OnnxMismatchError` and writes nothing. The opset, the exporter, the versions and
the verification are recorded in the file's ``metadata_props`` and returned.

:func:`export_program` is the ``torch.export`` path (for ExecuTorch or AOTInductor): the fake-quantized network as
it is, with a dynamic batch axis; the fake quantization has no data-dependent branch.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.export.onnx_graph import quantize_conv_outputs
from lightning_compress.export.qdq import qdq_model, register_symbolics
from lightning_compress.export.verify import Int8MismatchError, output_agreement, output_tensor
from lightning_compress.quantization.quantizers import quantized_layers

__all__ = ["DEFAULT_OPSET", "OnnxMismatchError", "export_onnx", "export_program", "measure_onnx", "onnx_metadata",
           "ort_session"]

#: the newest opset of torch's TorchScript-based exporter (QuantizeLinear / DequantizeLinear with per-axis scales
#: since 13)
DEFAULT_OPSET = 20
MIN_OPSET = 13
_KEY = "lightning_compress"


class OnnxMismatchError(Int8MismatchError):
    """The ONNX model disagrees with the PyTorch model in onnxruntime beyond the allowed threshold."""


def _as_call(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise TypeError(f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got "
                    f"{type(example_inputs).__name__}")


def _dynamic_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    batch = torch.export.Dim("batch", min=1, max=65536)

    def spec(value: Any) -> Any:
        return {0: batch} if isinstance(value, Tensor) and value.dim() > 0 else None

    if kwargs:
        return {name: spec(value) for name, value in kwargs.items()}
    return tuple(spec(value) for value in args)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def _validate(opset: int, min_agreement: float | None, max_abs_diff: float | None) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= DEFAULT_OPSET:
        raise ValueError(f"opset={opset!r} is not supported; allowed: integers from {MIN_OPSET} (per-axis "
                         f"DequantizeLinear) to {DEFAULT_OPSET} (torch.onnx's TorchScript exporter)")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement={min_agreement!r} must be in [0, 1] or None")
    if max_abs_diff is not None and not max_abs_diff >= 0:
        raise ValueError(f"max_abs_diff={max_abs_diff!r} must be >= 0 or None")


def export_program(model: nn.Module, example_inputs: Any, *, dynamic_batch: bool = True) -> Any:
    """``torch.export.export`` of ``model`` in eval mode (fake quantization included) with a dynamic batch axis.

    >>> program = export_program(nn.Linear(3, 2), torch.zeros(2, 3))
    >>> program.module()(torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    """
    args, kwargs = _as_call(example_inputs)
    shapes = _dynamic_batch(args, kwargs) if dynamic_batch else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=shapes, strict=False)
    finally:
        model.train(was_training)


def ort_session(model: bytes | str | Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (1: a single core) and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_session(session: Any, example_inputs: Any) -> Tensor:
    """The first output of ``session`` on ``example_inputs`` (a tensor, tuple or dict, as for :func:`export_onnx`)."""
    args, kwargs = _as_call(example_inputs)
    names = [i.name for i in session.get_inputs()]
    values = [kwargs[n] for n in names] if kwargs else [a for a in args if isinstance(a, Tensor)]
    feed = {name: value.detach().cpu().numpy() for name, value in zip(names, values, strict=True)}
    return torch.from_numpy(session.run(None, feed)[0])


def _reference(model: nn.Module, example_inputs: Any) -> Tensor:
    args, kwargs = _as_call(example_inputs)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    args = tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)
    kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    with torch.no_grad():
        return output_tensor(model(*args, **kwargs)).detach().float().cpu()


def _batches(example_inputs: Any, check_inputs: Any) -> list[Any]:
    batches = [example_inputs]
    if check_inputs is None:
        return batches
    if isinstance(check_inputs, (Tensor, dict)):
        return [*batches, check_inputs]
    for batch in check_inputs:  # (inputs, labels) pairs give their inputs; several positional inputs: use a dict
        batches.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
    return batches


def verify_onnx(model: nn.Module, session: Any, example_inputs: Any, check_inputs: Any = None) -> dict[str, Any]:
    """Run ``model`` (eval) and the onnxruntime ``session`` on the example inputs and every batch of
    ``check_inputs``; :func:`~lightning_compress.export.verify.output_agreement` over all samples."""
    references, outputs = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(example_inputs, check_inputs):
            references.append(_reference(model, batch))
            outputs.append(run_session(session, batch))
    finally:
        model.train(was_training)
    return output_agreement(torch.cat(references), torch.cat(outputs))


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    check_inputs: Any = None,
    min_agreement: float | None = 0.995,
    max_abs_diff: float | None = None,
    fold_bn: bool = True,
    integer_kernels: bool | None = None,
    int8_embeddings: bool = False,
    dynamic_batch: bool = True,
) -> dict[str, Any]:
    """Export ``model`` (float, compacted or fake-quantized) to ONNX at ``path``, verified in onnxruntime first.

    Args:
        model: the network (left unchanged; a fake-quantized one is exported through a rewritten copy).
        example_inputs: a batch: a tensor, a tuple of tensors (positional) or a dict (keyword inputs, e.g.
            ``input_ids`` and ``attention_mask`` of a Hugging Face model). Its first dimension becomes dynamic.
        path: the ``.onnx`` file to write (weights inside).
        opset: the ONNX opset, 13 (per-axis DequantizeLinear) to 20 (the default, the newest of the exporter).
        check_inputs: further batches to verify on: a tensor or dict, or an iterable of tensors, dicts or
            ``(inputs, labels)`` pairs (a DataLoader).
        min_agreement: the smallest share of samples whose argmax agrees with the PyTorch model; ``None`` never fails.
        max_abs_diff: the largest allowed absolute output difference; ``None`` (default) never fails on it.
        fold_bn: fold batch norm that reads only a quantized convolution's output into its dequantization scale
            (in an ``nn.Sequential``, or anywhere in the forward traced on ``example_inputs``).
        integer_kernels: lay quantized Linear layers out for onnxruntime's integer kernels (``True``), its float
            kernels over int8 weights (``False``), or integer kernels where they are exact on every x86 CPU
            (``None``: inputs quantized to 7 bits, ``reduce_range=True``; without AVX-512 VNNI onnxruntime's int8
            MatMul / Conv saturate on 8-bit activations, see :func:`~lightning_compress.export.qdq.exact_everywhere`);
            where that layout misses ``min_agreement`` / ``max_abs_diff``, ``None`` exports float kernels instead
            (the integer layout's agreement is then in the result as ``integer_layout_agreement``). ``True``
            with 8-bit inputs that are unsigned after ReLUs (``quantize_model(..., unsigned="auto")``) gives the
            layout onnxruntime chains into ``QLinearConv`` layers, as its own ``quantize_static``: for CPUs with
            AVX-512 VNNI (the verification on the exporting host tells whether it is exact there).
        int8_embeddings: store ``nn.Embedding`` tables as int8 rows with per-row scales (weight-only; the PyTorch
            model keeps them float, so this changes the numbers: the verification measures by how much).
        dynamic_batch: make the first dimension of every input dynamic.

    Returns:
        ``path``, ``size_bytes``, ``opset``, ``exporter``, ``quantized_layers``, ``quantized_conv_outputs`` (see
        :func:`~lightning_compress.export.onnx_graph.quantize_conv_outputs`), ``qdq_nodes``
        (QuantizeLinear + DequantizeLinear), ``agreement``, ``max_abs_diff``, ``relative_error``, ``samples``.

    Raises:
        ValueError: a bad ``opset`` / threshold, or a quantizer without a static scale (before anything is traced).
        OnnxMismatchError: onnxruntime's outputs disagree beyond ``min_agreement`` / ``max_abs_diff`` (no file is
            written).
    """
    _validate(opset, min_agreement, max_abs_diff)
    example_inputs = _to_cpu(example_inputs)
    proto, result = _verified(model, example_inputs, check_inputs, path, opset, fold_bn, integer_kernels,
                              int8_embeddings, dynamic_batch)
    if integer_kernels is None and result["quantized_layers"] and _fails(result, min_agreement, max_abs_diff):
        # the default layout falls back to float kernels over the int8 weights, which follow the model closer
        integer_result = result
        proto, result = _verified(model, example_inputs, check_inputs, path, opset, fold_bn, False, int8_embeddings,
                                  dynamic_batch)
        result["integer_layout_agreement"] = integer_result["agreement"]
    result.update(min_agreement=min_agreement, max_abs_diff_allowed=max_abs_diff)
    _check(result, min_agreement, max_abs_diff)
    del proto.metadata_props[:]
    for key, value in {_KEY: json.dumps({k: v for k, v in result.items() if k != "path"}, default=str),
                       "opset": str(opset)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "lightning_compress"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    result["size_bytes"] = out.stat().st_size
    return result


def _verified(model: nn.Module, example_inputs: Any, check_inputs: Any, path: str | Path, opset: int, fold_bn: bool,
              integer_kernels: bool | None, int8_embeddings: bool, dynamic_batch: bool) -> tuple[Any, dict[str, Any]]:
    """The ONNX ``ModelProto`` of ``model`` in one layout and its verification in onnxruntime."""
    layers = quantized_layers(model)
    deployable = (qdq_model(model, fold_bn=fold_bn, integer_kernels=integer_kernels, embeddings=int8_embeddings,
                            example_inputs=example_inputs) if layers or int8_embeddings else _eval_copy(model)).cpu()
    proto = _to_onnx(deployable, example_inputs, opset, dynamic_batch)
    fused_convs = (quantize_conv_outputs(proto, full_range=integer_kernels is True)
                   if layers and integer_kernels is not False else 0)
    ops = [node.op_type for node in proto.graph.node]
    result: dict[str, Any] = {"path": str(path), "opset": opset,
                              "exporter": f"torch.onnx TorchScript (torch {torch.__version__})",
                              "quantized_layers": len(layers), "quantized_conv_outputs": fused_convs,
                              "qdq_nodes": ops.count("QuantizeLinear") + ops.count("DequantizeLinear")}
    result.update(verify_onnx(model, ort_session(proto.SerializeToString()), example_inputs, check_inputs))
    return proto, result


def _fails(result: dict[str, Any], min_agreement: float | None, max_abs_diff: float | None) -> bool:
    return bool((min_agreement is not None and result["agreement"] < min_agreement)
                or (max_abs_diff is not None and result["max_abs_diff"] > max_abs_diff))


def _to_onnx(model: nn.Module, example_inputs: Any, opset: int, dynamic_batch: bool) -> Any:
    """``torch.onnx.export`` (TorchScript-based: a second per model, where the dynamo exporter takes ten here) to an
    in-memory ``ModelProto``, the batch axis of every input and output dynamic."""
    import onnx

    args, kwargs = _as_call(example_inputs)
    if kwargs:  # named inputs in the order of ``forward``'s parameters, passed as the exporter's trailing dict
        order = list(inspect.signature(model.forward).parameters)
        names = sorted(kwargs, key=lambda n: order.index(n) if n in order else len(order))
        values, call = [kwargs[n] for n in names], (*args, {n: kwargs[n] for n in names})
    else:
        names, values, call = [f"input_{i}" if i else "input" for i in range(len(args))], list(args), args
    axes = {name: {0: "batch"} for name, value in zip(names, values, strict=False)
            if isinstance(value, Tensor) and value.dim()}
    register_symbolics(opset)
    buffer: Any = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, call, buffer, dynamo=False, opset_version=opset, input_names=names,
                          output_names=["output"], dynamic_axes={**axes, "output": {0: "batch"}} if dynamic_batch
                          and axes else None, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _to_cpu(example_inputs: Any) -> Any:
    if isinstance(example_inputs, Tensor):
        return example_inputs.cpu()
    if isinstance(example_inputs, dict):
        return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in example_inputs.items()}
    return tuple(a.cpu() if isinstance(a, Tensor) else a for a in example_inputs)


def _eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


_INTEGER_CONV_HINT = (
    "; onnxruntime's integer convolutions (QLinearConv) requantize every convolution's output and round its bias to "
    "the int32 grid, which a deep network can amplify: integer_kernels=False keeps float kernels over the int8 "
    "weights and follows the PyTorch model more closely (a briefly trained ResNet-18: 98.7% -> 99.9% agreement)")


def _check(result: dict[str, Any], min_agreement: float | None, max_abs_diff: float | None) -> None:
    if _fails(result, min_agreement, max_abs_diff):
        hint = _INTEGER_CONV_HINT if result.get("quantized_conv_outputs") else ""
        if "integer_layout_agreement" in result:
            hint = (f"; float kernels over the int8 weights were tried after the integer layout (agreement "
                    f"{result['integer_layout_agreement']:.2%})")
        raise OnnxMismatchError(
            f"the ONNX model in onnxruntime agrees with the PyTorch model on {result['agreement']:.2%} of "
            f"{result['samples']} samples (min_agreement={min_agreement}) with a largest output difference of "
            f"{result['max_abs_diff']:.4g} (max_abs_diff={max_abs_diff}); {str(result['path'])!r} was not written. "
            f"Pass more representative inputs, or loosen the thresholds (None disables them){hint}")


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    """What :func:`export_onnx` recorded in the file: opset, exporter, quantized layers, verification."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if _KEY not in props:
        raise ValueError(f"{str(path)!r} holds no lightning_compress metadata; was it written by export_onnx?")
    return json.loads(props[_KEY])


def _batch_of(example_inputs: Tensor, size: int) -> Tensor:
    repeats = -(-size // example_inputs.shape[0])
    return example_inputs.repeat(repeats, *([1] * (example_inputs.dim() - 1)))[:size]


def measure_onnx(path: str | Path, example_inputs: Tensor, *, batch_sizes: tuple[int, ...] = (1, 64),
                 runs: int = 20, warmup: int = 5) -> dict[str, Any]:
    """File size and median onnxruntime latency (one thread) of an ONNX file at each batch size, on
    ``example_inputs`` (a tensor, repeated or cut to each size).

    Returns:
        ``{"size_bytes", "latency_ms": {batch size: milliseconds}, "num_threads": 1, "runs"}``.
    """
    import time

    session = ort_session(path)
    latency = {}
    for size in batch_sizes:
        batch = _batch_of(example_inputs, size)
        for _ in range(warmup):
            run_session(session, batch)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run_session(session, batch)
            times.append(time.perf_counter() - start)
        latency[size] = sorted(times)[len(times) // 2] * 1e3
    return {"size_bytes": Path(path).stat().st_size, "latency_ms": latency, "num_threads": 1, "runs": runs}
