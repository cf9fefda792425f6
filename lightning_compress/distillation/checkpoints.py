"""Loading a network's weights out of a Lightning checkpoint (or a plain state dict) written by any module."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_compress.utils.checkpoint import RESUME_ADVICE, check_checkpoint

#: What a corrupt ``teacher_checkpoint`` error tells the user to do.
TEACHER_ADVICE = ("Point teacher_checkpoint at another checkpoint of the trained teacher, e.g. an earlier "
                  "'epoch=..' file or its run's 'last.ckpt'")


def find_prefix(state_dict: Mapping[str, Any], network: nn.Module) -> str:
    """The key prefix under which ``state_dict`` holds every entry of ``network.state_dict()`` with the same shapes
    (``""``, ``"backbone."``, ``"student."``, ...); the shortest when several fit.

    Raises:
        ValueError: when no prefix covers all of the network's keys with matching shapes.

    >>> import torch
    >>> net = nn.Linear(2, 2)
    >>> find_prefix({"backbone.weight": torch.zeros(2, 2), "backbone.bias": torch.zeros(2), "other": 0}, net)
    'backbone.'
    """
    reference = network.state_dict()
    first = next(iter(reference))
    candidates = {
        key[: -len(first)] for key in state_dict
        if key.endswith(first) and (key == first or key[: -len(first)].endswith("."))
    }

    def fits(prefix: str) -> bool:
        return all(
            prefix + name in state_dict and getattr(state_dict[prefix + name], "shape", None) == value.shape
            for name, value in reference.items()
        )

    complete = sorted((prefix for prefix in candidates if fits(prefix)), key=len)
    if not complete:
        raise ValueError(
            f"The checkpoint holds no complete set of {type(network).__name__} weights with matching shapes "
            f"(looked for keys ending in {list(reference)[:3]}...); some checkpoint keys: {list(state_dict)[:5]}. A "
            "checkpoint of a run that compacted or quantized the network loads into a fresh model with "
            "lightning_compress.load_compressed(path, model)."
        )
    return complete[0]


def load_network_weights(network: nn.Module, path: str | Path, prefix: str | None = None, *,
                         what: str = "Checkpoint", advice: str = RESUME_ADVICE) -> nn.Module:
    """Load ``network``'s weights from a checkpoint file (a trusted file: it is unpickled).

    The file may be a Lightning checkpoint (its ``state_dict``) of any LightningModule that holds the network
    (``ClassifierModule`` stores it under ``backbone.``, :class:`~.module.DistillationModule` its student under
    ``student.``) or a plain state dict. ``prefix=None`` finds the prefix with :func:`find_prefix`.

    Args:
        network: the network whose weights are replaced.
        path: the checkpoint file.
        prefix: the key prefix of the network's entries; ``None`` finds it.
        what: how the file is named in an error message (e.g. ``"teacher_checkpoint"``).
        advice: what the error message tells the user to do instead.

    Returns:
        ``network``, loaded strictly.

    Raises:
        lightning_compress.utils.CheckpointError: (a ``ValueError``) the file is missing, empty, truncated or
            corrupt, or holds no dictionary; nothing is loaded then.
        ValueError: the file holds no complete set of the network's weights.
    """
    checkpoint = check_checkpoint(path, require_state_dict=False, advice=advice, what=what)
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} holds neither a Lightning checkpoint nor a state dict.")
    prefix = find_prefix(state, network) if prefix is None else prefix
    network.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
    missing = [k for k in network.state_dict() if prefix + k not in state]
    if missing:
        raise ValueError(f"{str(path)!r} has no weights under prefix {prefix!r} for {missing[:5]}.")
    return network
