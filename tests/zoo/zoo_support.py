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
