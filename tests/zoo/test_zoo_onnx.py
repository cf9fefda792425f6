"""The architecture zoo leaves as ONNX: torchvision classifiers (random weights, batch norm randomised) exported
float, pruned-and-compacted and post-training quantized (QDQ), each run in onnxruntime and compared with its
PyTorch model. Agreement on briefly trained weights is measured by test_zoo_int8.py; on random weights a quantized
network is rounding-chaotic, so the int8 files are checked for their structure and a loose agreement only."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("onnxruntime")
from zoo_support import classifier, randomize, torchvision

from lightning_compress import export_onnx
from lightning_compress.graph import compact
from lightning_compress.pruning.groups import prune_filter_groups
from lightning_compress.quantization import quantize_model, quantized_layers

pytestmark = pytest.mark.skipif(torchvision() is None, reason="torchvision is not installed (.ci/run installs it)")

ZOO = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0", "convnext_tiny",
       "swin_t"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_exports_float_compact_and_int8_qdq(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = classifier(name)
    randomize(model)
    model.eval()
    size = 64 if name == "swin_t" else 32
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    pruned = copy.deepcopy(model)
    prune_filter_groups(pruned, x[:2], 0.4)
    for label, network in (("float", model), ("compact", compact(pruned, x[:2]))):
        exported = export_onnx(network, x, tmp_path / f"{label}.onnx", min_agreement=1.0)
        assert exported["relative_error"] < 1e-5, (label, exported)
    quantized = quantize_model(model, "static", x, reduce_range=True)
    int8 = export_onnx(quantized, x, tmp_path / "int8.onnx", min_agreement=0.75)
    assert int8["quantized_layers"] == len(quantized_layers(quantized)) > 0
    assert int8["qdq_nodes"] >= 2 * int8["quantized_layers"] and int8["relative_error"] < 0.1, int8
