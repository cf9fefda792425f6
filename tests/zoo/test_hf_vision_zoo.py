"""Hugging Face vision classifiers (built from small configs, random weights, nothing downloaded) through the same
paths as torchvision's: 40% structured pruning compacted exactly, post-training quantization that attaches and
calibrates, ONNX export verified in onnxruntime, and the torch int8 model where torch.ao FX can trace the model
(a clear error where it cannot). Ratios measured on 2026-12-06 (benchmarks/zoo.py has Torch-Pruning beside)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
from zoo_support import hf_classifier, randomize  # noqa: E402

from lightning_compress import export_onnx  # noqa: E402
from lightning_compress.export import export_int8  # noqa: E402
from lightning_compress.graph import compact  # noqa: E402
from lightning_compress.measure import count_parameters  # noqa: E402
from lightning_compress.pruning.groups import prune_filter_groups  # noqa: E402
from lightning_compress.quantization import quantize_model, quantized_layers  # noqa: E402

# (model, minimum x fewer parameters at 40%, whether torch.ao FX traces it). The transformers prune their MLPs and
# convolutions only: their residual streams meet attention and position embeddings (heads: HeadPruning); ConvNeXt's
# streams pass LayerNorms only, which compaction shrinks exactly (CompactLayerNorm).
ZOO = [("hf_resnet", 2.6, False), ("hf_convnext", 2.6, False), ("hf_mobilenet_v2", 2.4, False),
       ("hf_efficientnet", 2.6, True), ("hf_regnet", 2.5, False), ("hf_swin", 1.25, True), ("hf_vit", 1.25, True)]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = hf_classifier(name)
    randomize(model)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "minimum", "traceable"), ZOO, ids=[name for name, _, _ in ZOO])
def test_hugging_face_vision_models_prune_quantize_and_export(name, minimum, traceable, tmp_path) -> None:
    model = _model(name)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pruned = copy.deepcopy(model)
    prune_filter_groups(pruned, x[:2], 0.4)
    small = compact(pruned, x[:2])
    assert isinstance(small, nn.Module)
    with torch.no_grad():
        reference, out = pruned(x), small(x)
    assert float((out - reference).norm() / reference.norm()) <= 1e-4
    assert count_parameters(model) / count_parameters(small) >= minimum

    quantized = quantize_model(model, "static", x, reduce_range=True)
    layers = quantized_layers(quantized)
    assert layers and all(float(layer.input_quantizer.amax) > 0 for layer in layers.values())
    deployed = export_onnx(quantized, x, tmp_path / f"{name}.onnx", min_agreement=7 / 8)
    assert deployed["quantized_layers"] == len(layers) and deployed["relative_error"] < 0.05, deployed
    if traceable:
        int8 = export_int8(quantized, x, min_agreement=None)
        assert int8.verification["relative_error"] < 0.1, int8.verification
    else:
        with pytest.raises(ValueError, match=r"torch.ao FX cannot trace .*export_onnx exports it"):
            export_int8(quantized, x, method="fx")
