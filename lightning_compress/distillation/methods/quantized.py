"""Quantized distillation: a quantized teacher and a quantization-aware student in one Trainer run.

The recipe (in the spirit of Polino, Pascanu & Alistarh, "Model compression via distillation and quantization",
ICLR 2018, and Mishra & Marr, "Apprentice", ICLR 2018: a quantized student trained against a teacher's soft
targets), built only from the library's existing parts:

1. the teacher is quantized beforehand, post-training, as a function (:func:`quantized_teacher`, a frozen
   fake-quantized copy from :func:`~lightning_compress.quantization.quantize_model`), so the student learns the
   answers the deployed int8 teacher would give;
2. the student trains in a :class:`~lightning_compress.distillation.DistillationModule` with the
   :class:`~lightning_compress.QuantizationAwareTraining` callback in the same Trainer. The callback quantizes
   ``compression_target``, which a ``DistillationModule`` defines as its student: the quantized teacher is never
   touched (its scales and weights stay as calibrated).

::

    teacher_q = quantized_teacher(teacher, calibration_loader, num_bits=8, calibration="max")
    module = DistillationModule(student, teacher_q, soft_weight=0.9, hard_weight=0.1, temperature=4.0)
    trainer = Trainer(callbacks=[QuantizationAwareTraining(num_bits=8)])
    trainer.fit(module, datamodule)

or, the same in one call, ``module, qat = quantized_distillation(student, teacher, calibration_loader)`` and
``Trainer(callbacks=[qat]).fit(module, datamodule)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_compress.distillation.module import DistillationModule
from lightning_compress.quantization.ptq import quantize_model
from lightning_compress.quantization.qat_callback import QuantizationAwareTraining
from lightning_compress.quantization.quantizers import quantized_layers

__all__ = ["is_quantized", "quantized_distillation", "quantized_teacher"]


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds quantized layers (attached by :func:`quantize_model` or QAT).

    >>> is_quantized(nn.Linear(2, 2))
    False
    """
    return bool(quantized_layers(model))


def quantized_teacher(
    teacher: nn.Module,
    calibration_data: Tensor | Iterable[Any] | None,
    mode: str = "static",
    **ptq_kwargs: Any,
) -> nn.Module:
    """A frozen post-training-quantized copy of ``teacher``: :func:`~lightning_compress.quantization.quantize_model`
    (weights per output channel, inputs calibrated on ``calibration_data``), then ``requires_grad`` False and eval
    mode. ``teacher`` itself is left unchanged (``inplace`` is not accepted).

    Args:
        teacher: the trained float teacher.
        calibration_data: a tensor or an iterable of batches (a DataLoader of ``(inputs, labels)``); ``None`` only
            with ``mode="weight_only"`` / ``"dynamic"`` or ``calibration="global"``.
        mode: ``"static"``, ``"dynamic"`` or ``"weight_only"`` (see ``quantize_model``).
        **ptq_kwargs: the other keyword arguments of ``quantize_model`` (``num_bits``, ``calibration``,
            ``calibration_batches``, ``layers``, ``exclude``, ...).

    Raises:
        ValueError: for ``inplace`` in ``ptq_kwargs``, a teacher that is already quantized, and every error of
            ``quantize_model`` (unknown mode or calibration, static mode without data, ...).

    >>> import torch
    >>> teacher = quantized_teacher(nn.Sequential(nn.Linear(4, 2)), torch.randn(16, 4), num_bits=4)
    >>> is_quantized(teacher), teacher.training, teacher[0].weight.requires_grad
    (True, False, False)
    """
    if "inplace" in ptq_kwargs:
        raise ValueError("quantized_teacher always quantizes a copy; do not pass inplace.")
    if is_quantized(teacher):
        raise ValueError(f"The teacher already holds quantized layers {sorted(quantized_layers(teacher))}; pass the "
                         "float teacher.")
    quantized = quantize_model(teacher, mode, calibration_data, **ptq_kwargs)
    return quantized.requires_grad_(False).eval()


def quantized_distillation(
    student: nn.Module,
    teacher: nn.Module,
    calibration_data: Tensor | Iterable[Any] | None,
    *,
    ptq: Mapping[str, Any] | None = None,
    qat: Mapping[str, Any] | None = None,
    **distill_kwargs: Any,
) -> tuple[DistillationModule, QuantizationAwareTraining]:
    """The quantized-distillation pair for one Trainer: ``(DistillationModule(student, quantized_teacher(teacher,
    calibration_data, **ptq), **distill_kwargs), QuantizationAwareTraining(**qat))``.

    Args:
        student: the float student (quantized by the callback during ``fit``).
        teacher: the trained float teacher (quantized here, on a copy).
        calibration_data: the teacher's calibration data (see :func:`quantized_teacher`).
        ptq: keyword arguments of :func:`quantized_teacher` (``mode``, ``num_bits``, ``calibration``, ...).
        qat: keyword arguments of ``QuantizationAwareTraining`` (``num_bits``, ``calibration``, ...).
        **distill_kwargs: keyword arguments of ``DistillationModule`` (``soft_weight``, ``temperature``, ...).

    Raises:
        ValueError: the errors of :func:`quantized_teacher`, ``QuantizationAwareTraining`` and
            ``DistillationModule``.

    >>> import torch
    >>> student, teacher = nn.Sequential(nn.Linear(4, 2)), nn.Sequential(nn.Linear(4, 2))
    >>> module, callback = quantized_distillation(student, teacher, torch.randn(8, 4), qat={"num_bits": 4})
    >>> is_quantized(module.teacher), is_quantized(module.student), callback.num_bits
    (True, False, 4)
    """
    callback = QuantizationAwareTraining(**dict(qat or {}))
    teacher_q = quantized_teacher(teacher, calibration_data, **dict(ptq or {}))
    return DistillationModule(student, teacher_q, **distill_kwargs), callback
