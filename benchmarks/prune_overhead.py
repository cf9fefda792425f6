"""Training-time overhead of the pruning callbacks, as a ratio to the same fit without them (same script), next to
Lightning's ModelPruning (peak memory: prune_memory.py).

    python benchmarks/prune_overhead.py [--epochs 3] [--repeats 5]

Fits run round-robin, one torch thread. Targets: <= 1.10x with epoch-level updates, <= 1.25x with AGP updates
every 10 steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, machine, markdown_table, quiet_trainer

from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.pruning.schedules import AGP

CALLBACKS = {
    "none (baseline)": lambda epochs: [],
    "MagnitudePruning, epoch-level AGP": lambda epochs: [MagnitudePruning(sparsity=0.8,
                                                                          schedule=AGP(start=0, end=epochs))],
    "MagnitudePruning, AGP every 10 steps": lambda epochs: [
        MagnitudePruning(sparsity=0.8, schedule=AGP(start=0, end=17 * epochs, frequency=10, unit="step"))],
    "MagnitudePruning, splicing": lambda epochs: [MagnitudePruning(method="splicing", c=0.3)],
    "FilterPruning, soft, every epoch": lambda epochs: [FilterPruning(sparsity=0.4, mode="soft")],
    "FilterPruning, hard, epoch-level AGP": lambda epochs: [FilterPruning(sparsity=0.4, mode="hard",
                                                                          schedule=AGP(start=0, end=epochs))],
    "Lightning ModelPruning (l1, every epoch)": lambda epochs: [
        ModelPruning("l1_unstructured", amount=0.3, use_lottery_ticket_hypothesis=False, verbose=0)],
}


def fit(callbacks: list, epochs: int, width: int) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks)
    trainer.fit(ClassifierModule(PlainCNN(width=width), lr=3e-3), DigitsDataModule(batch_size=64))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args()
    fit([], 1, args.width)  # warm-up
    torch.set_num_threads(1)
    fns = {name: (lambda make=make: fit(make(args.epochs), args.epochs, args.width))
           for name, make in CALLBACKS.items()}
    times = interleaved_medians(fns, args.repeats)
    base = times["none (baseline)"]
    rows = [(name, seconds, seconds / base) for name, seconds in times.items()]
    print(f"Fit time, PlainCNN(width={args.width}) on digits, {args.epochs} epochs, median of {args.repeats} "
          f"({machine()})\n")
    print(markdown_table(["callback", "fit seconds", "ratio to no callback"], rows))


if __name__ == "__main__":
    main()
