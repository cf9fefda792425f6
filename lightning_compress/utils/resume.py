"""``--ckpt_path last`` for the command line: the newest ``last.ckpt`` of the run the config describes.

Lightning's own ``ckpt_path="last"`` looks in the checkpoint directory of the *new* run, which a versioned logger
(``runs/<name>/version_N``) has just created empty, and then starts from scratch with a warning. Here ``last``
means the ``last.ckpt`` of the newest earlier version (or of the ``ModelCheckpoint`` ``dirpath`` the config
names), and the logger is pointed at that version, so the resumed run continues in the same directory and
TensorBoard shows one run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["ResumeError", "find_last_checkpoint"]

_LOGGER_DEFAULT_NAMES = {"TensorBoardLogger": "lightning_logs", "CSVLogger": "lightning_logs"}


class ResumeError(ValueError):
    """``--ckpt_path last`` found nothing to resume from."""


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    value = namespace.get(key, default) if hasattr(namespace, "get") else getattr(namespace, key, default)
    return default if value is None else value


def _checkpoint_dirpaths(trainer: Any) -> list[Path]:
    callbacks = _get(trainer, "callbacks", []) or []
    paths = []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if str(_get(callback, "class_path", "")).endswith("ModelCheckpoint"):
            dirpath = _get(_get(callback, "init_args", {}), "dirpath")
            if dirpath:
                paths.append(Path(dirpath))
    return paths


def _versions(root: Path) -> list[tuple[int, Path]]:
    found = []
    for candidate in root.glob("version_*") if root.is_dir() else ():
        match = re.fullmatch(r"version_(\d+)", candidate.name)
        if match and (candidate / "checkpoints" / "last.ckpt").is_file():
            found.append((int(match.group(1)), candidate / "checkpoints" / "last.ckpt"))
    return sorted(found)


def find_last_checkpoint(trainer: Any) -> tuple[Path, int | None]:
    """The checkpoint ``--ckpt_path last`` resumes from, and the logger version to continue (``None``: keep it).

    Args:
        trainer: the parsed ``trainer`` section (its ``callbacks``, ``logger`` and ``default_root_dir``).

    Raises:
        ResumeError: no ``last.ckpt`` exists where this config writes it (the message names where it looked).
    """
    for dirpath in _checkpoint_dirpaths(trainer):
        if (dirpath / "last.ckpt").is_file():
            return dirpath / "last.ckpt", None
    looked = [str(d / "last.ckpt") for d in _checkpoint_dirpaths(trainer)]
    if not looked:
        logger = _get(trainer, "logger", True)
        root_dir = Path(_get(trainer, "default_root_dir", "."))
        if logger is True or logger is None:
            save_dir, name = root_dir, "lightning_logs"
        elif logger is False:
            save_dir, name = root_dir, ""
        else:
            init = _get(logger, "init_args", {})
            kind = str(_get(logger, "class_path", "")).rsplit(".", 1)[-1]
            save_dir = Path(_get(init, "save_dir", root_dir))
            name = _get(init, "name", _LOGGER_DEFAULT_NAMES.get(kind, "lightning_logs"))
        if name:
            versions = _versions(save_dir / name)
            if versions:
                return versions[-1][1], versions[-1][0]
            looked.append(str(save_dir / name / "version_*" / "checkpoints" / "last.ckpt"))
        else:
            looked.append(str(root_dir / "checkpoints" / "last.ckpt"))
            if (root_dir / "checkpoints" / "last.ckpt").is_file():
                return root_dir / "checkpoints" / "last.ckpt", None
    raise ResumeError(f"--ckpt_path last: no checkpoint to resume from at {' or '.join(looked)}. Run without "
                      "--ckpt_path to start, or give the checkpoint's path.")
