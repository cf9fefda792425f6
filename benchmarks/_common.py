"""Shared pieces of the benchmark scripts: a quiet Trainer, timing by repetition, Markdown tables."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch


def parse_no_options(description: str | None, argv: Sequence[str] | None = None) -> None:
    """``--help`` prints the script's docstring; a script without options refuses any other argument."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    options.update(overrides)
    return pl.Trainer(**options)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, running them in turn (round-robin) so that drifts in machine load
    affect every entry alike (seconds)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run_child(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh Python process; its last stdout line is a JSON object, returned parsed."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


_MEMORY_CHILD = """
import json, pickle, resource, torch, lightning.pytorch as pl
from lightning_compress import FilterPruning, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.measure import state_size_bytes
from lightning_compress.pruning.schedules import AGP
torch.set_num_threads({threads})
pl.seed_everything(0, verbose=False)
callbacks = {{callbacks}}
trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
module = ClassifierModule(PlainCNN(width={width}))
trainer.fit(module, DigitsDataModule())
state = callbacks[0].state_dict() if callbacks else {{{{}}}}
print(json.dumps({{{{"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "state_bytes": {state_bytes}, "model_bytes": state_size_bytes(module.backbone)}}}}))
"""


def fit_memory_child(width: int, state_bytes: str, threads: int | None = None) -> str:
    """The child script of a peak-memory benchmark: a 3-epoch fit of ``PlainCNN(width)`` on digits with the callbacks
    of one config (``{callbacks}``, a Python list expression), printing its peak RSS, ``state_bytes`` (an expression
    of the first callback's ``state``) and the model's state size as JSON."""
    return _MEMORY_CHILD.format(threads=threads or "torch.get_num_threads()", width=width, state_bytes=state_bytes)


def memory_table(description: str | None, child_template: str, configs: dict[str, str], title: str,
                 state_header: str) -> None:
    """A peak-memory benchmark's ``main``: one fresh process per config, the table printed under ``title``."""
    parse_no_options(description)
    rows = peak_memory_rows(child_template, configs)
    print(f"{title}\n")
    print(markdown_table(["fit", "peak RSS MiB", "ratio to plain", state_header, "model state KiB at the end"], rows))


def peak_memory_rows(child_template: str, configs: dict[str, str]) -> list[tuple[Any, ...]]:
    """For each config, run ``child_template.format(callbacks=...)`` in a fresh process (it prints ``peak_mib``,
    ``state_bytes`` and ``model_bytes``) and return rows of name, peak MiB, ratio to the first, state KiB, model KiB."""
    rows, base = [], None
    for name, callbacks in configs.items():
        result = run_child(child_template.format(callbacks=callbacks))
        base = base or result["peak_mib"]
        rows.append((name, result["peak_mib"], result["peak_mib"] / base, result["state_bytes"] / 1024,
                     result["model_bytes"] / 1024))
    return rows
