"""Peak memory of a pruning fit against the plain fit, each in a fresh process, and what the pruning state and the
compact model weigh.

    python benchmarks/prune_memory.py

Masks are boolean (1 byte per weight); splicing keeps one extra float copy of each pruned weight.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, parse_no_options, peak_memory_rows

CONFIGS = {
    "plain fit": "[]",
    "MagnitudePruning (AGP)": "[MagnitudePruning(sparsity=0.8, schedule=AGP(start=0, end=3))]",
    "MagnitudePruning (splicing)": "[MagnitudePruning(method='splicing', c=0.3)]",
    "FilterPruning (soft)": "[FilterPruning(sparsity=0.4, mode='soft')]",
    "FilterPruning (hard) + compact": "[FilterPruning(sparsity=0.4, mode='hard', compact_on_fit_end=True)]",
}

CHILD = """
import json, resource, torch, lightning.pytorch as pl
from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.measure import state_size_bytes
from lightning_compress.pruning.schedules import AGP
pl.seed_everything(0, verbose=False)
callbacks = {callbacks}
trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
module = ClassifierModule(PlainCNN(width=64))
trainer.fit(module, DigitsDataModule())
state = callbacks[0].state_dict() if callbacks else {{}}
state_bytes = sum(t.numel() * t.element_size() for key in ("masks", "dense") for t in state.get(key, {{}}).values())
print(json.dumps({{"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "state_bytes": state_bytes, "model_bytes": state_size_bytes(module.backbone)}}))
"""


def main() -> None:
    parse_no_options(__doc__)
    rows = peak_memory_rows(CHILD, CONFIGS)
    print("PlainCNN(width=64) on digits, 3 epochs, each fit in a fresh process\n")
    print(markdown_table(["fit", "peak RSS MiB", "ratio to plain", "callback state KiB (masks, dense copy)",
                          "model state KiB at the end"], rows))


if __name__ == "__main__":
    main()
