"""Reference runs a compression run is judged against: the teacher, trained first, and the network trained alone.

:func:`prepare_references` trains each reference once as a :class:`~lightning_compress.demo.ClassifierModule`
(cross-entropy, the compression run's optimizer settings, the same data module, as many classes as the network
outputs) into ``directory/<name>/``, with a :class:`~lightning_compress.CompressionReport` there that measures with
the compression run's report settings (batch size, runs, warm-up, threads), so that latencies compare. A later call
with the same architecture, initial weights, data module, epochs, seed, optimizer and report settings reuses the
files, so a resumed or repeated run does not train them again. The teacher's trained weights go into the
compression run's teacher; the reports become the references of its ``CompressionReport`` (the table that compares
the compressed network with the teacher and with the same network trained alone).

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
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_compress.utils.optim import describe_recipe

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
                 settings: dict[str, Any], report: dict[str, Any] | None = None) -> dict[str, Any]:
    state = network.state_dict()
    shapes = {name: list(t.shape) for name, t in state.items()}
    checksum = sum(float(t.double().abs().sum()) for t in state.values() if t.is_floating_point())
    data = {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "hparams": {k: repr(v) for k, v in dict(getattr(datamodule, "hparams", {}) or {}).items()}}
    return {"architecture": repr(network), "shapes": shapes, "initial_checksum": round(checksum, 6),
            "data": data, "epochs": epochs, "seed": seed,
            "settings": {key: describe_recipe(value) for key, value in settings.items()}, "report": report}


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
    """The training recipe of ``module`` (a library module's optimizer and schedule, callables included), which the
    reference runs train with."""
    names = {"optimizer": "optimizer_recipe", "lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum",
             "lr_scheduler": "lr_scheduler_recipe"}
    return {key: getattr(module, attr) for key, attr in names.items() if hasattr(module, attr)}


def _declared_classes(datamodule: pl.LightningDataModule, module: pl.LightningModule) -> int | None:
    """``num_classes`` of the data module, else of the compression module (attribute or hyperparameter)."""
    for source in (datamodule, module, dict(getattr(module, "hparams", {}) or {})):
        value = source.get("num_classes") if isinstance(source, dict) else getattr(source, "num_classes", None)
        if value is not None:
            return int(value)
    return None


def _example_inputs(datamodule: pl.LightningDataModule) -> torch.Tensor:
    """The inputs of the first training batch, the data module prepared and set up for ``fit`` first."""
    from lightning_compress.utils.data import first_tensor

    datamodule.prepare_data()
    datamodule.setup("fit")
    return first_tensor(next(iter(datamodule.train_dataloader())))


def _class_count(network: nn.Module, inputs: torch.Tensor, declared: int | None) -> int:
    """The classes a reference run trains ``network`` on: the width of its ``(B, C)`` output on ``inputs``, which
    must agree with the ``declared`` ``num_classes``.

    Raises:
        ValueError: the output is not ``(B, C)`` logits with ``C >= 2``, or ``C`` differs from ``declared``.
    """
    from lightning_compress.utils.modes import eval_mode

    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    with eval_mode(network), torch.no_grad():
        output = network(inputs.to(device))
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    if shape is None or len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"references train {type(network).__name__} as a classifier, which needs (batch, classes) "
                         f"logits with at least 2 classes; its output on a training batch is "
                         f"{shape if shape is not None else type(output).__name__}.")
    if declared is not None and declared != shape[1]:
        raise ValueError(f"references: num_classes is {declared} but {type(network).__name__} outputs {shape[1]} "
                         "classes; make them agree.")
    return shape[1]


def _report_settings(trainer: pl.Trainer) -> dict[str, Any] | None:
    """Latency settings of the compression run's first ``CompressionReport``, for its references to match."""
    reports = _report_callbacks(trainer)
    if not reports:
        return None
    return {key: getattr(reports[0], key) for key in ("batch_size", "latency_runs", "warmup", "num_threads")}


@dataclass
class _Run:
    """One reference run: what it trains, where, and the record that says it was done."""

    name: str
    network: nn.Module
    directory: Path
    epochs: int
    fingerprint: dict[str, Any]

    def done(self) -> bool:
        record = self.directory / "reference.json"
        return (record.is_file() and json.loads(record.read_text()) == self.fingerprint
                and (self.directory / "compression_report.json").is_file()
                and (self.directory / "weights.pt").is_file())


def _train_alone(run: _Run, datamodule: pl.LightningDataModule, seed: int, settings: dict[str, Any],
                 num_classes: int, report: dict[str, Any] | None, progress: bool = False) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_compress.demo import ClassifierModule
    from lightning_compress.report import CompressionReport

    network = copy.deepcopy(run.network)
    pl.seed_everything(seed, verbose=False)
    network.train()
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    module = ClassifierModule(network, num_classes=num_classes, **settings)
    callback = CompressionReport(output_dir=str(run.directory), **(report or {}))
    trainer = pl.Trainer(max_epochs=run.epochs, accelerator="cpu", devices=1, deterministic=True,
                         logger=TensorBoardLogger(str(run.directory), name="", version="", default_hp_metric=False),
                         callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(module, datamodule)
    accuracy = (callback.report or {}).get("accuracy")
    rank_zero_info(f"references: {run.name} trained in {time.perf_counter() - started:.0f} s"
                   + (f", val accuracy {accuracy:.4f}" if accuracy is not None else ""))
    torch.save(network.state_dict(), run.directory / "weights.pt")


def _prepare(runs: list[_Run], datamodule: pl.LightningDataModule, module: pl.LightningModule, seed: int,
             settings: dict[str, Any], report: dict[str, Any] | None, progress: bool = False) -> None:
    """Train the runs not done yet (rank zero; the others wait), every class count checked before anything is
    written; say what is reused and what is trained."""
    for run in runs:
        if run.done():
            rank_zero_info(f"references: reusing {run.name} from {run.directory} (same network, initial weights, "
                           "data, epochs, seed and recipe)")
    pending = [run for run in runs if not run.done()]
    if not pending:
        return
    if not _is_first_process():
        for run in pending:
            _wait_for(run.directory / "reference.json", run.fingerprint)
        return
    inputs, declared = _example_inputs(datamodule), _declared_classes(datamodule, module)
    classes = {run.name: _class_count(run.network, inputs, declared) for run in pending}
    for index, run in enumerate(pending, 1):
        parameters = sum(p.numel() for p in run.network.parameters())
        rank_zero_info(f"references ({index}/{len(pending)}): training {run.name}, {type(run.network).__name__} "
                       f"({parameters:,} parameters), for {run.epochs} epochs into {run.directory}; later runs "
                       "reuse it while nothing changes")
        run.directory.mkdir(parents=True, exist_ok=True)
        (run.directory / "reference.json").unlink(missing_ok=True)
        _train_alone(run, datamodule, seed, settings, classes[run.name], report, progress)
        (run.directory / "reference.json").write_text(json.dumps(run.fingerprint, indent=2) + "\n")


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
        ValueError: the module has several teachers (train them separately and use ``teacher_checkpoint``), or a
            network to train does not output ``(batch, classes)`` logits agreeing with a ``num_classes`` of the data
            module or module; raised before anything is written.
    """
    from lightning_compress.utils import compression_target

    root = Path(settings.directory)
    optimizer, report = _optimizer_settings(module), _report_settings(trainer)
    teachers = getattr(module, "teachers", None)
    planned: list[tuple[str, nn.Module, int]] = []
    if teachers is not None and settings.teacher_epochs > 0:
        if len(teachers) != 1:
            raise ValueError(f"references train one teacher; this module has {len(teachers)}. Give each its "
                             "trained weights with teacher_checkpoint and set references.teacher_epochs: 0.")
        planned.append(("teacher", teachers[0], settings.teacher_epochs))
    alone_epochs = trainer.max_epochs if settings.alone_epochs is None else settings.alone_epochs
    if alone_epochs is None or alone_epochs < 0:
        raise ValueError(f"references.alone_epochs is not set and the trainer's max_epochs is {alone_epochs!r} "
                         "(training limited by steps or time): give references.alone_epochs explicitly.")
    if alone_epochs:
        planned.append(("student_alone" if teachers is not None else "uncompressed", compression_target(module),
                        int(alone_epochs)))
    runs = [_Run(name, network, root / name, epochs,
                 _fingerprint(network, datamodule, epochs, settings.seed, optimizer, report))
            for name, network, epochs in planned]
    with _preserved_global_state():
        _prepare(runs, datamodule, module, settings.seed, optimizer, report,
                 progress=getattr(trainer, "progress_bar_callback", None) is not None)
    if teachers is not None and runs and runs[0].name == "teacher":
        state = torch.load(runs[0].directory / "weights.pt", map_location="cpu", weights_only=True)
        teachers[0].load_state_dict(state)
    found = {run.name: run.directory for run in runs}
    for callback in _report_callbacks(trainer):
        for name, directory in found.items():
            callback.set_reference(name, directory / "compression_report.json")
    return found
