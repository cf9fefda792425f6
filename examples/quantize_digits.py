"""Post-training quantization, quantization-aware training, mixed precision, non-linear weights and a real int8
export of the reference CNN on digits, in one table.

    python examples/quantize_digits.py            # 3 seeds, the full table (a few minutes on 2 CPU cores)
    python examples/quantize_digits.py --quick    # one seed, a couple of batches (what the tests run)

``PlainCNN(width=32)`` is trained in float (fp32 row), then, per seed, on the TEST split:

- PTQ weight-only 8 / 4 bits (per-channel ``max |w|``), PTQ static 8 bits with each calibration method (max,
  percentile, mse, entropy) on the validation split;
- QAT 8 / 4 bits with the straight-through estimator (STE) and with learned step sizes (LSQ), and mixed precision
  (first and last layer 8 bits, the rest 4): each fine-tunes the trained float model with
  ``QuantizationAwareTraining`` (activations calibrated on the training data first);
- non-linear 4-bit weights (power-of-two levels, k-means codebook), post-training, stored packed;
- the QAT int8 (STE) model exported with ``export_int8``: agreement of its predictions with the fake-quantized
  model, weight-payload and saved-file ratios against fp32, CPU latency speedup at batch 64 (1 thread, dense and
  int8 measured alternately); and the payload ratio of the 4-bit weight-only model exported packed
  (``export_packed``).

Targets (issue 5) are in the last columns. The table is printed and written to ``runs/quantize_digits/results.md``.
"""

from __future__ import annotations

import io
import statistics
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress import QuantizationAwareTraining
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.demo.experiments import ExampleSettings, example_parser, publish
from lightning_compress.measure import measure_latency
from lightning_compress.quantization import classification_accuracy, export_int8, quantize_model, quantized_counts
from lightning_compress.quantization.packed import export_packed

CALIBRATIONS = ("max", "percentile", "mse", "entropy")
MIXED = {"block1.conv": 8, "classifier": 8}  # first and last layer 8 bits, the rest 4
QAT_ROWS: dict[str, dict[str, Any]] = {
    "QAT 8 bits (STE)": {"num_bits": 8},
    "QAT 8 bits (LSQ)": {"num_bits": 8, "learn": "lsq"},
    "QAT 4 bits (STE)": {"num_bits": 4},
    "QAT 4 bits (LSQ)": {"num_bits": 4, "learn": "lsq"},
    "QAT mixed 8/4 (first, last 8; STE)": {"num_bits": 4, "bit_widths": MIXED},
}


class Settings(ExampleSettings):
    def __init__(self, quick: bool) -> None:
        super().__init__(quick, epochs=15, qat_epochs=(1, 6), calibration_batches=(2, 8), latency_rounds=(2, 7),
                         latency_runs=(3, 20))


def _trainer(epochs: int, settings: Settings, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks or [], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_train_batches=settings.limit,
                      limit_val_batches=settings.limit, num_sanity_val_steps=0, deterministic=True)


def train_float(seed: int, dm: DigitsDataModule, settings: Settings) -> nn.Module:
    pl.seed_everything(seed, verbose=False)
    module = ClassifierModule(PlainCNN(width=32), lr=3e-3, weight_decay=1e-4)
    _trainer(settings.epochs, settings).fit(module, dm)
    return module.backbone.eval()


def train_qat(fp32: nn.Module, seed: int, dm: DigitsDataModule, settings: Settings, **options: Any) -> nn.Module:
    """Fine-tune a copy of the float model with fake quantization; BatchNorm and weight ranges frozen for the last
    epoch."""
    pl.seed_everything(seed, verbose=False)
    backbone = PlainCNN(width=32)
    backbone.load_state_dict(fp32.state_dict())
    callback = QuantizationAwareTraining(calibration="percentile", calibration_data="train",
                                         calibration_batches=settings.calibration_batches,
                                         freeze_epoch=max(settings.qat_epochs - 1, 0), log_error=False, **options)
    module = ClassifierModule(backbone, lr=5e-4, weight_decay=1e-4)
    _trainer(settings.qat_epochs, settings, [callback]).fit(module, dm)
    return module.backbone.eval()


def saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def predictions(model: nn.Module, loader: Any) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(inputs).argmax(dim=1) for inputs, _ in loader])


def alternating_speedup(dense: nn.Module, fast: nn.Module, x: torch.Tensor, settings: Settings) -> dict[str, float]:
    """Median latency of each model over rounds in which the two are measured one after the other."""
    times: dict[str, list[float]] = {"dense": [], "int8": []}
    for _ in range(settings.latency_rounds):
        for name, model in (("dense", dense), ("int8", fast)):
            times[name].append(measure_latency(model, x, runs=settings.latency_runs, warmup=2,
                                               num_threads=1)["latency_ms"])
    dense_ms, int8_ms = statistics.median(times["dense"]), statistics.median(times["int8"])
    return {"latency dense ms": dense_ms, "latency int8 ms": int8_ms, "speedup": dense_ms / int8_ms}


