"""QAT from scratch with input ranges that track the network (``ranges="auto"`` -> ``"track"``) against ranges
calibrated once and fixed (``ranges="fixed"``, the behaviour before) and torch.ao eager QAT, with fp32 beside them.

    python benchmarks/qat_ranges.py [--data shapes] [--epochs 20] [--seeds 0 1] [--rows fp32 track8 ...]
    python benchmarks/qat_ranges.py --quick        # digits, 2 epochs, one seed: a smoke run

Every row trains ``PlainCNN(width=16)`` from the same initialisation (per seed) with the same recipe (Adam, lr
3e-3, cosine schedule, the data module's batches and order) for ``--epochs`` epochs, and reports the test accuracy
of the (fake-quantized) network:

- ``fp32``: no quantization;
- ``track8`` / ``track4``: ``QuantizationAwareTraining(num_bits=b)``, defaults only (``ranges="auto"`` picks
  ``"track"`` on this untrained network: moving-average min / max of every batch, averaging constant 0.01);
- ``fixed8`` / ``fixed4``: the same with ``ranges="fixed"`` (calibrated on the first 8 batches, then fixed);
- ``torchao8`` / ``torchao4``: torch.ao eager QAT (``prepare_qat`` of a conv-bn-relu fused copy; 8 bits:
  ``get_default_qat_qconfig("x86")``; 4 bits: the same observers with 4-bit ranges, quint4 activations ``[0, 15]``,
  per-channel qint4 weights ``[-8, 7]``).

One intra-op thread. The table gives the mean over seeds and each seed's value.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, markdown_table, quiet_trainer
from qat_vs_torchao import EagerPlainCNN

from lightning_compress import QuantizationAwareTraining
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.quantization import classification_accuracy

ROWS = ("fp32", "track8", "track4", "fixed8", "fixed4", "torchao8", "torchao4")


def datamodule(name: str, seed: int) -> Any:
    if name == "digits":
        return DigitsDataModule(seed=seed), 8
    from lightning_compress.demo import ShapesDataModule

    dm = ShapesDataModule(seed=seed)
    return dm, dm.input_shape[-1]


def torchao_qconfig(bits: int) -> Any:
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, QConfig, get_default_qat_qconfig
    from torch.ao.quantization.observer import MovingAveragePerChannelMinMaxObserver

    if bits == 8:
        return get_default_qat_qconfig("x86")
    activation = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2**bits - 1,
                                        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-(2 ** (bits - 1)),
                                    quant_max=2 ** (bits - 1) - 1, dtype=torch.qint8,
                                    qscheme=torch.per_channel_symmetric)
    return QConfig(activation=activation, weight=weight)


def torchao_model(initial: nn.Module, width: int, image_size: int, bits: int) -> nn.Module:
    from torch.ao.quantization import fuse_modules_qat, prepare_qat

    model = EagerPlainCNN(width=width, image_size=image_size)
    model.load_state_dict(initial.state_dict())
    model.train()
    model.qconfig = torchao_qconfig(bits)
    fuse_modules_qat(model, [[f"block{i}.conv", f"block{i}.bn", f"block{i}.relu"] for i in (1, 2, 3)], inplace=True)
    return prepare_qat(model, inplace=True)


def run(row: str, data: str, seed: int, epochs: int, width: int) -> float:
    dm, image_size = datamodule(data, seed)
    pl.seed_everything(seed, verbose=False)
    backbone: nn.Module = PlainCNN(width=width, image_size=image_size)
    callbacks: list = []
    if row.startswith(("track", "fixed")):
        bits = int(row[5:])
        options = {} if row.startswith("track") else {"ranges": "fixed"}
        callbacks.append(QuantizationAwareTraining(num_bits=bits, **options))
    elif row.startswith("torchao"):
        backbone = torchao_model(backbone, width, image_size, int(row[7:]))
    module = ClassifierModule(backbone, lr=3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_epochs=epochs, callbacks=callbacks, limit_val_batches=0).fit(module, dm)
    if callbacks:
        assert callbacks[0].ranges_in_use == ("fixed" if row.startswith("fixed") else "track")
    return classification_accuracy(backbone.eval(), dm.test_dataloader())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("shapes", "digits"), default="shapes")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--quick", action="store_true", help="digits, 2 epochs, seed 0, fp32 / track4 / fixed4")
    args = parser.parse_args(argv)
    if args.quick:
        args.data, args.epochs, args.seeds, args.rows = "digits", 2, [0], ["fp32", "track4", "fixed4"]
    torch.set_num_threads(1)
    results: dict[str, list[float]] = {}
    for row in args.rows:
        for seed in args.seeds:
            start = time.perf_counter()
            results.setdefault(row, []).append(run(row, args.data, seed, args.epochs, args.width))
            print(f"{row} seed {seed}: {results[row][-1]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    fp32 = statistics.mean(results["fp32"]) if "fp32" in results else None
    print(f"\nPlainCNN(width={args.width}) from scratch on {args.data}, {args.epochs} epochs, Adam lr 3e-3 cosine, "
          f"seeds {args.seeds}; {machine()}, 1 thread\n")
    table = []
    for row, accs in results.items():
        mean = statistics.mean(accs)
        table.append((row, mean, "" if fp32 is None else f"{100 * (mean - fp32):+.2f}",
                      " / ".join(f"{a:.4f}" for a in accs)))
    print(markdown_table(["row", "test acc (mean)", "vs fp32 (points)", "per seed"], table))


if __name__ == "__main__":
    main()
