"""Which soft/hard weights and temperature to use by default: a grid on digits and on the shapes workload.

    python examples/distillation_defaults.py            # 2 seeds, both workloads (20-40 minutes on 2 CPU cores)
    python examples/distillation_defaults.py --quick    # one seed, a couple of batches (what the tests run)

Per workload and seed, the teacher ``ResidualCNN(width=16)`` is trained with the user's recipe (Adam, lr 3e-3, no
scheduler, as a user's own LightningModule would), then the student ``slim_copy(teacher, 0.25)`` (width 4) from
the same initial weights: alone (cross-entropy) and with ``DistillationModule`` under each setting of the grid
``(soft_weight, hard_weight, temperature)``, all with that same recipe passed as ``optimizer=``. Hinton et al. (2015)
weigh the soft term by ``T^2`` so that its gradients keep their scale across temperatures; the library does too.

The table reports test accuracy, mean ± std over the seeds, the paired difference to the student alone (same seed:
same split, data order and initialisation) and a verdict. The library's default is the first row; it is kept
unless another setting beats it on both workloads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress.demo import ClassifierModule, DigitsDataModule, ResidualCNN
from lightning_compress.demo.experiments import (
    ExampleSettings,
    example_parser,
    fit_and_test,
    mean_std,
    over_seeds,
    paired_difference,
    publish,
    seeded,
)
from lightning_compress.distillation import DistillationModule, slim_copy

#: The user's recipe, as a callable (LightningCLI's ``OptimizerCallable``), for every model of the table.
RECIPE: dict[str, Any] = {"optimizer": functools.partial(torch.optim.Adam, lr=3e-3), "lr_scheduler": None}
#: ``(soft_weight, hard_weight, temperature)``; the first is the library's default.
GRID: list[tuple[float, float, float]] = [(0.9, 0.1, 4.0), (0.5, 0.5, 4.0), (0.5, 0.5, 2.0), (0.9, 0.1, 2.0),
                                          (0.7, 0.3, 4.0), (0.5, 0.5, 1.0)]


def workloads() -> dict[str, Callable[[int], pl.LightningDataModule]]:
    """``{name: seed -> datamodule}``: digits, and the shapes workload where it is available."""
    found: dict[str, Callable[[int], pl.LightningDataModule]] = {"digits": lambda seed: DigitsDataModule(seed=seed)}
    try:
        from lightning_compress.demo import ShapesDataModule  # type: ignore[attr-defined]
    except ImportError:
        return found
    found["shapes"] = lambda seed: ShapesDataModule(seed=seed)
    return found


def teacher_network() -> nn.Module:
    return ResidualCNN(width=16)


def student_network() -> nn.Module:
    return slim_copy(teacher_network(), 0.25)


def row_name(setting: tuple[float, float, float]) -> str:
    soft, hard, temperature = setting
    default = " (default)" if setting == GRID[0] else ""
    return f"KD soft {soft:g} / hard {hard:g}, T {temperature:g}{default}"


def run_seed(seed: int, workload: Callable[[int], pl.LightningDataModule], settings: ExampleSettings,
             grid: list[tuple[float, float, float]]) -> dict[str, float]:
    """Test accuracy of the teacher, the student alone and every setting of ``grid`` for one seed."""

    def fit(module: pl.LightningModule, epochs: int) -> float:
        return fit_and_test(module, seed, epochs, limit=settings.limit, datamodule=workload(seed))["test/acc"]

    teacher = seeded(seed, teacher_network)
    results = {"teacher": fit(ClassifierModule(teacher, **RECIPE), settings.teacher_epochs)}
    teacher.eval()
    results["student alone"] = fit(ClassifierModule(seeded(seed, student_network), **RECIPE), settings.epochs)
    for setting in grid:
        soft, hard, temperature = setting
        module = DistillationModule(seeded(seed, student_network), teacher, soft_weight=soft, hard_weight=hard,
                                    temperature=temperature, **RECIPE)
        results[row_name(setting)] = fit(module, settings.epochs)
    return results


def table(name: str, rows: dict[str, list[float]], settings: ExampleSettings) -> str:
    lines = [f"{name}: test accuracy, mean ± std over {len(settings.seeds)} seed(s); teacher ResidualCNN(width=16) "
             f"{settings.teacher_epochs} epochs, students slim_copy(teacher, 0.25) {settings.epochs} epochs, all "
             "with Adam lr 3e-3 and no scheduler.", "",
             "| model | test accuracy | vs student alone (points) | verdict |", "|---|---:|---:|---|"]
    for row, runs in rows.items():
        cells = [row, mean_std(runs), "", ""]
        if row.startswith("KD"):
            cells[2:] = paired_difference(runs, rows["student alone"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    parser.add_argument("--workload", action="append", help="digits and/or shapes (default: every one available)")
    args = parser.parse_args(argv)
    settings = ExampleSettings(args.quick, seeds=2, teacher_epochs=(1, 15), epochs=(1, 15))
    grid = GRID[:2] if args.quick else GRID
    available = workloads()
    chosen = args.workload or list(available)
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; available: {sorted(available)}")
    tables = []
    for name in chosen:
        rows = over_seeds(lambda seed, name=name: run_seed(seed, available[name], settings, grid), settings.seeds)
        tables.append(table(name, rows, settings))
    return publish("distillation_defaults", "\n\n".join(tables))


if __name__ == "__main__":
    main()
