"""Dynamic channel pruning (Feature Boosting and Suppression, Gao et al. 2019) on digits, next to static filter
pruning at the same average compute.

    python examples/dynamic_prune_digits.py            # 2 seeds, keep ratios 1.0 / 0.75 / 0.5 / 0.25
    python examples/dynamic_prune_digits.py --quick    # PlainCNN, keep 0.5, one seed, a few batches (the test)

For PlainCNN (width 64, every conv gated) and ResidualCNN (width 16, the blocks' conv1/conv2 gated) it trains from
scratch: the dense model; FBS at each keep ratio (DynamicChannelPruning); and, for each keep ratio below 1, Soft
Filter Pruning (FilterPruning, AGP schedule) at the rate whose compacted model costs the multiply-adds FBS executes
per input, then compacted. Reported: test accuracy (FBS evaluated with sparse execution), multiply-adds executed
per input (counted by torch.utils.flop_counter; FBS includes its predictors), and median CPU latency (1 thread) at
batch 64 and batch 1, measured round-robin over all models at the end so machine load affects them alike.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress import FilterPruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.demo.experiments import ExampleSettings, example_parser, publish
from lightning_compress.graph.layers import select_layers
from lightning_compress.measure import count_macs
from lightning_compress.pruning import compact
from lightning_compress.pruning.dynamic import FeatureBoostingGates
from lightning_compress.pruning.dynamic_callback import DynamicChannelPruning
from lightning_compress.pruning.groups import prune_filter_groups
from lightning_compress.pruning.schedules import AGP

#: name -> (constructor, layers gated by FBS)
MODELS: dict[str, tuple[Callable[[], nn.Module], str | None]] = {
    "PlainCNN(width=64)": (lambda: PlainCNN(width=64), None),
    "ResidualCNN(width=16)": (lambda: ResidualCNN(width=16), r".*\.conv[12]"),
}


class Settings(ExampleSettings):
    def __init__(self, quick: bool) -> None:
        super().__init__(quick, seeds=2, epochs=12, models=(list(MODELS)[:1], list(MODELS)),
                         keep_ratios=((0.5,), (1.0, 0.75, 0.5, 0.25)), bisection_steps=(2, 8),
                         latency_runs=(3, 30))


def train(backbone: nn.Module, settings: Settings, seed: int, callbacks: list[Any] | None = None,
          before_test: Callable[[], None] | None = None) -> float:
    """Train ``backbone`` in place (``epochs=0``: only test) and return its test accuracy."""
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(max_epochs=settings.epochs, callbacks=callbacks or [], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=settings.limit, limit_val_batches=settings.limit,
                         limit_test_batches=settings.limit, deterministic=True, num_sanity_val_steps=0)
    module = ClassifierModule(backbone, lr=3e-3, weight_decay=1e-4)
    datamodule = DigitsDataModule(seed=seed)
    trainer.fit(module, datamodule)
    if before_test is not None:
        before_test()
    return float(trainer.test(module, datamodule, verbose=False)[0]["test/acc"])


def evaluate(backbone: nn.Module, settings: Settings, seed: int) -> float:
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_test_batches=settings.limit)
    return float(trainer.test(ClassifierModule(backbone), DigitsDataModule(seed=seed), verbose=False)[0]["test/acc"])


def fbs_macs(make: Callable[[], nn.Module], layers: str | None, keep_ratio: float, example: torch.Tensor) -> int:
    model = make()
    gates = FeatureBoostingGates(select_layers(model, layers, types=["Conv2d"]), keep_ratio).attach(model)
    return gates.executed_macs(example)


def static_rate(make: Callable[[], nn.Module], target_macs: int, example: torch.Tensor, steps: int) -> float:
    """The filter pruning rate whose compacted model's multiply-adds are closest to ``target_macs`` (bisection)."""
    def macs(rate: float) -> int:
        model = make()
        prune_filter_groups(model, example, rate)
        return count_macs(compact(model.eval(), example), example)[0]

    low, high = 0.0, 0.9
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if macs(middle) > target_macs else (low, middle)
    return round(min((low, high), key=lambda r: abs(macs(r) - target_macs)), 3)


