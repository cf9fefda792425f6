"""LSQ (Esser et al. 2019) and PACT (Choi et al. 2018) forward values and gradients, worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_compress.quantization.functional import (
    lsq_fake_quantize,
    lsq_grad_scale,
    lsq_init_step,
    pact_fake_quantize,
)


def test_lsq_forward_and_step_gradient_by_hand():
    # 3 bits narrow: Q_N = Q_P = 3, s = 0.5; v = x / s = [-4, -0.6, 0.6, 1.8, 18]
    x = torch.tensor([-2.0, -0.3, 0.3, 0.9, 9.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = lsq_fake_quantize(x, s, num_bits=3, grad_scale=0.5)
    torch.testing.assert_close(y, torch.tensor([-1.5, -0.5, 0.5, 1.0, 1.5]))
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    # dy/ds: -Q_N, round(v) - v = -0.4, 0.4, 0.2, Q_P -> (-3 - 0.8 + 1.2 + 0.8 + 15) * g
    torch.testing.assert_close(s.grad, torch.tensor(13.2 * 0.5))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))


def test_lsq_clip_boundary_counts_as_outside():
    # v = +-Q_P exactly: clipped side (paper: -Q_N for v <= -Q_N, Q_P for v >= Q_P), no gradient to x
    x = torch.tensor([-1.5, 1.5, 1.4], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    lsq_fake_quantize(x, s, num_bits=3, grad_scale=1.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(s.grad, torch.tensor(-3.0 + 3.0 + (3.0 - 2.8)))


def test_lsq_full_range_and_unsigned():
    s = torch.tensor(1.0, requires_grad=True)
    y = lsq_fake_quantize(torch.tensor([-9.0, 9.0]), s, num_bits=4, narrow_range=False, grad_scale=1.0)
    torch.testing.assert_close(y, torch.tensor([-8.0, 7.0]))
    y.sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor(-8.0 + 7.0))
    s2 = torch.tensor(1.0, requires_grad=True)
    y2 = lsq_fake_quantize(torch.tensor([-2.0, 3.2, 20.0]), s2, num_bits=4, unsigned=True, grad_scale=1.0)
    torch.testing.assert_close(y2, torch.tensor([0.0, 3.0, 15.0]))
    y2.sum().backward()
    torch.testing.assert_close(s2.grad, torch.tensor(0.0 - 0.2 + 15.0))


def test_lsq_default_grad_scale_and_per_channel_step():
    x = torch.tensor([[0.3, 0.9], [0.3, 0.9]])
    s = torch.tensor([[0.5], [1.0]], requires_grad=True)
    y = lsq_fake_quantize(x, s, num_bits=3)  # N = 4 / 2 = 2 per step, g = 1 / sqrt(2 * 3)
    torch.testing.assert_close(y, torch.tensor([[0.5, 1.0], [0.0, 1.0]]))
    y.sum().backward()
    g = 1 / math.sqrt(6)
    # row 0: v = 0.6, 1.8 -> 0.4 + 0.2; row 1: v = 0.3, 0.9 -> -0.3 + 0.1
    torch.testing.assert_close(s.grad, torch.tensor([[0.6 * g], [-0.2 * g]]))


def test_lsq_matches_torch_learnable_op_inside_the_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, generator=g) * 2 - 1  # |x / s| < 10 < Q_P = 127: no clipping
    s = torch.tensor(0.1, requires_grad=True)
    s_ref = torch.tensor([0.1], requires_grad=True)
    y = lsq_fake_quantize(x, s, num_bits=8, grad_scale=0.3)
    y_ref = torch._fake_quantize_learnable_per_tensor_affine(x, s_ref, torch.tensor([0.0]), -127, 127, 0.3)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad.reshape(()), rtol=1e-4, atol=1e-5)


def test_lsq_helpers_by_hand():
    torch.testing.assert_close(lsq_init_step(torch.tensor([1.0, -3.0]), 4), torch.tensor(4 / math.sqrt(7)))
    w = torch.tensor([[1.0, -1.0], [2.0, 4.0]])
    torch.testing.assert_close(lsq_init_step(w, 8, axis=0), torch.tensor([2.0, 6.0]) / math.sqrt(127))
    assert lsq_grad_scale(1000, 8) == pytest.approx(1 / math.sqrt(127000))
    assert lsq_grad_scale(10, 4, unsigned=True) == pytest.approx(1 / math.sqrt(150))


def test_pact_forward_and_gradients_by_hand():
    a = torch.tensor(2.0, requires_grad=True)
    x = torch.tensor([-1.0, 0.0, 0.7, 2.0, 3.0], requires_grad=True)
    y = pact_fake_quantize(x, a, num_bits=2)  # 3 steps of 2/3; 0.7 * 3 / 2 = 1.05 -> 1
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 2 / 3, 2.0, 2.0]))
    y.backward(torch.tensor([1.0, 1.0, 1.0, 10.0, 100.0]))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(a.grad, torch.tensor(110.0))


def test_pact_bits_validated():
    with pytest.raises(ValueError, match="num_bits=1"):
        pact_fake_quantize(torch.ones(2), torch.tensor(1.0), num_bits=1)
