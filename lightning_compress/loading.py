"""Loading a compressed checkpoint into a plain model: :func:`load_compressed`.

A checkpoint of a run that compacted its network (``FilterPruning`` with ``compact_at_schedule_end`` or
``compact_every_epoch``) holds smaller tensors than a fresh model of the user's class, and one that quantized it
holds quantizer entries; ``model.load_state_dict`` then fails with size mismatches or unexpected keys. The run's
callbacks recorded what they did (the compactions, and how each layer was quantized), so a fresh model can be
brought to the same structure first and then take the weights strictly.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from lightning_compress.graph.compact import replay_compactions
from lightning_compress.quantization.quantizers import QuantSpec, attach_quantizer, float_state_dict
from lightning_compress.utils.checkpoint import check_checkpoint

__all__ = ["load_compressed"]


def _callback_states(checkpoint: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [state for state in checkpoint.get("callbacks", {}).values() if isinstance(state, dict) and key in state]


def _network_state(state_dict: dict[str, Any], prefix: str | None) -> dict[str, Any]:
    if prefix is None:
        for candidate in ("student.", "backbone.", "model.", "network.", ""):
            if any(key.startswith(candidate) for key in state_dict):
                prefix = candidate
                break
    prefix = prefix or ""
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def load_compressed(checkpoint_path: str | Path, model: nn.Module, *, prefix: str | None = None,
                    quantized: bool = True) -> nn.Module:
    """Bring a fresh ``model`` (the user's class, as built before training) to the structure a compressed run left
    and load that run's weights into it, strictly; returns ``model`` (changed in place).

    The compactions that ``FilterPruning`` recorded are replayed (same filters removed, same shapes), then the
    quantizers that ``QuantizationAwareTraining`` attached are attached again with their settings (and their
    scales come with the weights), unless ``quantized=False``: then the float weights are loaded alone, which is the
    network QAT trained, without fake quantization.

    Args:
        checkpoint_path: a Lightning checkpoint of the compression run (e.g. ``last.ckpt``); a trusted file.
        model: a freshly built network of the compressed one's architecture (a ``DistillationModule``'s student, a
            ``ClassifierModule``'s backbone, or your LightningModule's ``compression_target``).
        prefix: the key prefix of the network in the checkpoint's ``state_dict`` (default: ``student.``,
            ``backbone.``, ``model.``, ``network.`` or none, the first present).
        quantized: attach the recorded quantizers (``False``: load the float weights only).

    Raises:
        CheckpointError: a missing, truncated or corrupt file.
        RuntimeError: the weights still do not fit (another architecture).
    """
    checkpoint = check_checkpoint(checkpoint_path)
    state = _network_state(checkpoint.get("state_dict", checkpoint), prefix)
    for pruning in _callback_states(checkpoint, "events"):
        if pruning.get("events"):
            replay_compactions(model, pruning["events"], pruning["example"], pruning.get("layernorm_statistics", "all"))
    recorded = [s for s in _callback_states(checkpoint, "specs") if s.get("attached", True)]
    if quantized and recorded:
        modules = dict(model.named_modules())
        for name, spec in recorded[-1]["specs"].items():
            layer = attach_quantizer(modules[name], QuantSpec(**spec))
            layer.input_quantizer.unsigned = bool(recorded[-1].get("unsigned", {}).get(name, spec["unsigned"]))
            for quantizer in (layer.input_quantizer, layer.weight_quantizer):
                quantizer.enabled, quantizer.calibrating, quantizer.observe = True, False, False
    elif quantized and any("_quantizer." in key for key in state):
        warnings.warn(f"{checkpoint_path}: quantizer entries but no recorded quantizer settings (a checkpoint of an "
                      "older version); loading the float weights only", stacklevel=2)
        state = float_state_dict(state)
    else:
        state = float_state_dict(state)
    model.load_state_dict(state, strict=True)
    return model
