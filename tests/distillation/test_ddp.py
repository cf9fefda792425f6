"""DistillationModule under DDP with 2 forked CPU processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_compress.demo import DigitsDataModule, ResidualCNN
from lightning_compress.distillation import DistillationModule
from lightning_compress.testing import read_scalars

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:.*sync_dist=True.*"),
    pytest.mark.skipif(sys.platform != "linux", reason="fork-based DDP"),
]


def test_ddp_fork_two_processes(trainer_factory: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher, student = ResidualCNN(width=8), ResidualCNN(width=4)
    module = DistillationModule(student, teacher, student_layers=["stage2"], teacher_layers=["stage2"],
                                hint_weight=0.5, attention_weight=10.0)
    trainer = trainer_factory(strategy="ddp_notebook", devices=2, limit_train_batches=2, limit_val_batches=1,
                              num_sanity_val_steps=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, seed=0))
    scalars = read_scalars(tmp_path)
    for tag in ("distill/soft", "distill/hard", "distill/hint", "distill/attention", "val/acc", "distill/agreement"):
        assert len(scalars[tag]) == 1, tag
    assert not module.teacher.training
