"""Quantized layers that calibration never saw run: the model reads their weight directly.

Real networks call some layers through their parameters instead of their ``forward``: ``nn.MultiheadAttention``
passes ``out_proj.weight`` to ``F.multi_head_attention_forward`` (its ``out_proj`` is a
``NonDynamicallyQuantizableLinear`` that is never called), torchvision's Swin passes ``qkv.weight`` and
``proj.weight`` to ``F.linear``. A fake-quantized ``forward`` of such a layer never runs, so its input quantizer sees
no data. Rather than leave a quantizer with ``amax = 0`` that claims the layer is int8, such layers go back to float
and are named with the reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from lightning_compress.quantization.quantizers import _detach

__all__ = ["UNCALLED_REASON", "release_uncalled", "uncalled_layers"]

UNCALLED_REASON = ("its forward never ran during calibration: the model reads its weight directly (F.linear(x, "
                   "layer.weight), nn.MultiheadAttention's out_proj) or calls it only in training")


def uncalled_layers(layers: Mapping[str, Any]) -> list[str]:
    """Names of quantized layers whose input quantizer saw no data in the calibration that just ran."""
    return [name for name, layer in layers.items() if math.isinf(layer.input_quantizer.min_seen)]


def release_uncalled(layers: dict[str, Any], what: str = "quantization") -> dict[str, str]:
    """Turn the :func:`uncalled_layers` of ``layers`` back to float (removed from ``layers``) and warn; returns
    ``{name: reason}``."""
    released = {name: UNCALLED_REASON for name in uncalled_layers(layers)}
    if released:
        for name in released:
            _detach(layers.pop(name))
        warnings.warn(f"{what} leaves {sorted(released)} in float: {UNCALLED_REASON}.", stacklevel=2)
    return released
