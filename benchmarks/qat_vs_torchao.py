"""Our ``QuantizationAwareTraining`` against ``torch.ao`` eager-mode QAT on the same network, data and optimizer.

    python benchmarks/qat_vs_torchao.py [--epochs 4] [--seeds 0 1]

Both fine-tune the same trained float ``PlainCNN(width=32)`` for ``--epochs`` epochs in the same Trainer set-up
(Adam, lr 5e-4, same data order), 8 bits:

- ours: ``QuantizationAwareTraining(num_bits=8, calibration="percentile", calibration_data="train")`` on the user's
  module as written; int8 through ``export_int8``;
- torch.ao: an eager-friendly copy (``QuantStub`` / ``DeQuantStub``, ``nn.ReLU`` modules, conv-bn-relu fused with
  ``fuse_modules_qat``), ``prepare_qat`` with ``get_default_qat_qconfig("x86")``, int8 through ``convert``.

Reported: median training-step time (forward, backward, optimizer; the first steps and our calibration pass
excluded), test accuracy of the fake-quantized model and of the int8 model, and ratios ours / torch.ao. A plain
float fine-tune gives the step-time baseline. One intra-op thread.
"""

from __future__ import annotations

import argparse
import copy
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

from lightning_compress import QuantizationAwareTraining
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.quantization import classification_accuracy, export_int8


class EagerPlainCNN(nn.Module):
    """``PlainCNN``'s architecture written the way torch.ao's eager mode needs it (same parameter keys)."""

    def __init__(self, width: int = 32, num_classes: int = 10, image_size: int = 8) -> None:
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        channels = [(1, width), (width, 2 * width), (2 * width, 2 * width)]
        for i, (cin, cout) in enumerate(channels, start=1):
            block = nn.Sequential()
            block.add_module("conv", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
            block.add_module("bn", nn.BatchNorm2d(cout))
            block.add_module("relu", nn.ReLU())
            setattr(self, f"block{i}", block)
        self.pool2, self.pool3 = nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(2 * width * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.quant(x))
        x = self.pool3(self.block3(self.pool2(self.block2(x))))
        return self.dequant(self.classifier(self.flatten(x)))


def torchao_qat_model(fp32: nn.Module) -> nn.Module:
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    model = EagerPlainCNN(width=32)
    model.load_state_dict(fp32.state_dict())
    model.train()
    model.qconfig = get_default_qat_qconfig("x86")
    fuse_modules_qat(model, [[f"block{i}.conv", f"block{i}.bn", f"block{i}.relu"] for i in (1, 2, 3)], inplace=True)
    return prepare_qat(model, inplace=True)


class StepTimer(pl.Callback):
    """Wall time of every training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self.times.append(time.perf_counter() - self._start)

    def median_ms(self, skip: int = 3) -> float:
        return statistics.median(self.times[skip:]) * 1e3


def fit(backbone: nn.Module, dm: DigitsDataModule, epochs: int, seed: int, callbacks: list) -> StepTimer:
    pl.seed_everything(seed, verbose=False)
    timer = StepTimer()
    quiet_trainer(max_epochs=epochs, callbacks=[*callbacks, timer], limit_val_batches=0).fit(
        ClassifierModule(backbone, lr=5e-4, weight_decay=1e-4), dm)
    return timer


def run_seed(seed: int, epochs: int) -> dict[str, float]:
    dm = DigitsDataModule(seed=seed)
    dm.setup()
    test = dm.test_dataloader()
    pl.seed_everything(seed, verbose=False)
    fp32 = PlainCNN(width=32)
    quiet_trainer(max_epochs=10, limit_val_batches=0).fit(ClassifierModule(fp32, lr=3e-3, weight_decay=1e-4), dm)
    results = {"fp32 acc": classification_accuracy(fp32, test)}

    plain = copy.deepcopy(fp32)
    results["plain step ms"] = fit(plain, dm, epochs, seed, []).median_ms()

    ours = copy.deepcopy(fp32)
    callback = QuantizationAwareTraining(num_bits=8, calibration="percentile", calibration_data="train",
                                         log_error=False)
    results["ours step ms"] = fit(ours, dm, epochs, seed, [callback]).median_ms()
    results["ours fake-quant acc"] = classification_accuracy(ours.eval(), test)
    results["ours int8 acc"] = classification_accuracy(export_int8(ours, next(iter(test))[0]), test)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = torchao_qat_model(fp32)
        results["torch.ao step ms"] = fit(theirs, dm, epochs, seed, []).median_ms()
        results["torch.ao fake-quant acc"] = classification_accuracy(theirs.eval(), test)
        converted = torch.ao.quantization.convert(copy.deepcopy(theirs).eval())
    results["torch.ao int8 acc"] = classification_accuracy(converted, test)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [run_seed(seed, args.epochs) for seed in args.seeds]
    mean = {key: statistics.mean(run[key] for run in runs) for key in runs[0]}
    print(f"PlainCNN(width=32) on digits, 8-bit QAT fine-tune of {args.epochs} epochs from the same float model, "
          f"mean over seeds {args.seeds}; {machine()}, 1 thread\n")
    print(markdown_table(
        ["", "ours (QuantizationAwareTraining)", "torch.ao eager QAT (x86)", "ours / torch.ao"],
        [("step time ms (median)", mean["ours step ms"], mean["torch.ao step ms"],
          mean["ours step ms"] / mean["torch.ao step ms"]),
         ("step time / plain float step", mean["ours step ms"] / mean["plain step ms"],
          mean["torch.ao step ms"] / mean["plain step ms"], ""),
         ("test acc, fake-quant", mean["ours fake-quant acc"], mean["torch.ao fake-quant acc"],
          mean["ours fake-quant acc"] / mean["torch.ao fake-quant acc"]),
         ("test acc, int8", mean["ours int8 acc"], mean["torch.ao int8 acc"],
          mean["ours int8 acc"] / mean["torch.ao int8 acc"])]))
    print(f"\nfp32 test acc {mean['fp32 acc']:.4f}; plain float fine-tune step {mean['plain step ms']:.2f} ms")


if __name__ == "__main__":
    main()
