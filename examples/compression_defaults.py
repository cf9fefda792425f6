"""Pruning with the defaults only, on the shapes workload: does the network recover?

    python examples/compression_defaults.py            # the full table (one seed; 37 min on the busy 2-core dev CPU)
    python examples/compression_defaults.py --quick    # one epoch, a few batches (what the tests run)

The user's network is ``PlainCNN(width=16, image_size=16)`` (three conv-BN-ReLU blocks, flatten, linear) on
``ShapesDataModule`` (dense test accuracy about 89%), trained with one of two recipes: Adam (lr 3e-3) or SGD with
Nesterov momentum 0.9 (lr 0.05), both cosine-annealed, batch 64. With nothing but the sparsity named:

- ``FilterPruning(sparsity=0.4)`` (soft, the default AGP schedule ending ``recovery_epochs`` before the fit, then
  the selection fixed) against the **compact architecture trained from scratch** with the same recipe
  (:func:`lightning_compress.pruning.pruned_architecture`: the same channel counts, fresh weights);
- ``MagnitudePruning(sparsity=0.8)`` against the **dense** network;

each while training from scratch and while fine-tuning the trained dense network for 10 epochs. A second table
varies ``recovery_epochs`` of the filter pruning fine-tune (Adam vs SGD). Each finished run is appended to
``runs/compression_defaults/runs.jsonl`` as it ends; the tables go to ``runs/compression_defaults/results.md``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, PlainCNN, ShapesDataModule
from lightning_compress.demo.experiments import ExampleSettings, example_parser, publish, quiet_single_thread, seeded
from lightning_compress.pruning import pruned_architecture

RECIPES: dict[str, dict[str, Any]] = {
    "Adam": {"optimizer": "adam", "lr": 3e-3},
    "SGD+momentum": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
}
FILTER_RATE, MAGNITUDE_RATE = 0.4, 0.8
OUTPUT = Path("runs") / "compression_defaults"


class Settings(ExampleSettings):
    def __init__(self, quick: bool) -> None:
        super().__init__(quick, seeds=1, epochs=(1, 10), finetune_epochs=(1, 10), recovery=((), (0,)),
                         samples_per_class=(40, 600), recipes=(("Adam",), tuple(RECIPES)))


def network() -> nn.Module:
    return PlainCNN(width=16, image_size=16)


def train(backbone: nn.Module, recipe: str, epochs: int, data: ShapesDataModule, settings: Settings,
          callbacks: list[pl.Callback] | None = None) -> float:
    """Fit ``backbone`` in place with ``recipe`` (no validation), return its test accuracy."""
    module = ClassifierModule(backbone, **RECIPES[recipe])
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks or [], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, deterministic=True, limit_train_batches=settings.limit,
                         limit_test_batches=settings.limit)
    trainer.fit(module, data)
    return float(trainer.test(module, data, verbose=False)[0]["test/acc"])


def runs_of(recipe: str, seed: int, settings: Settings, record: Callable[[dict[str, Any]], None]
            ) -> Iterator[None]:
    """The runs of one recipe, one per ``next()``: the references first, then the defaults, then the recovery
    table (``main`` interleaves the recipes, so a partial run still compares them)."""
    data = ShapesDataModule(seed=seed, samples_per_class=settings.samples_per_class)
    data.setup()
    example = data.train_set.tensors[0][:2]

    def run(row: str, build: Callable[[], nn.Module], epochs: int, callback: pl.Callback | None = None,
            **extra: Any) -> nn.Module:
        start = time.perf_counter()
        backbone = build()
        accuracy = train(backbone, recipe, epochs, data, settings, [callback] if callback else None)
        record({"recipe": recipe, "seed": seed, "row": row, "epochs": epochs, "test_acc": accuracy,
                "seconds": round(time.perf_counter() - start, 1), **extra})
        return backbone

    dense = run("dense", lambda: seeded(seed, network), settings.epochs)
    yield
    run("compact from scratch", lambda: pruned_architecture(seeded(seed, network), FILTER_RATE, example, seed),
        settings.epochs)
    yield
    finetune = settings.finetune_epochs
    run("filter, fine-tune", lambda: copy.deepcopy(dense), finetune, FilterPruning(sparsity=FILTER_RATE))
    yield
    run("magnitude, fine-tune", lambda: copy.deepcopy(dense), finetune, MagnitudePruning(sparsity=MAGNITUDE_RATE))
    yield
    run("filter, from scratch", lambda: seeded(seed, network), settings.epochs, FilterPruning(sparsity=FILTER_RATE))
    yield
    run("magnitude, from scratch", lambda: seeded(seed, network), settings.epochs,
        MagnitudePruning(sparsity=MAGNITUDE_RATE))
    yield
    for recovery in settings.recovery:
        run(f"filter, fine-tune, recovery_epochs={recovery}", lambda: copy.deepcopy(dense), finetune,
            FilterPruning(sparsity=FILTER_RATE, recovery_epochs=recovery), recovery_epochs=recovery)
        yield


def tables(runs: list[dict[str, Any]], settings: Settings) -> str:
    acc = {(r["recipe"], r["row"]): 100 * r["test_acc"] for r in runs}
    default_recovery = -(-settings.finetune_epochs // 3)
    lines = [f"Shapes workload, PlainCNN(width=16), one seed, test accuracy (%); from scratch {settings.epochs} "
             f"epochs, fine-tuning the trained dense network {settings.finetune_epochs} epochs; defaults only.", "",
             "| recipe | flow | dense | compact from scratch | FilterPruning(0.4) | vs compact | "
             "MagnitudePruning(0.8) | vs dense |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for recipe in settings.recipes:
        dense, compact = acc.get((recipe, "dense")), acc.get((recipe, "compact from scratch"))
        for flow in ("from scratch", "fine-tune"):
            filt, magn = acc.get((recipe, f"filter, {flow}")), acc.get((recipe, f"magnitude, {flow}"))
            lines.append(f"| {recipe} | {flow} | {_fmt(dense)} | {_fmt(compact)} | {_fmt(filt)} | "
                         f"{_diff(filt, compact)} | {_fmt(magn)} | {_diff(magn, dense)} |")
    lines += ["", f"FilterPruning(0.4) fine-tuning {settings.finetune_epochs} epochs: recovery_epochs (epochs trained "
              "with the final selection) vs test accuracy (%); the default is a third of the fit, rounded up.", "",
              "| recovery_epochs | " + " | ".join(settings.recipes) + " |",
              "|---:|" + "---:|" * len(settings.recipes)]
    for recovery in sorted({*settings.recovery, default_recovery}):
        row = "filter, fine-tune" if recovery == default_recovery else f"filter, fine-tune, recovery_epochs={recovery}"
        label = f"{recovery} (default)" if recovery == default_recovery else str(recovery)
        lines.append(f"| {label} | " + " | ".join(_fmt(acc.get((r, row))) for r in settings.recipes) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _diff(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{value - reference:+.1f}"


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), help="only these recipes")
    parser.add_argument("--sgd-lr", type=float, default=RECIPES["SGD+momentum"]["lr"], help="learning rate of SGD")
    parser.add_argument("--output", default=str(OUTPUT.name), help="folder under runs/ for the results")
    args = parser.parse_args(argv)
    RECIPES["SGD+momentum"]["lr"] = args.sgd_lr
    settings = Settings(args.quick)
    settings.recipes = tuple(args.recipes or settings.recipes)
    output = Path("runs") / args.output
    output.mkdir(parents=True, exist_ok=True)
    log = output / "runs.jsonl"
    log.write_text("")
    runs: list[dict[str, Any]] = []

    def record(entry: dict[str, Any]) -> None:
        runs.append(entry)
        with log.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        print(f"[{entry['recipe']}] {entry['row']}: {100 * entry['test_acc']:.1f}% ({entry['seconds']} s)", flush=True)

    with quiet_single_thread():
        for seed in settings.seeds:
            pending = [runs_of(recipe, seed, settings, record) for recipe in settings.recipes]
            while pending:
                pending = [steps for steps in pending if next(steps, StopIteration) is not StopIteration]
    return publish(args.output, tables(runs, settings))


if __name__ == "__main__":
    main()
