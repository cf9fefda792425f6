"""Linear fake quantization, quantize / dequantize and affine parameters against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.quantization.functional import (
    affine_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_affine,
    qrange,
    quantize,
)


def test_qrange_narrow_signed_and_unsigned():
    assert qrange(2) == (-1, 1)
    assert qrange(4) == (-7, 7)
    assert qrange(8) == (-127, 127)
    assert qrange(16) == (-32767, 32767)
    assert qrange(8, unsigned=True) == (0, 255)
    assert qrange(4, unsigned=True) == (0, 15)
    assert qrange(8, narrow_range=False) == (-128, 127)


@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, True])
def test_bits_outside_range_raise_quoting_value(bits):
    with pytest.raises(ValueError, match=rf"num_bits={bits!r}.*2 to 16"):
        fake_quantize(torch.ones(3), 1.0, num_bits=bits)


@pytest.mark.parametrize("fused", [True, False])
def test_signed_8bit_hand_values(fused):
    # amax 1.27 -> scale 0.01; -2 clips to -1.27, 0.004 -> 0, 0.005 -> 0 (half to even), 0.015 -> 0.02
    x = torch.tensor([-2.0, 0.004, 0.0051, 0.0149, 0.5, 1.3])
    y = fake_quantize(x, 1.27, num_bits=8, fused=fused)
    torch.testing.assert_close(y, torch.tensor([-1.27, 0.0, 0.01, 0.01, 0.5, 1.27]))


@pytest.mark.parametrize("fused", [True, False])
def test_signed_2_and_4_bit_hand_values(fused):
    x = torch.tensor([-3.0, -0.4, 0.2, 0.6, 3.0])
    # 2 bits: levels {-1, 0, 1} * amax (amax 2): -0.4/2 = -0.2 -> 0, 0.6/2 = 0.3 -> 0
    torch.testing.assert_close(fake_quantize(x, 2.0, num_bits=2, fused=fused), torch.tensor([-2.0, 0, 0, 0, 2.0]))
    # 4 bits: scale 7/7 = 1 with amax 7 -> plain rounding, clip at +-7
    x4 = torch.tensor([-9.0, -2.5, -0.6, 1.5, 6.4, 8.0])
    torch.testing.assert_close(
        fake_quantize(x4, 7.0, num_bits=4, fused=fused), torch.tensor([-7.0, -2.0, -1.0, 2.0, 6.0, 7.0])
    )


@pytest.mark.parametrize("fused", [True, False])
def test_unsigned_hand_values(fused):
    # 4 bits unsigned: 15 levels of 1.0 with amax 15; negatives clip to 0
    x = torch.tensor([-1.0, 0.4, 2.5, 3.5, 14.6, 20.0])
    y = fake_quantize(x, 15.0, num_bits=4, unsigned=True, fused=fused)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 2.0, 4.0, 15.0, 15.0]))


@pytest.mark.parametrize("fused", [True, False])
def test_per_channel_along_axis_0_and_1(fused):
    w = torch.tensor([[0.4, -1.0, 2.4], [0.4, -1.0, 2.4]])
    # 2 bits: row 0 amax 1 -> levels {-1, 0, 1}; row 1 amax 4 -> {-4, 0, 4}
    y = fake_quantize(w, torch.tensor([1.0, 4.0]), num_bits=2, axis=0, fused=fused)
    torch.testing.assert_close(y, torch.tensor([[0.0, -1.0, 1.0], [0.0, 0.0, 4.0]]))
    y1 = fake_quantize(w, torch.tensor([1.0, 1.0, 4.0]), num_bits=2, axis=1, fused=fused)
    torch.testing.assert_close(y1, torch.tensor([[0.0, -1.0, 4.0], [0.0, -1.0, 4.0]]))


def test_per_channel_amax_of_wrong_size_raises():
    with pytest.raises(ValueError, match=r"3 entries.*axis=0 needs 2"):
        fake_quantize(torch.ones(2, 4), torch.ones(3), axis=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
def test_zero_amax_gives_zeros_and_zero_gradient_not_nan(fused, axis):
    x = torch.tensor([[0.5, -0.2], [0.0, 0.0]], requires_grad=True)
    amax = torch.tensor(0.0) if axis is None else torch.tensor([1.0, 0.0])
    y = fake_quantize(x, amax, num_bits=8, axis=axis, fused=fused)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    if axis is None:
        assert y.abs().sum() == 0 and x.grad.abs().sum() == 0
    else:
        torch.testing.assert_close(y[0], torch.tensor([0.5, -0.2]), atol=1 / 254, rtol=0)
        torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("fused", [True, False])
def test_ste_boundary_signed_is_half_a_step_past_amax(fused):
    # amax 127 at 8 bits: scale exactly 1. Gradient passes iff round(x) in [-127, 127]: |x| < 127.5
    x = torch.tensor([-127.5, -127.49, -50.0, 126.9, 127.0, 127.49, 127.5, 127.51, 200.0], requires_grad=True)
    fake_quantize(x, 127.0, num_bits=8, fused=fused).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 0, 0, 0]))


@pytest.mark.parametrize("fused", [True, False])
def test_ste_boundary_unsigned(fused):
    # 4 bits unsigned, amax 15: scale 1; round(-0.5) = -0 is in range, round(-0.51) = -1 is not; 15.5 -> 16 is not
    x = torch.tensor([-0.51, -0.5, 0.0, 7.0, 15.49, 15.5], requires_grad=True)
    fake_quantize(x, 15.0, num_bits=4, unsigned=True, fused=fused).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("unsigned", [False, True])
def test_fused_and_plain_paths_agree(bits, unsigned):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(6, 50, generator=g) * 2).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    amax = torch.rand(6, generator=g) * 3 + 0.1
    for axis, a in [(None, amax[0]), (0, amax)]:
        y1 = fake_quantize(x, a, num_bits=bits, unsigned=unsigned, axis=axis, fused=True)
        y2 = fake_quantize(x_plain, a, num_bits=bits, unsigned=unsigned, axis=axis, fused=False)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        g_out = torch.randn(y1.shape, generator=g)
        (gx1,) = torch.autograd.grad(y1, x, g_out)
        (gx2,) = torch.autograd.grad(y2, x_plain, g_out)
        torch.testing.assert_close(gx1, gx2, rtol=0, atol=0)


def test_broadcast_amax_without_axis_uses_plain_path():
    w = torch.tensor([[0.4, -1.0], [3.0, -1.0]])
    y = fake_quantize(w, torch.tensor([[1.0], [4.0]]), num_bits=2)
    torch.testing.assert_close(y, torch.tensor([[0.0, -1.0], [4.0, 0.0]]))


def test_quantize_dequantize_torch_convention():
    # q = round(x / s) + zp with s = 0.1, zp = 10, range [0, 255]
    x = torch.tensor([-2.0, -1.0, 0.0, 0.26, 3.0, 30.0])
    q = quantize(x, 0.1, 10, 0, 255)
    assert q.dtype == torch.uint8
    assert q.tolist() == [0, 0, 10, 13, 40, 255]
    torch.testing.assert_close(dequantize(q, 0.1, 10), torch.tensor([-1.0, -1.0, 0.0, 0.3, 3.0, 24.5]))


def test_quantize_dtypes_and_per_channel():
    x = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    q = quantize(x, torch.tensor([0.5, 0.25]), torch.tensor([0, 0]), -127, 127, axis=0)
    assert q.dtype == torch.int8 and q.tolist() == [[2, -2], [4, -4]]
    torch.testing.assert_close(dequantize(q, torch.tensor([0.5, 0.25]), torch.tensor([0, 0]), axis=0), x)
    assert quantize(x, 1.0, 0, -32767, 32767).dtype == torch.int16
    assert quantize(x, 1.0, 0, 0, 65535).dtype == torch.int32


def test_affine_qparams_match_torch_observer():
    scale, zp = affine_qparams(-1.0, 3.0, 0, 255)
    torch.testing.assert_close(scale, torch.tensor(4.0 / 255))
    assert int(zp) == 64  # 0 - round(-1 / (4 / 255)) = round(63.75)
    obs = torch.ao.quantization.MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=255)
    obs(torch.tensor([-1.0, 3.0]))
    s_ref, z_ref = obs.calculate_qparams()
    torch.testing.assert_close(scale, s_ref.reshape(()))
    assert int(zp) == int(z_ref)
    # positive-only data: range widened to include 0, zero point at qmin
    scale2, zp2 = affine_qparams(torch.tensor([0.5, 1.0]), torch.tensor([2.55, 5.1]), -128, 127)
    torch.testing.assert_close(scale2, torch.tensor([0.01, 0.02]))
    assert zp2.tolist() == [-128, -128]


def test_affine_fake_quantize_zero_is_exact_and_clips():
    scale, zp = affine_qparams(-1.0, 3.0, 0, 255)
    x = torch.tensor([-5.0, 0.0, 1.0, 5.0])
    y = fake_quantize_affine(x, scale, zp, 0, 255)
    assert y[1] == 0.0
    torch.testing.assert_close(y, torch.tensor([-64 * 4 / 255, 0.0, 64 * 4 / 255, 191 * 4 / 255]))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    values=st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=30),
    amax=st.floats(0.0009765625, 50, width=32),
    bits=st.integers(2, 16),
    unsigned=st.booleans(),
)
def test_fake_quantize_lands_on_the_grid_and_is_idempotent(values, amax, bits, unsigned):
    x = torch.tensor(values)
    qmin, qmax = qrange(bits, unsigned)
    scale = torch.tensor(amax) / qmax
    y = fake_quantize(x, amax, num_bits=bits, unsigned=unsigned)
    k = y / scale
    torch.testing.assert_close(k, k.round(), rtol=1e-6, atol=1e-3)
    assert k.round().min() >= qmin and k.round().max() <= qmax
    torch.testing.assert_close(fake_quantize(y, amax, num_bits=bits, unsigned=unsigned), y)
    inside = (x >= qmin * scale) & (x <= amax)
    assert torch.all((y - x)[inside].abs() <= scale / 2 * (1 + 1e-5) + 1e-7)
    q = quantize(x, scale, 0, qmin, qmax)
    torch.testing.assert_close(dequantize(q, scale, 0), y)