def run_seed(name: str, seed: int, settings: Settings, models: dict[str, Any]) -> dict[str, dict[str, float]]:
    make, layers = MODELS[name]
    example = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    rows: dict[str, dict[str, float]] = {}
    dense = make()
    rows["dense"] = {"setting": 1.0, "acc": train(dense, settings, seed), "macs": count_macs(dense, example)[0]}
    models[(name, "dense")] = dense
    for keep in settings.keep_ratios:
        callback = DynamicChannelPruning(keep_ratio=keep, layers=layers, regularization=1e-8)
        model = make()
        accuracy = train(model, settings, seed, [callback],
                         before_test=lambda cb=callback: cb.gates.sparse(True, example))  # test runs sparse
        rows[f"FBS keep {keep}"] = {"setting": keep, "acc": accuracy, "macs": callback.gates.executed_macs(example)}
        models[(name, f"FBS keep {keep}")] = model
        if keep < 1.0:
            rate = static_rate(make, rows[f"FBS keep {keep}"]["macs"], example, settings.bisection_steps)
            masked = make()
            schedule = AGP(start=0, end=max(1, settings.epochs // 2))
            train(masked, settings, seed, [FilterPruning(rate, mode="soft", schedule=schedule)])
            small = compact(masked.eval(), example)
            rows[f"static filter (same MACs as keep {keep})"] = {
                "setting": rate, "acc": evaluate(small, settings, seed), "macs": count_macs(small, example)[0]}
            models[(name, f"static filter (same MACs as keep {keep})")] = small
    return rows


def latencies(models: dict[Any, nn.Module], batch: int, runs: int) -> dict[Any, float]:
    """Median ms per model at ``batch``, 1 thread, round-robin over models (shared machine drift)."""
    inputs = torch.randn(batch, 1, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[Any, list[float]] = defaultdict(list)
    try:
        with torch.inference_mode():
            for model in models.values():
                model.eval()
                model(inputs)
            for _ in range(runs):
                for key, model in models.items():
                    start = time.perf_counter()
                    model(inputs)
                    times[key].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {key: statistics.median(values) * 1e3 for key, values in times.items()}


def table(results: dict[str, dict[str, list[dict[str, float]]]], seeds: int) -> str:
    lines = [f"Mean over {seeds} seed(s), test split. MACs: multiply-adds executed per input (counted). Latency: "
             "median, 1 thread, CPU; FBS runs sparse execution.", "",
             "| model | method | keep ratio / rate | test acc | MACs per input | MACs (x dense) | latency b64 ms "
             "| latency b1 ms |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        dense_macs = statistics.mean(r["macs"] for r in rows["dense"])
        for row, runs in rows.items():
            mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
            lines.append(f"| {name} | {row} | {mean['setting']:.3g} | {mean['acc']:.4f} | {mean['macs']:,.0f} | "
                         f"{mean['macs'] / dense_macs:.3f} | {mean['b64']:.2f} | {mean['b1']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    settings = Settings(parser.parse_args(argv).quick)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name in settings.models:
        rows: dict[str, list[dict[str, float]]] = defaultdict(list)
        for seed in settings.seeds:
            models: dict[Any, nn.Module] = {}
            seed_rows = run_seed(name, seed, settings, models)
            for batch in (64, 1):
                for (_, row), value in latencies(models, batch, settings.latency_runs).items():
                    seed_rows[row][f"b{batch}"] = value
            for row, values in seed_rows.items():
                rows[row].append(values)
        results[name] = rows
    result = table(results, len(settings.seeds))
    return publish("dynamic_prune_digits", result)


if __name__ == "__main__":
    main()
