"""Quantized distillation: a frozen post-training-quantized teacher, a QAT student, the teacher left untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_compress import QuantizationAwareTraining
from lightning_compress.demo import ResidualCNN
from lightning_compress.distillation import DistillationModule
from lightning_compress.distillation.methods.quantized import is_quantized, quantized_distillation, quantized_teacher
from lightning_compress.quantization import quantize_model, quantized_layers


def _calibration() -> torch.Tensor:
    return torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_quantized_teacher_is_quantized_frozen_and_a_copy(tiny_input: torch.Tensor) -> None:
    teacher = ResidualCNN(width=4).eval()
    float_state = copy.deepcopy(teacher.state_dict())
    quantized = quantized_teacher(teacher, _calibration(), num_bits=4)
    assert not is_quantized(teacher) and teacher.state_dict().keys() == float_state.keys()  # original untouched
    layers = quantized_layers(quantized)
    assert set(layers) == {n for n, m in teacher.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert all(float(layer.input_quantizer.amax) > 0 for layer in layers.values())  # calibrated (static)
    assert not quantized.training and not any(m.training for m in quantized.modules())
    assert not any(p.requires_grad for p in quantized.parameters())
    with torch.no_grad():
        # exactly quantize_model's result, and at 4 bits visibly different from the float teacher
        reference = quantize_model(teacher, "static", _calibration(), num_bits=4)
        assert torch.equal(quantized(tiny_input), reference(tiny_input))
        assert not torch.allclose(quantized(tiny_input), teacher(tiny_input), atol=1e-3)


def test_quantized_teacher_errors() -> None:
    teacher = ResidualCNN(width=4)
    with pytest.raises(ValueError, match="do not pass inplace"):
        quantized_teacher(teacher, _calibration(), inplace=True)
    with pytest.raises(ValueError, match="mode='static' needs calibration_data"):
        quantized_teacher(teacher, None)
    with pytest.raises(ValueError, match="Unknown mode 'int8'"):
        quantized_teacher(teacher, _calibration(), mode="int8")
    with pytest.raises(ValueError, match="already holds quantized layers"):
        quantized_teacher(quantized_teacher(teacher, _calibration()), _calibration())
    assert is_quantized(quantized_teacher(teacher, None, mode="weight_only"))


def test_qat_quantizes_the_student_and_leaves_the_quantized_teacher_untouched(trainer_factory, digits) -> None:  # type: ignore[no-untyped-def]
    teacher = quantized_teacher(ResidualCNN(width=8).eval(), digits.train_dataloader(), calibration_batches=2)
    teacher_state = copy.deepcopy(teacher.state_dict())
    teacher_layers = set(quantized_layers(teacher))
    student = ResidualCNN(width=4)
    module = DistillationModule(student, teacher, temperature=2.0)
    qat = QuantizationAwareTraining(num_bits=8, calibration_batches=1)
    trainer = trainer_factory(callbacks=[qat], limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, digits)
    assert qat.phase == "training"
    assert set(qat.quantized_layers) == set(quantized_layers(student)) and is_quantized(student)
    assert all(layer in dict(student.named_modules()).values() for layer in qat.quantized_layers.values())
    assert set(quantized_layers(teacher)) == teacher_layers  # the callback attached nothing to the teacher
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key  # weights, BatchNorm statistics and scales unchanged
    assert not any(m.training for m in teacher.modules())
    assert all(layer.input_quantizer.enabled for layer in quantized_layers(teacher).values())
    assert "distill/soft" in trainer.callback_metrics and "quant/phase" in trainer.callback_metrics


def test_quantized_distillation_builds_the_pair() -> None:
    teacher = ResidualCNN(width=8)
    module, qat = quantized_distillation(ResidualCNN(width=4), teacher, _calibration(),
                                         ptq={"num_bits": 4, "calibration": "percentile"},
                                         qat={"num_bits": 6}, temperature=3.0)
    assert isinstance(module, DistillationModule) and isinstance(qat, QuantizationAwareTraining)
    assert is_quantized(module.teacher) and not is_quantized(module.student) and not is_quantized(teacher)
    assert qat.num_bits == 6 and module.temperature == 3.0
    assert all(layer.input_quantizer.num_bits == 4 for layer in quantized_layers(module.teacher).values())
    with pytest.raises(ValueError, match="Unknown calibration 'bogus'"):
        quantized_distillation(ResidualCNN(width=4), teacher, _calibration(), ptq={"calibration": "bogus"})
