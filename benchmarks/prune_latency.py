"""CPU latency of compacted models after filter pruning of 40% of the filters, against the dense model.

    python benchmarks/prune_latency.py

Target: >= 1.5x at batch 256 for the plain CNN of width 64; the residual CNN is reported beside it.
Dense and compact models are measured in the same process, alternating, one torch thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, markdown_table, parse_no_options

from lightning_compress.demo import PlainCNN, ResidualCNN
from lightning_compress.measure import count_macs, count_parameters, measure_latency
from lightning_compress.pruning import compact
from lightning_compress.pruning.groups import prune_filter_groups


def main() -> None:
    parse_no_options(__doc__)
    torch.manual_seed(0)
    rows = []
    for name, model in (("PlainCNN(width=64)", PlainCNN(width=64)), ("ResidualCNN(width=16)", ResidualCNN(width=16)),
                        ("ResidualCNN(width=32)", ResidualCNN(width=32))):
        example = torch.randn(8, 1, 8, 8)
        prune_filter_groups(model, example, 0.4)
        model.eval()
        small = compact(model, example)
        for batch in (1, 256):
            inputs = torch.randn(batch, 1, 8, 8)
            dense_ms, small_ms = [], []
            for _ in range(5):  # alternate to share the machine's drift
                dense_ms.append(measure_latency(model, inputs, runs=20, warmup=5)["latency_ms"])
                small_ms.append(measure_latency(small, inputs, runs=20, warmup=5)["latency_ms"])
            dense, compact_ms = sorted(dense_ms)[2], sorted(small_ms)[2]
            rows.append((name, batch, count_parameters(small) / count_parameters(model),
                         count_macs(small, inputs)[0] / count_macs(model, inputs)[0], dense, compact_ms,
                         f"{dense / compact_ms:.2f}x"))
    print(f"Filter pruning 40% per group, compacted; median CPU latency, 1 thread ({machine()})\n")
    print(markdown_table(["model", "batch", "params (x dense)", "MACs (x dense)", "dense ms", "compact ms",
                          "speedup"], rows))


if __name__ == "__main__":
    main()
