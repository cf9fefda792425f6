"""Soft and hard filter pruning of 40% of the filters on digits, compaction, and the three pruning flows.

    python examples/prune_digits.py            # 3 seeds, the full table (a few minutes on 2 CPU cores)
    python examples/prune_digits.py --quick    # one seed, a few batches (what the tests run)

For the residual CNN and the plain CNN (width 64) it reports, averaged over seeds: test accuracy of the dense
model, of the pruned (masked) model and of the compacted model; parameters and multiply-adds of the compact model
as a fraction of dense; CPU latency at batch 256 (median, 1 thread) and the speedup. Rows:

- soft: Soft Filter Pruning while training from scratch (AGP schedule), then compaction;
- hard: hard filter pruning on the same schedule, then compaction;
- flow 1, train -> prune -> fine-tune: the trained dense model pruned at once, fine-tuned, compacted;
- flow 2, prune while training -> fine-tune: the soft row's compact model fine-tuned;
- flow 3, prune -> train from scratch: flow 1's compact architecture re-initialised and trained (Liu et al. 2019);
- flow 3 + rewinding: the same architecture starting from the dense weights of epoch 2 (Renda et al. 2020).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress import FilterPruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.demo.experiments import ExampleSettings, example_parser, publish
from lightning_compress.measure import count_macs, count_parameters, measure_latency
from lightning_compress.pruning import compact
from lightning_compress.pruning.flows import reinitialize, rewind
from lightning_compress.pruning.schedules import AGP, Constant

MODELS: dict[str, Callable[[], nn.Module]] = {
    "ResidualCNN(width=16)": lambda: ResidualCNN(width=16),
    "PlainCNN(width=64)": lambda: PlainCNN(width=64),
}
RATE = 0.4


class Settings(ExampleSettings):
    def __init__(self, quick: bool) -> None:
        super().__init__(quick, epochs=15, finetune_epochs=(1, 5), rewind_epoch=(0, 2), latency_runs=(2, 20))


class KeepEarlyState(pl.Callback):
    """Saves the network's state at the end of one epoch (for rewinding)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.state = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}


def train(backbone: nn.Module, epochs: int, settings: Settings, seed: int, callbacks: list | None = None,
          lr: float = 3e-3) -> tuple[nn.Module, float]:
    """Train ``backbone`` (in place) and return it with its test accuracy."""
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks or [], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=settings.limit,
                         limit_val_batches=settings.limit, limit_test_batches=settings.limit, deterministic=True)
    module = ClassifierModule(backbone, lr=lr, weight_decay=1e-4)
    datamodule = DigitsDataModule(seed=seed)
    trainer.fit(module, datamodule)
    accuracy = trainer.test(module, datamodule, verbose=False)[0]["test/acc"]
    return module.backbone, float(accuracy)


def evaluate(backbone: nn.Module, seed: int, settings: Settings) -> float:
    return train(backbone, 0, settings, seed)[1]


def cost(model: nn.Module, settings: Settings) -> dict[str, float]:
    example = torch.randn(256, 1, 8, 8)
    latency = measure_latency(model, example, runs=settings.latency_runs, warmup=3, num_threads=1)["latency_ms"]
    return {"parameters": count_parameters(model), "macs": count_macs(model, example)[0], "latency_ms": latency}


def run_seed(name: str, seed: int, settings: Settings) -> dict[str, dict[str, float]]:
    example = torch.randn(8, 1, 8, 8)
    results: dict[str, dict[str, float]] = {}
    early = KeepEarlyState(settings.rewind_epoch)
    dense, dense_acc = train(MODELS[name](), settings.epochs, settings, seed, [early])
    dense_cost = cost(dense, settings)

    def record(row: str, masked_acc: float, small: nn.Module, small_acc: float) -> None:
        small_cost = cost(small, settings)
        results[row] = {"dense_acc": dense_acc, "pruned_acc": masked_acc, "compact_acc": small_acc,
                        "parameters": small_cost["parameters"] / dense_cost["parameters"],
                        "macs": small_cost["macs"] / dense_cost["macs"],
                        "latency_dense": dense_cost["latency_ms"], "latency_compact": small_cost["latency_ms"],
                        "speedup": dense_cost["latency_ms"] / small_cost["latency_ms"]}

    schedule = AGP(start=0, end=max(1, settings.epochs // 2))
    for mode in ("soft", "hard"):
        masked, masked_acc = train(MODELS[name](), settings.epochs, settings, seed,
                                   [FilterPruning(RATE, mode=mode, schedule=schedule)])
        small = compact(masked.eval(), example)
        record(mode, masked_acc, small, evaluate(small, seed, settings))
        if mode == "soft":
            tuned, tuned_acc = train(small, settings.finetune_epochs, settings, seed, lr=1e-3)
            record("flow 2: prune while training -> fine-tune", masked_acc, tuned, tuned_acc)

    pruned, pruned_acc = train(dense, settings.finetune_epochs, settings, seed,
                               [FilterPruning(RATE, mode="hard", schedule=Constant(start=0))], lr=1e-3)
    small = compact(pruned.eval(), example)
    record("flow 1: train -> prune -> fine-tune", pruned_acc, small, evaluate(small, seed, settings))
    scratch, scratch_acc = train(reinitialize(small, seed), settings.epochs, settings, seed)
    record("flow 3: prune -> train from scratch", pruned_acc, scratch, scratch_acc)
    if early.state is not None:
        rewound = rewind(pruned, early.state, example)
        rewound, rewound_acc = train(rewound, settings.epochs - settings.rewind_epoch, settings, seed)
        record("flow 3 + rewinding to epoch 2", pruned_acc, rewound, rewound_acc)
    return results


def table(per_model: dict[str, dict[str, list[dict[str, float]]]], seeds: int) -> str:
    header = ("| model | method | acc dense | acc pruned | acc compact | params (x dense) | MACs (x dense) | "
              "latency dense ms | latency compact ms | speedup |")
    lines = [f"Mean over {seeds} seed(s); test split; latency at batch 256, 1 thread, median.", "", header,
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in per_model.items():
        for row, runs in rows.items():
            mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
            lines.append(f"| {name} | {row} | {mean['dense_acc']:.4f} | {mean['pruned_acc']:.4f} | "
                         f"{mean['compact_acc']:.4f} | {mean['parameters']:.3f} | {mean['macs']:.3f} | "
                         f"{mean['latency_dense']:.2f} | {mean['latency_compact']:.2f} | {mean['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(args.quick)
    per_model: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in MODELS:
        rows: dict[str, list[dict[str, float]]] = defaultdict(list)
        for seed in settings.seeds:
            for row, values in run_seed(name, seed, settings).items():
                rows[row].append(values)
        per_model[name] = rows
    result = table(per_model, len(settings.seeds))
    return publish("prune_digits", result)


if __name__ == "__main__":
    main()
