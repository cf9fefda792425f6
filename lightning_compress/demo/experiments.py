"""Small pieces the example scripts share: their sizes (full or quick), a quiet single-thread context, seeded
construction, a fit-and-test run on digits, mean ± std formatting and publishing a results table."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress.demo.data import DigitsDataModule


class ExampleSettings:
    """An example's sizes: the full run or ``quick`` (what the tests run: one seed, one epoch, two batches).

    ``teacher_epochs`` and ``epochs`` are the full run's (quick: 1) or ``(quick, full)``; every other keyword is
    ``(quick value, full value)`` and becomes an attribute.

    >>> settings = ExampleSettings(True, epochs=(2, 30), latency_runs=(3, 20))
    >>> settings.seeds, settings.epochs, settings.limit, settings.latency_runs
    ([0], 2, 2, 3)
    """

    def __init__(self, quick: bool, *, seeds: int = 3, teacher_epochs: int | tuple[int, int] = 20,
                 epochs: int | tuple[int, int] = 30, **sizes: tuple[Any, Any]) -> None:
        self.quick = quick
        self.seeds = [0] if quick else list(range(seeds))
        self.limit: int | None = 2 if quick else None
        for name, value in {"teacher_epochs": teacher_epochs, "epochs": epochs, **sizes}.items():
            quick_value, full_value = value if isinstance(value, tuple) else (1, value)
            setattr(self, name, quick_value if quick else full_value)


def example_parser(description: str | None) -> argparse.ArgumentParser:
    """The command line of an example: its docstring as ``--help``, and ``--quick`` (what the tests run)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, a few batches (what the tests run)")
    return parser


_QUIET_WARNINGS = (".*module\\(s\\) in eval mode.*", ".*does not have many workers.*",
                   ".*number of training batches.*")


@contextmanager
def quiet_single_thread() -> Iterator[None]:
    """One torch thread (tiny models: on two busy cores a second thread made fits 15x slower), fewer Lightning
    messages and warnings; everything restored on exit (the tests run the examples inside the pytest process)."""
    threads = torch.get_num_threads()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for message in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message)
        torch.set_num_threads(1)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` right after seeding, so that every model of a seed starts from the same weights."""
    pl.seed_everything(seed, verbose=False)
    return build()


def fit_and_test(module: pl.LightningModule, seed: int, epochs: int, *, limit: int | None = None,
                 split: str = "test", callbacks: Sequence[pl.Callback] = (),
                 datamodule: pl.LightningDataModule | None = None) -> dict[str, float]:
    """Train ``module`` on digits (or ``datamodule``) and return the logged metrics of ``split`` (test or val)."""
    trainer = pl.Trainer(max_epochs=epochs, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         deterministic=True, limit_train_batches=limit, limit_val_batches=limit,
                         limit_test_batches=limit)
    datamodule = datamodule or DigitsDataModule(seed=seed)
    trainer.fit(module, datamodule)
    evaluate = trainer.test if split == "test" else trainer.validate
    return {key: float(value) for key, value in evaluate(module, datamodule, verbose=False)[0].items()}


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 4) -> str:
    """``"mean ± std"`` (sample standard deviation; 0 for one value).

    >>> mean_std([0.9, 1.0])
    '0.9500 ± 0.0707'
    """
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def write_results(name: str, table: str, rows: dict[str, Any] | None = None) -> Path:
    """Write ``runs/<name>/results.md`` (and ``results.json`` with the per-seed rows); returns the folder."""
    output = Path("runs") / name
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.md").write_text(table + "\n")
    if rows is not None:
        (output / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return output


def publish(name: str, table: str, rows: dict[str, Any] | None = None) -> str:
    """Write the table (and the rows) under ``runs/<name>/`` (:func:`write_results`), print it, return it."""
    write_results(name, table, rows)
    print(table)
    return table


def over_seeds(run_seed: Callable[[int], dict[str, float]], seeds: Sequence[int]) -> dict[str, list[float]]:
    """``{row: [value per seed]}`` from ``run_seed(seed) -> {row: value}``, run quietly on one thread."""
    rows: dict[str, list[float]] = {}
    with quiet_single_thread():
        for seed in seeds:
            for row, value in run_seed(seed).items():
                rows.setdefault(row, []).append(value)
    return rows


def paired_difference(runs: Sequence[float], baseline: Sequence[float]) -> tuple[str, str]:
    """Per-seed differences to ``baseline`` in points as ``"mean ± std"`` and a verdict.

    >>> paired_difference([0.95, 0.97], [0.94, 0.95])
    ('+1.50 ± 0.71', 'gain on every seed')
    """
    differences = [100 * (a - b) for a, b in zip(runs, baseline, strict=True)]
    if len(differences) < 2:
        verdict = "(one seed)"
    elif all(d > 0 for d in differences):
        verdict = "gain on every seed"
    elif all(d < 0 for d in differences):
        verdict = "loss on every seed"
    else:
        verdict = "mixed: no clear effect"
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    return f"{statistics.mean(differences):+.2f} ± {spread:.2f}", verdict
