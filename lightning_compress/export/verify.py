"""How closely an exported model reproduces the model it came from: agreement of predictions and output error.

A pure measurement (no Lightning): :func:`output_agreement` compares two batches of outputs, :func:`check_agreement`
runs both models on example inputs and raises :class:`Int8MismatchError` below a threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.utils.modes import eval_mode
from lightning_compress.utils.outputs import model_inputs, move_inputs, run_model

__all__ = ["Int8MismatchError", "check_agreement", "output_agreement", "output_tensor"]

#: for one output per sample: the relative error (to the reference's largest magnitude) counted as agreeing
SCALAR_TOLERANCE = 0.05
#: samples per forward pass when ``check_inputs`` is one tensor
CHECK_CHUNK = 64


class Int8MismatchError(ValueError):
    """An exported model disagrees with the model it came from on more samples than allowed."""


def output_tensor(output: Any) -> Tensor:
    """The tensor of a model output that predictions are read from: the tensor itself, ``.logits`` of a
    ``ModelOutput``-like object, the ``"logits"`` entry (else the first value) of a dict, the first element of a
    tuple or list.

    >>> output_tensor({"logits": torch.ones(1, 2), "loss": torch.zeros(())}).shape
    torch.Size([1, 2])
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, dict) and output:
        return output_tensor(output["logits"] if "logits" in output else next(iter(output.values())))
    if isinstance(output, (tuple, list)) and output:
        return output_tensor(output[0])
    raise TypeError(f"cannot find a tensor in a model output of type {type(output).__name__}")


def output_agreement(reference: Tensor, output: Tensor) -> dict[str, float | int]:
    """Compare ``output`` with ``reference`` (same shape, first dimension the samples).

    ``agreement`` is the share of samples whose argmax over the last dimension is the same, or (one value per
    sample) whose relative error is within 5% of the reference's largest magnitude; ``max_abs_diff`` the largest
    absolute difference; ``relative_error`` the norm of the difference over the reference's norm.

    >>> output_agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.9, 0.1], [0.6, 0.4]]))["agreement"]
    0.5
    """
    reference, output = reference.detach().float().cpu(), output.detach().float().cpu()
    if reference.shape != output.shape:
        raise ValueError(f"output shape {tuple(output.shape)} differs from the reference's {tuple(reference.shape)}")
    samples = reference.shape[0] if reference.dim() else 1
    if reference.dim() >= 2 and reference.shape[-1] > 1:
        same = reference.argmax(-1) == output.argmax(-1)
    else:
        scale = reference.abs().max().clamp_min(1e-12)
        same = ((output - reference).abs() <= SCALAR_TOLERANCE * scale).reshape(samples, -1).all(1)
    diff = (output - reference).abs()
    return {"agreement": float(same.float().mean()), "samples": samples,
            "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
            "relative_error": float(diff.norm() / reference.norm().clamp_min(1e-12))}


def _batches(check_inputs: Any) -> Iterable[tuple[Any, ...]]:
    if check_inputs is None:
        return []
    if isinstance(check_inputs, Tensor):  # in chunks: some int8 kernels take workspace per sample (qnnpack on
        return [(chunk,) for chunk in check_inputs.split(CHECK_CHUNK)]  # ConvNeXt-T: 1.1 GB per 64 images)
    if isinstance(check_inputs, tuple):
        return [check_inputs]
    if isinstance(check_inputs, dict):  # one keyword batch (input_ids, attention_mask, ...)
        return [(model_inputs(check_inputs),)]
    # a tensor is the input; (inputs, labels) gives inputs; a dict batch keeps every entry but its labels
    return ((batch if isinstance(batch, Tensor) else model_inputs(batch),) for batch in check_inputs)


def check_agreement(reference: nn.Module, exported: nn.Module, args: tuple[Any, ...], check_inputs: Any = None,
                    min_agreement: float | None = None, advice: str = "") -> dict[str, Any]:
    """Run both models (eval mode, no gradients) on ``args`` and on every batch of ``check_inputs`` and compare.

    ``reference`` runs on its own device, ``exported`` on CPU. Returns :func:`output_agreement`'s numbers over all
    samples (``max_abs_diff`` the largest of any batch) and ``min_agreement``.

    Raises:
        Int8MismatchError: when ``min_agreement`` is set and the agreement is below it (its message ends with
            ``advice``, the exporter's suggestion).
    """
    device = next((p.device for p in reference.parameters()), torch.device("cpu"))
    references, outputs = [], []
    with eval_mode(reference), torch.no_grad():
        for batch in [args, *_batches(check_inputs)]:
            single = len(batch) == 1 and not isinstance(batch[0], tuple)
            inputs = batch[0] if single else tuple(batch)  # a dict batch goes in as keywords (run_model)
            references.append(output_tensor(run_model(reference, move_inputs(inputs, device))).cpu())
            outputs.append(output_tensor(run_model(exported, move_inputs(inputs, "cpu"))))
    result: dict[str, Any] = {**output_agreement(torch.cat(references), torch.cat(outputs)),
                              "min_agreement": min_agreement}
    if min_agreement is not None and result["agreement"] < min_agreement:
        raise Int8MismatchError(
            f"the int8 model agrees with the fake-quantized model on {result['agreement']:.2%} of "
            f"{result['samples']} samples, below min_agreement={min_agreement} (largest output difference "
            f"{result['max_abs_diff']:.4g}); engine {getattr(exported, 'engine', None)!r} on a "
            f"{torch.backends.cpu.get_cpu_capability()} CPU. {advice}Pass a more representative example batch, or "
            "min_agreement=None to keep the model anyway")
    return result


def check_export_settings(filename: str, batch_size: int, eval_batches: int | None) -> None:
    """The file and evaluation settings an export callback takes, checked at construction.

    >>> check_export_settings("model", 0, None)
    Traceback (most recent call last):
    ValueError: batch_size must be a positive integer, got 0.
    """
    if not filename:
        raise ValueError(f"filename must be a non-empty file name, got {filename!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if eval_batches is not None and eval_batches < 0:
        raise ValueError(f"eval_batches must be >= 0 or None, got {eval_batches!r}.")
