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
from _common import fit_memory_child, memory_table

CONFIGS = {
    "plain fit": "[]",
    "QAT 8 bits, max": "[QuantizationAwareTraining(num_bits=8, calibration='max')]",
    "QAT 8 bits, entropy (histograms)": "[QuantizationAwareTraining(num_bits=8, calibration='entropy')]",
    "QAT 8 bits, LSQ": "[QuantizationAwareTraining(num_bits=8, calibration='percentile', learn='lsq')]",
    "QAT 4 bits, mixed (first, last 8)": (
        "[QuantizationAwareTraining(num_bits=4, calibration='mse', bit_widths={'block1.conv': 8, 'classifier': 8})]"),
}

CHILD = fit_memory_child(32, "len(pickle.dumps(state))", threads=1)


def main() -> None:
    memory_table(__doc__, CHILD, CONFIGS,
                 "PlainCNN(width=32) on digits, 3 epochs, 1 thread, each fit in a fresh process",
                 "callback state KiB (pickled)")


if __name__ == "__main__":
    main()
