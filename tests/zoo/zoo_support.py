"""Test-only access to torchvision's classification models (``weights=None``), for the zoo tests and benchmark.

The torchvision wheel on the package index is a CUDA build whose compiled ``_C`` extension does not load beside the
CPU torch (``import torchvision`` fails: "operator torchvision::nms does not exist"). Its Python models need none of
its compiled operators, so when the regular import fails this module registers the ``nms``/``qnms`` operator
schemas (without kernels) with ``torch.library`` and imports a copy installed apart from site-packages, found in
``$LIGHTNING_COMPRESS_ZOO`` or ``.cache/zoo/torchvision`` under the repository (``.ci/run`` installs it there with
``pip install --no-deps --target``). Detection and video ops stay unusable; classification models are enough here.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

_REPO = Path(__file__).resolve().parents[2]
_LIBRARIES: list[torch.library.Library] = []  # kept alive: dropping a Library unregisters its schemas


def _candidates() -> list[Path]:
    paths = [Path(p) for p in os.environ.get("LIGHTNING_COMPRESS_ZOO", "").split(os.pathsep) if p]
    return [*paths, _REPO / ".cache" / "zoo" / "torchvision"]


def _register_schemas() -> None:
    if _LIBRARIES or hasattr(torch.ops.torchvision, "nms"):
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(library)


def _drop_partial_import() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def torchvision() -> ModuleType | None:
    """The ``torchvision`` module, or ``None`` when neither the regular nor an isolated copy imports."""
    try:
        return importlib.import_module("torchvision")
    except Exception:
        _drop_partial_import()
    for path in _candidates():
        if not (path / "torchvision").is_dir():
            continue
        _register_schemas()
        if str(path) not in sys.path:
            sys.path.append(str(path))
        try:
            return importlib.import_module("torchvision")
        except Exception:
            _drop_partial_import()
    return None


def classifier(name: str, num_classes: int = 10) -> torch.nn.Module:
    """A torchvision classification model with random weights (never downloads)."""
    vision = torchvision()
    if vision is None:
        raise RuntimeError("torchvision is not importable; run .ci/run or install it into .cache/zoo/torchvision.")
    return vision.models.get_model(name, weights=None, num_classes=num_classes)


class HuggingFaceLogits(torch.nn.Module):
    """A Hugging Face image classifier called on pixels, returning its logits tensor (as a user's module would)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _hf_configs() -> dict[str, tuple[str, str, dict]]:
    """``name: (model class, config class, config arguments)``: small versions of each family, 10 classes."""
    return {
        "hf_resnet": ("ResNetForImageClassification", "ResNetConfig", dict(
            depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512], embedding_size=32, layer_type="bottleneck")),
        "hf_convnext": ("ConvNextForImageClassification", "ConvNextConfig", dict(
            depths=[1, 1, 2, 1], hidden_sizes=[32, 64, 128, 256])),
        "hf_mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config", dict(image_size=64)),
        "hf_efficientnet": ("EfficientNetForImageClassification", "EfficientNetConfig", dict(
            image_size=64, width_coefficient=1.0, depth_coefficient=0.5, hidden_dim=1280)),  # top_bn = hidden_dim
        "hf_regnet": ("RegNetForImageClassification", "RegNetConfig", dict(
            depths=[1, 1, 2, 1], hidden_sizes=[32, 64, 128, 256], groups_width=16)),
        "hf_swin": ("SwinForImageClassification", "SwinConfig", dict(
            image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4)),
        "hf_vit": ("ViTForImageClassification", "ViTConfig", dict(
            image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=256)),
    }


def hf_classifier(name: str, num_classes: int = 10) -> torch.nn.Module:
    """A small Hugging Face vision classifier built from its config (random weights, nothing downloaded), wrapped in
    :class:`HuggingFaceLogits`; ``name`` is one of ``hf_resnet``, ``hf_convnext``, ``hf_mobilenet_v2``,
    ``hf_efficientnet``, ``hf_regnet``, ``hf_swin``, ``hf_vit``."""
    import transformers

    model_class, config_class, arguments = _hf_configs()[name]
    config = getattr(transformers, config_class)(num_labels=num_classes, **arguments)
    return HuggingFaceLogits(getattr(transformers, model_class)(config))


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random batch norm statistics and affine parameters, and a random classifier where it was initialised to zero
    (Hugging Face zeroes some heads), so that pruned and compacted outputs are compared on non-trivial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                if module.affine:
                    module.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features ** 0.5)
