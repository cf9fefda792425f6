"""Power-of-two and k-means codebook weight quantization, and 4-bit packing, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.quantization.nonlinear import (
    codebook_fake_quantize,
    codebook_quantize,
    kmeans_codebook,
    pack_int4,
    pow2_fake_quantize,
    pow2_max_exponent,
    pow2_quantize,
    unpack_int4,
)


def test_pow2_max_exponent_rounds_max_in_linear_distance():
    assert int(pow2_max_exponent(torch.tensor([0.74]))) == -1  # nearer 0.5 than 1
    assert int(pow2_max_exponent(torch.tensor([-0.75]))) == 0  # 0.75 = 1.5 * 0.5 goes up
    assert int(pow2_max_exponent(torch.tensor([3.0, 5.9]))) == 2  # 5.9 < 6 = 1.5 * 4
    assert int(pow2_max_exponent(torch.tensor([6.0]))) == 3
    assert pow2_max_exponent(torch.tensor([[0.8, 0.1], [0.2, -0.1]]), axis=0).tolist() == [0, -2]


def test_pow2_levels_and_boundaries_3_bits():
    # e_max = 0, 3 bits -> magnitudes {1, 1/2, 1/4}; zero below 1/8; midpoints 3/8 and 3/4 go up
    w = torch.tensor([1.6, 0.75, 0.7499, 0.375, 0.3749, 0.125, 0.1249, -0.3, 0.0])
    q = pow2_quantize(w, num_bits=3, max_exponent=torch.tensor(0))
    torch.testing.assert_close(q, torch.tensor([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.0, -0.25, 0.0]))


def test_pow2_ternary_and_8_bits():
    w = torch.tensor([0.9, 0.3, 0.2, -0.6])
    torch.testing.assert_close(pow2_quantize(w, num_bits=2), torch.tensor([1.0, 0.0, 0.0, -1.0]))
    tiny = torch.tensor([1.0, 2.0**-100, 2.0**-130])  # 8 bits: 127 exponents, 0 .. -126
    torch.testing.assert_close(pow2_quantize(tiny, num_bits=8), torch.tensor([1.0, 2.0**-100, 0.0]))
    with pytest.raises(ValueError, match="num_bits=9"):
        pow2_quantize(w, num_bits=9)


def test_pow2_per_channel_and_ste():
    w = torch.tensor([[0.9, 0.3], [0.1, 0.02]], requires_grad=True)
    q = pow2_fake_quantize(w, num_bits=3, axis=0)  # row e_max 0 and -3 (0.1 -> 1/8)
    torch.testing.assert_close(q, torch.tensor([[1.0, 0.25], [0.125, 0.03125]]))
    q.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(2, 2))
    w2 = torch.tensor([0.5, 1.49, 1.5, -3.0], requires_grad=True)
    pow2_fake_quantize(w2, num_bits=4, max_exponent=torch.tensor(0)).sum().backward()
    torch.testing.assert_close(w2.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # saturated at >= 1.5 * 2^0


def test_kmeans_by_hand_and_deterministic():
    w = torch.tensor([0.0, 0.1, 1.0, 1.1, 2.0, 2.1, 3.0, 3.3])
    codebook, idx = kmeans_codebook(w, num_bits=2)
    torch.testing.assert_close(codebook, torch.tensor([0.05, 1.05, 2.05, 3.15]))
    assert idx.dtype == torch.uint8 and idx.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    codebook2, idx2 = kmeans_codebook(w, num_bits=2)
    assert torch.equal(codebook, codebook2) and torch.equal(idx, idx2)


def test_kmeans_empty_cluster_keeps_linear_init():
    # linear init over [0, 2.2]: 0, 0.733, 1.467, 2.2; nothing falls near 1.467
    codebook, idx = kmeans_codebook(torch.tensor([0.0, 0.1, 0.9, 1.0, 2.0, 2.2]), num_bits=2)
    torch.testing.assert_close(codebook, torch.tensor([0.05, 0.95, 2.2 * 2 / 3, 2.1]))
    assert idx.tolist() == [0, 0, 1, 1, 3, 3]


def test_kmeans_improves_on_uniform_levels_and_keeps_shape():
    w = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    codebook, idx = kmeans_codebook(w, num_bits=3)
    assert idx.shape == w.shape and codebook.shape == (8,)
    assert torch.all(codebook[1:] >= codebook[:-1])
    uniform = torch.linspace(float(w.min()), float(w.max()), 8)
    err_kmeans = (codebook[idx.long()] - w).pow(2).mean()
    err_uniform = (uniform[codebook_quantize(w, uniform).long()] - w).pow(2).mean()
    assert err_kmeans < 0.7 * err_uniform
    assert torch.equal(codebook_quantize(w, codebook), idx)


def test_codebook_fake_quantize_gradients():
    c = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    w = torch.tensor([[-0.8, 0.1], [0.6, 0.5]], requires_grad=True)  # 0.5 is a tie: lower centroid
    y = codebook_fake_quantize(w, c)
    torch.testing.assert_close(y, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    y.backward(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(c.grad, torch.tensor([1.0, 6.0, 3.0]))


def test_pack_int4_by_hand_and_round_trip():
    assert pack_int4(torch.tensor([1, 2])).tolist() == [0x21]
    assert pack_int4(torch.tensor([15, -1, 7])).tolist() == [0xFF, 0x07]
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (5, 7), generator=g)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 18
    assert torch.equal(unpack_int4(packed, values.shape).long(), values)
    signed = torch.randint(-8, 8, (3, 4), generator=g)
    assert torch.equal(unpack_int4(pack_int4(signed), signed.shape, signed=True).long(), signed)


def test_pack_int4_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[-9, 3\] do not fit 4 bits"):
        pack_int4(torch.tensor([-9, 3]))
    with pytest.raises(ValueError, match="2 bytes hold at most 4"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), (5,))


def test_segment_sum_by_sort_equals_index_add():
    from lightning_compress.quantization.nonlinear import _segment_sum

    g = torch.Generator().manual_seed(0)
    values, idx = torch.randn(500, generator=g), torch.randint(0, 8, (500,), generator=g)
    idx[idx == 5] = 4  # an empty segment
    expected = _segment_sum(values, idx, 8, by_sort=False)
    torch.testing.assert_close(_segment_sum(values, idx, 8, by_sort=True), expected)
    assert expected[5] == 0
