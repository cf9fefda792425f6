"""Reference runs a compression run is judged against: the teacher, trained first, and the network trained alone.

:func:`prepare_references` trains each reference once as a :class:`~lightning_compress.demo.ClassifierModule`
(cross-entropy, the compression run's optimizer settings, the same data module) into ``directory/<name>/``, with a
:class:`~lightning_compress.CompressionReport` there. A later call with the same architecture, initial weights,
data module, epochs, seed and optimizer settings reuses the files, so a resumed or repeated run does not train them
again. The teacher's trained weights go into the compression run's teacher; the reports become the references of
its ``CompressionReport`` (the table that compares the compressed network with the teacher and with the same
network trained alone).

The random generators, deterministic mode and the seeding environment variables are saved before and restored
after, so the compression run starts from the same state whether the references were trained now or loaded.
Under a launcher that starts every rank at once (torchrun, SLURM) rank zero trains and the others wait for its
files; Lightning's own ``ddp`` launcher starts the other ranks after the main process prepared them.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

__all__ = ["References", "prepare_references"]


@dataclass
class References:
    """Which reference runs to prepare, and where.

    Args:
        directory: where the references are written (``teacher/`` and ``student_alone/``, or ``uncompressed/``
            when the LightningModule has no teacher).
        teacher_epochs: epochs to train the teacher; ``0`` leaves the teacher as it is (e.g. loaded from
            ``teacher_checkpoint``) and prepares no teacher reference.
        alone_epochs: epochs to train the compressed network alone (``None``: the compression run's
            ``max_epochs``); ``0`` skips this reference.
        seed: seed of the reference runs.
    """

    directory: str = "runs/references"
    teacher_epochs: int = 20
    alone_epochs: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("teacher_epochs", "alone_epochs", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"references.{name} must be a non-negative integer, got {value!r}.")


_ENVIRONMENT = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")  # what seeding and determinism set


@contextmanager
def _preserved_global_state() -> Iterator[None]:
    """Random generators (CUDA too), deterministic mode and the environment variables Lightning's seeding and
    ``deterministic=True`` set: as they were, whatever the reference runs did."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    environment = {name: os.environ.get(name) for name in _ENVIRONMENT}
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _fingerprint(network: nn.Module, datamodule: pl.LightningDataModule, epochs: int, seed: int,
                 settings: dict[str, Any]) -> dict[str, Any]:
    state = network.state_dict()
    shapes = {name: list(t.shape) for name, t in state.items()}
    checksum = sum(float(t.double().abs().sum()) for t in state.values() if t.is_floating_point())
    data = {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "hparams": {k: repr(v) for k, v in dict(getattr(datamodule, "hparams", {}) or {}).items()}}
    return {"architecture": repr(network), "shapes": shapes, "initial_checksum": round(checksum, 6),
            "data": data, "epochs": epochs, "seed": seed, "settings": settings}


def _is_first_process() -> bool:
    """Rank zero, or a process no launcher started (launchers set ``RANK`` / ``LOCAL_RANK`` before the script)."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _wait_for(record: Path, fingerprint: dict[str, Any], timeout: float = 3600.0) -> None:
    """Other ranks of a launcher that starts them all at once (torchrun, SLURM) wait for rank zero's reference."""
    deadline = time.monotonic() + timeout
    while not (record.is_file() and json.loads(record.read_text()) == fingerprint):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for rank zero to prepare the reference {record.parent}.")
        time.sleep(1.0)


def _optimizer_settings(module: pl.LightningModule) -> dict[str, Any]:
    names = {"optimizer": "optimizer_name", "lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum",
             "lr_scheduler": "lr_scheduler_name"}
    return {key: getattr(module, attr) for key, attr in names.items() if hasattr(module, attr)}


