"""A training run that can SIGKILL itself at a given step and resume from its last end-of-epoch checkpoint.

Used by test_kill_resume.py: ``python kill_resume_run.py DIR [--kill-at STEP] [--resume] [--variant NAME]``. At the
end it saves the network's state and every compression callback's state to ``DIR/final.pt``; every start of training
appends the epoch and step it started at to ``DIR/starts.jsonl``. ``--resume`` without ``DIR/checkpoints/last.ckpt``
exits with status 3 (it never silently starts over).
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import DistillationModule, FilterPruning, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.pruning.schedules import AGP

EPOCHS, STEPS_PER_EPOCH = 4, 4


class KillAt(pl.Callback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StartMarker(pl.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        with (self.directory / "starts.jsonl").open("a") as file:
            file.write(json.dumps({"epoch": trainer.current_epoch, "global_step": trainer.global_step}) + "\n")


def build(variant: str) -> tuple[pl.LightningModule, list[pl.Callback]]:
    pl.seed_everything(0, verbose=False)
    if variant == "distill-prune-qat":
        teacher = ResidualCNN(width=8).eval()
        module = DistillationModule(ResidualCNN(width=4), teacher, lr=3e-3)
        callbacks = [FilterPruning(sparsity=0.25, mode="soft", schedule=AGP(start=0, end=3), recalibration_batches=2),
                     QuantizationAwareTraining(num_bits=8, calibration="entropy", calibration_batches=6,
                                               freeze_epoch=3)]
    elif variant == "compact-every-epoch":
        module = ClassifierModule(PlainCNN(width=8), lr=3e-3, lr_scheduler="none")
        callbacks = [FilterPruning(sparsity=0.5, mode="hard", schedule=AGP(start=0, end=3), compact_every_epoch=True,
                                   recalibration_batches=0)]
    else:
        module = ClassifierModule(PlainCNN(width=8), lr=3e-3)
        callbacks = [MagnitudePruning(method="splicing", c=0.3, gamma=1e-3)]
    return module, callbacks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--variant", default="distill-prune-qat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module, callbacks = build(args.variant)
    checkpoints = ModelCheckpoint(dirpath=args.directory / "checkpoints", save_top_k=1, save_last=True)
    trainer = pl.Trainer(max_epochs=EPOCHS, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=2,
                         callbacks=[*callbacks, checkpoints, KillAt(args.kill_at), StartMarker(args.directory)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         num_sanity_val_steps=0)
    last = args.directory / "checkpoints" / "last.ckpt"
    if args.resume and not last.exists():
        return 3
    trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=last if args.resume else None)
    network = module.compression_target
    torch.save({"network": network.state_dict(), "callbacks": [c.state_dict() for c in callbacks],
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}, args.directory / "final.pt")


if __name__ == "__main__":
    sys.exit(main())