def run_seed(seed: int, settings: Settings) -> dict[str, float]:
    dm = DigitsDataModule(seed=seed)
    dm.setup()
    test, val = dm.test_dataloader(), dm.val_dataloader()
    fp32 = train_float(seed, dm, settings)
    acc = {"fp32": classification_accuracy(fp32, test)}
    for bits in (8, 4):
        acc[f"PTQ weight-only {bits} bits"] = classification_accuracy(
            quantize_model(fp32, "weight_only", num_bits=bits), test)
    for method in CALIBRATIONS:
        acc[f"PTQ static 8 bits ({method})"] = classification_accuracy(
            quantize_model(fp32, "static", val, num_bits=8, calibration=method), test)
    qat: dict[str, nn.Module] = {}
    for row, options in QAT_ROWS.items():
        qat[row] = train_qat(fp32, seed, dm, settings, **options)
        acc[row] = classification_accuracy(qat[row], test)
    packed = {method: export_packed(fp32, num_bits=4, method=method) for method in ("linear", "pow2", "codebook")}
    acc["non-linear 4 bits: power of two (PTQ, packed)"] = classification_accuracy(packed["pow2"], test)
    acc["non-linear 4 bits: k-means codebook (PTQ, packed)"] = classification_accuracy(packed["codebook"], test)
    results = {f"acc/{row}": value for row, value in acc.items()}

    fake = qat["QAT 8 bits (STE)"]
    example = next(iter(dm.train_dataloader()))[0]
    int8 = export_int8(fake, example, min_agreement=None)  # measured on the test split below (quick runs: near-ties)
    results["agreement"] = float((predictions(int8, test) == predictions(fake, test)).float().mean())
    fp32_payload = 4 * sum(p.numel() for p in fp32.parameters())
    results["payload int8"] = fp32_payload / quantized_counts(int8)["weight_bytes"]
    bn_stats = 4 * sum(b.numel() for name, b in fp32.named_buffers() if name.endswith(("running_mean", "running_var")))
    results["payload int8 incl. BN stats"] = (fp32_payload + bn_stats) / quantized_counts(int8)["weight_bytes"]
    results["file int8"] = saved_bytes(fp32) / saved_bytes(int8)
    results.update(alternating_speedup(fp32, int8, torch.randn(64, 1, 8, 8), settings))
    results["payload packed 4"] = fp32_payload / quantized_counts(packed["linear"])["weight_bytes"]
    results["file packed 4"] = saved_bytes(fp32) / saved_bytes(packed["linear"])
    results["packed 4 = PTQ weight-only 4"] = float(torch.equal(
        predictions(packed["linear"], test), predictions(quantize_model(fp32, "weight_only", num_bits=4), test)))
    return results


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(runs: list[dict[str, float]]) -> str:
    mean = {key: statistics.mean(run[key] for run in runs) for key in runs[0]}
    per_seed = {key: ", ".join(f"{run[key]:.4f}" for run in runs) for key in runs[0]}
    fp32 = mean["acc/fp32"]
    lines = [f"PlainCNN(width=32) on digits; mean over {len(runs)} seed(s); accuracy on the TEST split. Export rows: "
             "the QAT 8-bit (STE) model through export_int8; latency at batch 64, 1 thread, median, dense and int8 "
             "measured alternately; ratios are fp32 / exported (payload: weights, biases, BN, scales).", "",
             "| row | metric | mean | per seed | target | met |", "|---|---|---:|---|---|---|"]
    for key in mean:
        if key.startswith("acc/"):
            row = key[4:]
            delta = 100 * (mean[key] - fp32)
            target, met = "", ""
            if row == "QAT 8 bits (STE)":
                target, met = "within 0.5 points of fp32", _mark(delta >= -0.5)
            lines.append(f"| {row} | test acc ({delta:+.2f} pts vs fp32) | {mean[key]:.4f} | {per_seed[key]} | "
                         f"{target} | {met} |")
    export_rows = [
        ("int8 export", "agreement with fake-quant (test)", "agreement", ">= 0.99", lambda v: v >= 0.99),
        ("int8 export", "weight payload ratio", "payload int8", ">= 3.9x", lambda v: v >= 3.9),
        ("int8 export", "weight payload ratio, fp32 counting its BN running stats (folded in int8)",
         "payload int8 incl. BN stats", "", None),
        ("int8 export", "saved file ratio", "file int8", ">= 3x", lambda v: v >= 3.0),
        ("int8 export", "latency dense ms", "latency dense ms", "", None),
        ("int8 export", "latency int8 ms", "latency int8 ms", "", None),
        ("int8 export", "CPU speedup", "speedup", ">= 2x", lambda v: v >= 2.0),
        ("4-bit weight-only packed", "weight payload ratio", "payload packed 4", ">= 7x", lambda v: v >= 7.0),
        ("4-bit weight-only packed", "saved file ratio", "file packed 4", "", None),
        ("4-bit weight-only packed", "predictions equal PTQ weight-only 4", "packed 4 = PTQ weight-only 4", "1", None),
    ]
    for row, metric, key, target, check in export_rows:
        met = _mark(check(mean[key])) if check is not None else ""
        lines.append(f"| {row} | {metric} | {mean[key]:.4f} | {per_seed[key]} | {target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for training (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # tiny convolutions: a thread pool only adds overhead on a busy machine
    settings = Settings(args.quick)
    runs = [run_seed(seed, settings) for seed in settings.seeds]
    result = table(runs)
    return publish("quantize_digits", result)


if __name__ == "__main__":
    main()
