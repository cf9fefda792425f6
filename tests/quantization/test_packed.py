"""export_packed: weight-only 2..8-bit / codebook / power-of-two weights stored packed, and how they are counted."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_compress.demo import PlainCNN
from lightning_compress.export.int8 import quantized_counts
from lightning_compress.measure import measure_model
from lightning_compress.quantization import kmeans_codebook, pow2_quantize, quantize_model
from lightning_compress.quantization.packed import (
    PackedConv1d,
    PackedConv2d,
    PackedLinear,
    export_packed,
    pack_bits,
    packed_layers,
    unpack_bits,
)


def _saved_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _trained_like_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = PlainCNN(width=16).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("num_bits", [1, 2, 3, 4, 5, 7, 8])
def test_pack_bits_round_trip(num_bits):
    codes = torch.randint(0, 1 << num_bits, (1001,))
    packed = pack_bits(codes, num_bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * num_bits + 7) // 8
    assert torch.equal(unpack_bits(packed, num_bits, 1001), codes)


def test_pack_bits_by_hand_and_errors():
    assert pack_bits(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [0b00111001, 0b11]
    assert pack_bits(torch.tensor([5, 2, 7]), 3).tolist() == [0b11010101, 0b1]  # 101, 010, 111 from bit 0
    assert pack_bits(torch.tensor([1, 15, 4]), 4).tolist() == [0xF1, 0x04]  # pack_int4's nibble order
    with pytest.raises(ValueError, match=r"\[0, 4\] do not fit 2"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="bytes hold fewer"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)


@pytest.mark.parametrize("num_bits", [2, 3, 4, 8])
def test_linear_equals_weight_only_fake_quantization(num_bits):
    model = _trained_like_cnn()
    x = torch.randn(16, 1, 8, 8)
    reference = quantize_model(model, "weight_only", num_bits=num_bits)
    packed = export_packed(model, num_bits=num_bits)
    assert set(packed_layers(packed)) == {"block1.conv", "block2.conv", "block3.conv", "classifier"}
    with torch.no_grad():
        assert torch.equal(packed(x), reference(x))
        for name, layer in packed_layers(packed).items():
            ref_layer = reference.get_submodule(name)
            assert torch.equal(layer.dequantized_weight(), ref_layer.weight_quantizer(ref_layer.weight))


def test_linear_codes_by_hand():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.7, -0.1], [0.0, 0.0]]))
    packed = export_packed(nn.Sequential(layer), num_bits=4)[0]
    # channel 0: scale 0.1, q = [7, -1] -> codes [14, 6]; channel 1: amax 0 -> q = 0, codes [7, 7]
    assert packed.packed.tolist() == [6 << 4 | 14, 7 << 4 | 7]
    assert torch.allclose(packed.scale, torch.tensor([0.1, 1 / 7]))
    assert torch.allclose(packed.dequantized_weight(), torch.tensor([[0.7, -0.1], [0.0, 0.0]]))


def test_codebook_and_pow2_equal_their_fake_quantization():
    model = _trained_like_cnn()
    x = torch.randn(8, 1, 8, 8)
    for method in ("codebook", "pow2"):
        packed = export_packed(model, num_bits=4, method=method)
        for name, layer in packed_layers(packed).items():
            w = model.get_submodule(name).weight.detach()
            if method == "codebook":
                codebook, idx = kmeans_codebook(w, 4)
                expected = codebook[idx.long()]
            else:
                expected = pow2_quantize(w, num_bits=4, axis=0)
            assert torch.equal(layer.dequantized_weight(), expected), (method, name)
        reference = export_packed(model, num_bits=8, method="linear")  # any packed copy to swap weights into
        float_copy = PlainCNN(width=16).eval()
        float_copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            for name, layer in packed_layers(packed).items():
                float_copy.get_submodule(name).weight.copy_(layer.dequantized_weight())
            assert torch.equal(packed(x), float_copy(x))
        del reference


def test_pow2_codes_by_hand():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.9, -0.3, 0.12, 0.05]]))
    packed = export_packed(nn.Sequential(layer), num_bits=3, method="pow2")[0]
    # e_max 0, levels 0, 1/4, 1/2, 1 -> j 0..3; 0.9 -> +1 (j 3), -0.3 -> -1/4 (sign 1, j 1), rest 0
    assert packed.max_exponent.tolist() == [0]
    assert unpack_bits(packed.packed, 3, 4).tolist() == [3, 4 | 1, 0, 0]
    assert packed.dequantized_weight().tolist() == [[1.0, -0.25, 0.0, 0.0]]


def test_conv1d_linear_classes_and_layers_pattern():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1, groups=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5, 4))
    packed = export_packed(model, num_bits=4, layers="0")
    assert isinstance(packed[0], PackedConv1d) and isinstance(packed[3], nn.Linear)
    assert not isinstance(packed[3], PackedLinear)
    assert isinstance(model[0], nn.Conv1d)  # the original is untouched
    x = torch.randn(2, 3, 5)
    ref = quantize_model(model, "weight_only", num_bits=4, layers="0")
    assert torch.equal(packed(x), ref(x))
    assert isinstance(export_packed(PlainCNN(width=4), num_bits=4).block1.conv, PackedConv2d)


def test_state_dict_is_really_smaller_and_reloads():
    model = PlainCNN(width=32).eval()
    packed = export_packed(model, num_bits=4)
    weights = sum(model.get_submodule(n).weight.numel() * 4 for n in packed_layers(packed))
    payload = sum(layer.payload_bytes() for layer in packed_layers(packed).values())
    assert weights / payload >= 7.0
    assert _saved_bytes(model) / _saved_bytes(packed) >= 5.0
    assert all(v.dtype == torch.uint8 for k, v in packed.state_dict().items() if k.endswith("packed"))
    fresh = export_packed(PlainCNN(width=32).eval(), num_bits=4)
    fresh.load_state_dict(packed.state_dict())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), packed(x))


def test_quantized_counts_and_measure_model_count_packed_layers():
    model = PlainCNN(width=32).eval()
    packed = export_packed(model, num_bits=4)
    x = torch.randn(4, 1, 8, 8)
    counts = quantized_counts(packed, x)
    floats = sum(p.numel() for p in model.parameters())
    weights = sum(model.get_submodule(n).weight.numel() for n in packed_layers(packed))
    payload = sum(layer.payload_bytes() for layer in packed_layers(packed).values())
    assert counts["parameters"] == floats and counts["quantized_parameters"] == weights
    assert counts["weight_bytes"] == payload + 4 * (floats - weights)
    report = measure_model(packed, x, latency_runs=1, warmup=0, baseline=model)
    assert report["parameters"] == floats
    assert report["macs"] == report["baseline"]["macs"]
    assert report["ratios"]["size_bytes"] >= 5.0


def test_qat_layers_use_their_own_scale_and_bits():
    model = _trained_like_cnn()
    x = torch.randn(16, 1, 8, 8)
    fq = quantize_model(model, "static", x, num_bits=8, bit_widths={"classifier": 4})
    with torch.no_grad():
        fq.classifier.weight_quantizer.amax.mul_(0.5)  # a learned / clipped amax, not max |w|
    packed = export_packed(fq, num_bits=6)
    assert packed.classifier.num_bits == 4 and packed.block1.conv.num_bits == 8
    with torch.no_grad():
        for name, layer in packed_layers(packed).items():
            ref = fq.get_submodule(name)
            assert torch.equal(layer.dequantized_weight(), ref.weight_quantizer(ref.weight)), name


def test_bad_arguments_name_the_value():
    model = PlainCNN(width=4)
    with pytest.raises(ValueError, match="num_bits=9"):
        export_packed(model, num_bits=9)
    with pytest.raises(ValueError, match="num_bits=1"):
        export_packed(model, num_bits=1)
    with pytest.raises(ValueError, match="'lloyd'"):
        export_packed(model, method="lloyd")
    with pytest.raises(ValueError, match="nope"):
        export_packed(model, layers="nope")
