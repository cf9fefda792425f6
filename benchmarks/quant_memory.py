"""Peak memory of a quantization-aware fit against the plain fit, each in a fresh process, and what the QAT state
(calibrator histograms, scales) weighs.

    python benchmarks/quant_memory.py

Calibration keeps histograms (int64 counts, ``num_bins`` per layer) or a running max, never activations; fake
quantization adds one quantized copy of each weight and input per step (autograd keeps it for the backward).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, parse_no_options, peak_memory_rows

CONFIGS = {
    "plain fit": "[]",
    "QAT 8 bits, max": "[QuantizationAwareTraining(num_bits=8, calibration='max')]",
    "QAT 8 bits, entropy (histograms)": "[QuantizationAwareTraining(num_bits=8, calibration='entropy')]",
    "QAT 8 bits, LSQ": "[QuantizationAwareTraining(num_bits=8, calibration='percentile', learn='lsq')]",
    "QAT 4 bits, mixed (first, last 8)": (
        "[QuantizationAwareTraining(num_bits=4, calibration='mse', bit_widths={'block1.conv': 8, 'classifier': 8})]"),
}

CHILD = """
import json, pickle, resource, torch, lightning.pytorch as pl
from lightning_compress import QuantizationAwareTraining
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.measure import state_size_bytes
torch.set_num_threads(1)
pl.seed_everything(0, verbose=False)
callbacks = {callbacks}
trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
module = ClassifierModule(PlainCNN(width=32))
trainer.fit(module, DigitsDataModule())
state_bytes = len(pickle.dumps(callbacks[0].state_dict())) if callbacks else 0
print(json.dumps({{"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "state_bytes": state_bytes, "model_bytes": state_size_bytes(module.backbone)}}))
"""


def main() -> None:
    parse_no_options(__doc__)
    rows = peak_memory_rows(CHILD, CONFIGS)
    print("PlainCNN(width=32) on digits, 3 epochs, 1 thread, each fit in a fresh process\n")
    print(markdown_table(["fit", "peak RSS MiB", "ratio to plain", "callback state KiB (pickled)",
                          "model state KiB at the end"], rows))


if __name__ == "__main__":
    main()
