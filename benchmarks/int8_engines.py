"""The int8 export under every quantized engine this host offers: agreement with the fake-quantized model, output
error and latency against fp32, for full-range (8-bit) and reduced-range (7-bit) activations.

    python benchmarks/int8_engines.py        # about a minute on 2 CPU cores

Models: ResidualCNN(width=8), PlainCNN(width=16) and MLP on digits, a Conv1d network on noisy sines, a Linear ->
BatchNorm1d -> ReLU head; each trained for 2 epochs, then quantized post-training (8 bits, entropy calibration).
"refused" marks an engine that would saturate on this CPU (x86 / fbgemm / onednn with full-range activations and
no VNNI): the export refuses it, and "auto" takes the fastest exact one. Latency: batch 64, 1 thread, median of
interleaved runs, int8 / fp32 (below 1: int8 faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, machine, markdown_table, parse_no_options

from lightning_compress.demo import MLP, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.export.engines import exact_engines
from lightning_compress.quantization import export_int8, host_summary, quantize_model
from lightning_compress.testing import Conv1dNet, LinearBatchNormHead, noisy_sines, train_briefly


def _data() -> dict[str, tuple[list, torch.Tensor]]:
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    signals, labels = noisy_sines(1024, 0)
    return {"digits": (list(dm.train_dataloader()), torch.cat([batch[0] for batch in dm.test_dataloader()])),
            "signals": (list(zip(signals[:768].split(64), labels[:768].split(64), strict=True)), signals[768:])}


MODELS = {"ResidualCNN(8)": ("digits", lambda: ResidualCNN(width=8)), "PlainCNN(16)": ("digits", lambda: PlainCNN(
    width=16)), "MLP": ("digits", MLP), "Conv1dNet": ("signals", Conv1dNet),
    "LinearBatchNormHead": ("digits", LinearBatchNormHead)}


def rows() -> list[list[object]]:
    data, table = _data(), []
    for name, (kind, make) in MODELS.items():
        batches, test = data[kind]
        torch.manual_seed(0)
        model = train_briefly(make(), batches, 2)
        for reduce_range in (False, True):
            quantized = quantize_model(model, "static", batches, calibration="entropy", reduce_range=reduce_range)
            code = export_int8(quantized, test[:256], min_agreement=None).verification["max_activation_code"]
            auto = export_int8(quantized, test[:256], min_agreement=None).engine
            for engine in torch.backends.quantized.supported_engines:
                label = [name, "7-bit" if reduce_range else "8-bit", engine + (" (auto)" if engine == auto else "")]
                if engine not in exact_engines(code):
                    table.append([*label, "refused", "", "", ""])
                    continue
                int8 = export_int8(quantized, test[:256], engine=engine, check_inputs=test, min_agreement=None)
                v = int8.verification
                batch = test[:64]
                with torch.no_grad():
                    times = interleaved_medians({"fp32": lambda m=model, x=batch: m(x),
                                                 "int8": lambda m=int8, x=batch: m(x)}, 15)
                table.append([*label, f"{v['agreement']:.4f}", f"{v['relative_error']:.4f}",
                              f"{v['max_abs_diff']:.3f}", f"{times['int8'] / times['fp32']:.2f}"])
    return table


def main() -> None:
    parse_no_options(__doc__)
    torch.set_num_threads(1)
    print(f"{machine()}; int8 host: {host_summary()}")
    print(markdown_table(["model", "activations", "engine", "agreement", "relative error", "max |diff|",
                          "latency int8 / fp32"], rows()))


if __name__ == "__main__":
    main()
