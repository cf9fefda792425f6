"""Pruning with the defaults only, on the shapes workload: does the network recover?

    python examples/compression_defaults.py            # the README table (3 seeds, 6 min on 2 quiet cores)
    python examples/compression_defaults.py --quick    # one epoch, a few batches (what the tests run)
    python examples/compression_defaults.py --filter-mode soft --output defaults_soft   # soft filter pruning
    python examples/compression_defaults.py --magnitude-scope layer --output defaults_layer  # uniform sparsity
    python examples/compression_defaults.py --recipes SGD+momentum --sgd-lr 0.05 --output sgd_lr005

The user's network is ``PlainCNN(width=16, image_size=16)`` (three conv-BN-ReLU blocks, flatten, linear) on
``ShapesDataModule`` (dense test accuracy about 89%), trained with one of two recipes: Adam (lr 3e-3) or SGD with
Nesterov momentum 0.9 (lr 0.02; at 0.05 the dense network itself trains unstably, 74-88%), both cosine-annealed,
batch 64. With nothing but the sparsity named:

- ``FilterPruning(sparsity=0.4)`` (hard, the default AGP schedule ending ``recovery_epochs`` before the fit, then
  the selection fixed) against the **compact architecture trained from scratch** with the same recipe
  (:func:`lightning_compress.pruning.pruned_architecture`: the same channel counts, fresh weights);
- ``MagnitudePruning(sparsity=0.8)`` (the ERK share, by default) against the **dense** network;

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
    "SGD+momentum": {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9},
}
FILTER_RATE, MAGNITUDE_RATE = 0.4, 0.8
FILTER_MODE = {"mode": "hard"}  # the default; --filter-mode changes it
MAGNITUDE_SCOPE = {"scope": "erk"}  # the default; --magnitude-scope changes it
OUTPUT = Path("runs") / "compression_defaults"


class Settings(ExampleSettings):
    def __init__(self, quick: bool, seeds: int = 3) -> None:
        super().__init__(quick, seeds=seeds, epochs=(1, 10), finetune_epochs=(1, 10), recovery=((), (0,)),
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
    run("filter, fine-tune", lambda: copy.deepcopy(dense), finetune,
        FilterPruning(sparsity=FILTER_RATE, **FILTER_MODE))
    yield
    run("magnitude, fine-tune", lambda: copy.deepcopy(dense), finetune,
        MagnitudePruning(sparsity=MAGNITUDE_RATE, **MAGNITUDE_SCOPE))
    yield
    run("filter, from scratch", lambda: seeded(seed, network), settings.epochs,
        FilterPruning(sparsity=FILTER_RATE, **FILTER_MODE))
    yield
    run("magnitude, from scratch", lambda: seeded(seed, network), settings.epochs,
        MagnitudePruning(sparsity=MAGNITUDE_RATE, **MAGNITUDE_SCOPE))
    yield
    for recovery in settings.recovery:
        run(f"filter, fine-tune, recovery_epochs={recovery}", lambda: copy.deepcopy(dense), finetune,
            FilterPruning(sparsity=FILTER_RATE, recovery_epochs=recovery, **FILTER_MODE), recovery_epochs=recovery)
        yield


def tables(runs: list[dict[str, Any]], settings: Settings) -> str:
    acc: dict[tuple[str, str], list[float]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        acc.setdefault((r["recipe"], r["row"]), []).append(100 * r["test_acc"])
    seeds = len({r["seed"] for r in runs})
    per_seed = "one seed" if seeds == 1 else f"mean of {seeds} seeds (the difference: mean, and worst seed)"
    default_recovery = -(-settings.finetune_epochs // 3)
    lines = [f"Shapes workload, PlainCNN(width=16), {per_seed}, test accuracy (%); from scratch {settings.epochs} "
             f"epochs, fine-tuning the trained dense network {settings.finetune_epochs} epochs; FilterPruning "
             f"mode={FILTER_MODE['mode']!r}, MagnitudePruning scope={MAGNITUDE_SCOPE['scope']!r}; otherwise defaults "
             "only.", "",
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


def _fmt(values: list[float] | None) -> str:
    return "-" if not values else f"{sum(values) / len(values):.1f}"


def _diff(values: list[float] | None, reference: list[float] | None) -> str:
    """Paired by seed: the mean difference, and with several seeds the worst one.

    >>> _diff([88.0, 90.0], [87.0, 90.5])
    '+0.2 (worst -0.5)'
    """
    if not values or not reference:
        return "-"
    differences = [a - b for a, b in zip(values, reference, strict=True)]
    mean = f"{sum(differences) / len(differences):+.1f}"
    return mean if len(differences) == 1 else f"{mean} (worst {min(differences):+.1f})"


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), help="only these recipes")
    parser.add_argument("--sgd-lr", type=float, default=RECIPES["SGD+momentum"]["lr"], help="learning rate of SGD")
    parser.add_argument("--filter-mode", choices=("hard", "soft"), default="hard", help="FilterPruning's mode")
    parser.add_argument("--magnitude-scope", choices=("erk", "layer", "global"), default="erk",
                        help="MagnitudePruning's scope")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--output", default=str(OUTPUT.name), help="folder under runs/ for the results")
    args = parser.parse_args(argv)
    RECIPES["SGD+momentum"]["lr"] = args.sgd_lr
    FILTER_MODE["mode"] = args.filter_mode
    MAGNITUDE_SCOPE["scope"] = args.magnitude_scope
    settings = Settings(args.quick, args.seeds)
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
