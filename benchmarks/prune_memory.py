"""Peak memory of a pruning fit against the plain fit, each in a fresh process, and what the pruning state and the
compact model weigh.

    python benchmarks/prune_memory.py

Masks are boolean (1 byte per weight); splicing keeps one extra float copy of each pruned weight.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import fit_memory_child, memory_table

CONFIGS = {
    "plain fit": "[]",
    "MagnitudePruning (AGP)": "[MagnitudePruning(sparsity=0.8, schedule=AGP(start=0, end=3))]",
    "MagnitudePruning (splicing)": "[MagnitudePruning(method='splicing', c=0.3)]",
    "FilterPruning (soft)": "[FilterPruning(sparsity=0.4, mode='soft')]",
    "FilterPruning (hard) + compact": "[FilterPruning(sparsity=0.4, mode='hard', compact_on_fit_end=True)]",
}

CHILD = fit_memory_child(64, 'sum(t.numel() * t.element_size() for key in ("masks", "dense") '
                               'for t in state.get(key, {{}}).values())')  # braces: formatted again


def main() -> None:
    memory_table(__doc__, CHILD, CONFIGS,
                 "PlainCNN(width=64) on digits, 3 epochs, each fit in a fresh process",
                 "callback state KiB (masks, dense copy)")


if __name__ == "__main__":
    main()
