"""int8 on a real architecture: torchvision's ResNet-18, briefly trained (random or batch-norm-recalibrated weights
make a quantized network's logits chaotic under rounding, so agreement would measure nothing), quantized after
training, exported through torch (``export_int8``) and ONNX (``export_onnx``), each checked against the
fake-quantized model. Numbers measured on 2026-12-05 are in the README ("Which kernels onnxruntime uses")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo_support import torchvision

from lightning_compress.demo import ShapesDataModule
from lightning_compress.export import export_int8
from lightning_compress.quantization import quantize_model

VISION = torchvision()
pytestmark = [pytest.mark.skipif(VISION is None, reason="torchvision is not installed (.ci/run installs it)"),
              pytest.mark.slow]


def _images(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=32).repeat(1, 3, 1, 1)  # the shapes workload as 3x32x32 images


def test_resnet18_int8_follows_its_fake_quantized_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from lightning_compress.export.onnx import export_onnx

    assert VISION is not None
    data = ShapesDataModule(seed=0, samples_per_class=200)
    data.setup()
    images, labels = data.train_set.tensors
    test_images, test_labels = data.test_set.tensors
    torch.manual_seed(0)
    model = VISION.models.get_model("resnet18", weights=None, num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(3):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(model(_images(images[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test, calibration = _images(test_images[:512]), _images(images[:256])
    with torch.no_grad():
        float_accuracy = float((model(test).argmax(1) == test_labels[:512]).float().mean())
    assert float_accuracy > 0.4  # trained: well above the 10% of chance

    fake_quantized = quantize_model(model, "static", calibration, reduce_range=True)
    with torch.no_grad():
        fake_accuracy = float((fake_quantized(test).argmax(1) == test_labels[:512]).float().mean())
    assert fake_accuracy >= float_accuracy - 0.02

    int8 = export_int8(fake_quantized, calibration, check_inputs=test, min_agreement=0.97)
    assert int8.verification["agreement"] >= 0.97 and int8.verification["relative_error"] <= 0.05
    # the default layout: integer convolutions, or float kernels where those miss the 99.5% (98.7% measured here)
    deployed = export_onnx(fake_quantized, calibration, tmp_path / "resnet18.onnx", check_inputs=test)
    assert deployed["agreement"] >= 0.995 and deployed["relative_error"] <= 0.02
    if "integer_layout_agreement" in deployed:
        assert deployed["integer_layout_agreement"] < 0.995 and deployed["quantized_conv_outputs"] == 0

    # residual quantizers: the fake-quantized model also rounds what the int8 graph stores in 8 bits (the outputs of
    # bn2 / downsample feeding the additions, the residual stream); measured: agreement 1.000, relative error 0.0037
    # (0.988 and 0.019 above), fake-quantized accuracy 0.666 (0.660 above, float 0.670)
    matched = quantize_model(model, "static", calibration, reduce_range=True, residual_quantizers=True)
    with torch.no_grad():
        assert float((matched(test).argmax(1) == test_labels[:512]).float().mean()) >= float_accuracy - 0.02
    int8 = export_int8(matched, calibration, check_inputs=test, min_agreement=0.995)
    assert int8.verification["agreement"] >= 0.995 and int8.verification["relative_error"] <= 0.01
    deployed = export_onnx(matched, calibration, tmp_path / "resnet18_residual.onnx", check_inputs=test)
    assert deployed["agreement"] >= 0.995 and deployed["relative_error"] <= 0.02


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnet_y_400mf", "convnext_tiny"])
def test_every_engine_computes_every_int8_layer_exactly(name):
    """Depthwise, grouped, squeeze-excitation and LayerNorm networks under every engine: each int8 Conv / Linear
    computes what integer arithmetic gives, up to float rounding at ties (measured on a trained EfficientNet-B0, 16
    images: 0 wrong codes; near ties 1 in 2.3M codes under fbgemm, 9 under x86, 12 under onednn). The kernels do not
    depend on trained weights, so random ones serve here; the agreement of such a network would measure its chaos,
    not the kernels."""
    assert VISION is not None
    torch.manual_seed(0)
    model = VISION.models.get_model(name, weights=None, num_classes=10)
    data = ShapesDataModule(seed=0, samples_per_class=20)
    data.setup()
    images = _images(data.train_set.tensors[0][:64])
    for module in model.modules():  # batch norm statistics of these images (random init's leave qnnpack's add
        if isinstance(module, torch.nn.BatchNorm2d):  # scale ratios out of range on EfficientNet)
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(images)
    model.eval()
    fake = quantize_model(model, "static", images, reduce_range=True, residual_quantizers=True)
    for engine in torch.backends.quantized.supported_engines:
        if engine == "none":
            continue
        kernel = export_int8(fake, images, engine=engine, min_agreement=None).verification["kernel"]
        # near ties: float rounding of the requantization (onednn on ConvNeXt-T here: 15 in 1.1M codes)
        assert kernel["wrong"] == 0 and kernel["near_tie"] <= 1e-4 * kernel["codes"], (engine, kernel)
        assert kernel["layers"] >= 40 and kernel["codes"] > 1e5, kernel
