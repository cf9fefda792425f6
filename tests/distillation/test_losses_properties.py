"""Properties of the distillation losses over generated inputs (hypothesis, derandomized)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.distillation.losses import (
    attention_map,
    fsp_matrix,
    multi_teacher_soft_target_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
    soft_target_loss,
)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _tensor(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.double)


@SETTINGS
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 5), classes=st.integers(2, 6),
       temperature=st.floats(0.5, 20.0), shift=st.floats(-5.0, 5.0))
def test_soft_loss_non_negative_and_zero_for_shifted_logits(
    seed: int, batch: int, classes: int, temperature: float, shift: float
) -> None:
    student, teacher = _tensor(seed, batch, classes), _tensor(seed + 1, batch, classes)
    assert soft_target_loss(student, teacher, temperature) >= -1e-12
    assert abs(soft_target_loss(teacher + shift, teacher, temperature).item()) < 1e-9


@SETTINGS
@given(seed=st.integers(0, 10_000), weight=st.floats(0.1, 10.0))
def test_multi_teacher_with_identical_teachers_equals_single(seed: int, weight: float) -> None:
    student, teacher = _tensor(seed, 3, 4), _tensor(seed + 1, 3, 4)
    multi = multi_teacher_soft_target_loss(student, [teacher, teacher], 2.0, [weight, 1.0])
    torch.testing.assert_close(multi, soft_target_loss(student, teacher, 2.0))


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_attention_map_unit_norm_and_scale_invariant(seed: int, scale: float) -> None:
    features = _tensor(seed, 2, 3, 4, 4)
    maps = attention_map(features)
    torch.testing.assert_close(maps.norm(dim=1), torch.ones(2, dtype=torch.double))
    torch.testing.assert_close(attention_map(scale * features), maps)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_fsp_matrix_transpose_symmetry(seed: int) -> None:
    a, b = _tensor(seed, 2, 3, 4, 4), _tensor(seed + 1, 2, 5, 4, 4)
    torch.testing.assert_close(fsp_matrix(a, b), fsp_matrix(b, a).transpose(1, 2))


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0), shift=st.floats(-3.0, 3.0))
def test_relation_losses_invariant_to_scaling_the_teacher(seed: int, scale: float, shift: float) -> None:
    student, teacher = _tensor(seed, 4, 3), _tensor(seed + 1, 4, 5)
    torch.testing.assert_close(rkd_distance_loss(student, scale * teacher + shift), rkd_distance_loss(student, teacher))
    torch.testing.assert_close(rkd_angle_loss(student, scale * teacher + shift), rkd_angle_loss(student, teacher))
    torch.testing.assert_close(similarity_preserving_loss(student, scale * teacher),
                               similarity_preserving_loss(student, teacher))