def _train_alone(network: nn.Module, datamodule: pl.LightningDataModule, directory: Path, epochs: int, seed: int,
                 settings: dict[str, Any]) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_compress.demo import ClassifierModule
    from lightning_compress.report import CompressionReport

    pl.seed_everything(seed, verbose=False)
    network.train()
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    module = ClassifierModule(network, num_classes=getattr(datamodule, "num_classes", 10), **settings)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True,
                         logger=TensorBoardLogger(str(directory), name="", version=""),
                         callbacks=[CompressionReport(output_dir=str(directory))], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule)
    torch.save(network.state_dict(), directory / "weights.pt")


def _reference(name: str, network: nn.Module, datamodule: pl.LightningDataModule, root: Path, epochs: int,
               seed: int, settings: dict[str, Any]) -> Path:
    """Train ``network`` (a copy) alone unless ``root/name`` already holds this exact run; returns its directory."""
    directory = root / name
    fingerprint = _fingerprint(network, datamodule, epochs, seed, settings)
    record = directory / "reference.json"
    done = record.is_file() and json.loads(record.read_text()) == fingerprint
    if not done or not (directory / "compression_report.json").is_file() or not (directory / "weights.pt").is_file():
        if not _is_first_process():
            _wait_for(record, fingerprint)
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        record.unlink(missing_ok=True)
        _train_alone(copy.deepcopy(network), datamodule, directory, epochs, seed, settings)
        record.write_text(json.dumps(fingerprint, indent=2) + "\n")
    return directory


def _report_callbacks(trainer: pl.Trainer) -> list[Any]:
    from lightning_compress.report import CompressionReport

    return [c for c in trainer.callbacks if isinstance(c, CompressionReport)]  # type: ignore[attr-defined]


def prepare_references(settings: References, trainer: pl.Trainer, module: pl.LightningModule,
                       datamodule: pl.LightningDataModule) -> dict[str, Path]:
    """Train (or reuse) the reference runs of a compression run and wire them in; returns ``{name: directory}``.

    The teacher reference (when ``module`` has ``teachers``, as a
    :class:`~lightning_compress.DistillationModule` does) trains a copy of the first teacher for
    ``teacher_epochs`` and loads the result into it; the alone reference trains a copy of
    ``module.compression_target`` as it is now (before any compression) for ``alone_epochs``. Each report is set
    as a reference of every ``CompressionReport`` among ``trainer.callbacks``.

    Raises:
        ValueError: the module has several teachers (train them separately and use ``teacher_checkpoint``).
    """
    from lightning_compress.utils import compression_target

    root = Path(settings.directory)
    optimizer = _optimizer_settings(module)
    found: dict[str, Path] = {}
    with _preserved_global_state():
        teachers = getattr(module, "teachers", None)
        if teachers is not None and settings.teacher_epochs > 0:
            if len(teachers) != 1:
                raise ValueError(f"references train one teacher; this module has {len(teachers)}. Give each its "
                                 "trained weights with teacher_checkpoint and set references.teacher_epochs: 0.")
            found["teacher"] = _reference("teacher", teachers[0], datamodule, root, settings.teacher_epochs,
                                          settings.seed, optimizer)
            state = torch.load(found["teacher"] / "weights.pt", map_location="cpu", weights_only=True)
            teachers[0].load_state_dict(state)
        alone_epochs = trainer.max_epochs if settings.alone_epochs is None else settings.alone_epochs
        if alone_epochs is None or alone_epochs < 0:
            raise ValueError(f"references.alone_epochs is not set and the trainer's max_epochs is {alone_epochs!r} "
                             "(training limited by steps or time): give references.alone_epochs explicitly.")
        if alone_epochs:
            name = "student_alone" if teachers is not None else "uncompressed"
            found[name] = _reference(name, compression_target(module), datamodule, root, int(alone_epochs),
                                     settings.seed, optimizer)
    for report in _report_callbacks(trainer):
        for name, directory in found.items():
            report.set_reference(name, directory / "compression_report.json")
    return found

