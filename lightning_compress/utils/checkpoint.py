"""Loading a checkpoint file with a clear error when it is missing, empty, truncated or corrupt.

A run killed while writing (or a full disk, or an incomplete copy) can leave a checkpoint that ``torch.load``
rejects with messages such as ``PytorchStreamReader failed reading zip archive: failed finding central directory``,
``EOFError: Ran out of input`` or ``UnpicklingError: invalid load key``. :func:`check_checkpoint` turns each of them
into a :class:`CheckpointError` that names the file, its size and the underlying error, says that nothing was loaded
or overwritten, and points to the other checkpoints next to it. It only reads the file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "check_checkpoint"]

#: What to do instead, appended to every :class:`CheckpointError` unless the caller gives its own advice.
RESUME_ADVICE = "Resume from another checkpoint instead, e.g. an earlier 'epoch=..' file or the run's 'last.ckpt'"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, empty, truncated, corrupt, or not a Lightning checkpoint."""


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "size unknown"


def _diagnosis(path: Path, error: Exception) -> str:
    if isinstance(error, FileNotFoundError) or not path.exists():
        return "the file does not exist"
    if path.is_dir():
        return "it is a directory, not a file"
    if isinstance(error, PermissionError):
        return "the file cannot be read (permission denied)"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes): corrupt, e.g. a save that was interrupted"
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):
        return "the file is truncated or corrupt (a damaged zip archive: an interrupted save, a full disk or an " \
               "incomplete copy)"
    if isinstance(error, (ImportError, AttributeError)):
        return "the file refers to code that cannot be imported here (a class or module renamed or missing)"
    return "the file is corrupt or not a PyTorch checkpoint"


def _siblings(path: Path) -> str:
    try:
        others = sorted(p.name for p in path.parent.glob("*.ckpt") if p.is_file() and p.name != path.name)
    except OSError:
        return ""
    if not others:
        return ""
    shown = ", ".join(repr(name) for name in others[:8]) + (", ..." if len(others) > 8 else "")
    return f" (next to it: {shown})"


def _error(path: Path, problem: str, advice: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{what} '{path}' ({_size(path)}) cannot be used: {problem}. Nothing was loaded and no file was "
        f"changed or overwritten. {advice}{_siblings(path)}."
    )


def _load(path: Path, mmap: bool) -> Any:
    if mmap and path.is_file() and zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return torch.load(path, map_location="cpu", weights_only=False)


def check_checkpoint(
    path: str | Path,
    *,
    require_state_dict: bool = True,
    advice: str = RESUME_ADVICE,
    what: str = "Checkpoint",
    mmap: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint on CPU (a trusted file: it is unpickled) and return it, or raise a clear error.

    Args:
        path: the checkpoint file.
        require_state_dict: require a Lightning checkpoint (a dictionary with a ``state_dict`` entry); with
            ``False`` any dictionary is accepted (a plain ``state_dict`` saved with ``torch.save``).
        advice: the sentence that tells the user what to do instead (default: resume from another checkpoint).
        what: how the file is named in the message (``"Checkpoint"``, ``"teacher_checkpoint"``).
        mmap: map the tensors' storage instead of reading it (``torch.load(mmap=True)``), for a check that is
            followed by the real load: the archive's directory and every record's header are still read, so
            truncated, empty and garbage files fail the same way, at a fraction of the cost for a large file.
            Files in the legacy (non-zip) format are read whole.

    Returns:
        The loaded dictionary.

    Raises:
        CheckpointError: a ``ValueError`` naming the path, the file size, the underlying error (chained as
            ``__cause__``) and the advice, when the file is missing, empty, truncated or corrupt, when it holds
            something other than a dictionary, or (with ``require_state_dict``) a dictionary without
            ``state_dict``.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     path = os.path.join(directory, "last.ckpt")
    ...     open(path, "wb").close()
    ...     try:
    ...         check_checkpoint(path)
    ...     except CheckpointError as error:
    ...         print("empty" in str(error), "0 bytes" in str(error), "Nothing was loaded" in str(error))
    True True True
    """
    path = Path(path)
    try:
        checkpoint = _load(path, mmap)
    except Exception as error:
        underlying = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
        raise _error(path, f"{_diagnosis(path, error)} [{underlying}]", advice, what) from error
    if not isinstance(checkpoint, Mapping):
        raise _error(path, f"it holds a {type(checkpoint).__name__}, not a checkpoint dictionary", advice, what)
    if require_state_dict and "state_dict" not in checkpoint:
        keys = list(checkpoint)[:6]
        raise _error(path, f"it is a dictionary without 'state_dict' (keys {keys}), not a Lightning checkpoint",
                     advice, what)
    return checkpoint if isinstance(checkpoint, dict) else dict(checkpoint)
