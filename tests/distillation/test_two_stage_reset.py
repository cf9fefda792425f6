"""The task stage of a two-stage method starts with a fresh optimizer state."""

import lightning.pytorch as pl

from lightning_compress import DistillationModule
from lightning_compress.demo import DigitsDataModule, ResidualCNN


class RecordStateSize(pl.Callback):
    def __init__(self):
        self.sizes = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.sizes[trainer.current_epoch] = len(trainer.optimizers[0].state)


def test_optimizer_state_is_cleared_when_the_task_stage_starts(trainer_factory):
    record = RecordStateSize()
    module = DistillationModule(ResidualCNN(width=4), ResidualCNN(width=8).eval(), student_layers=["stage1"],
                                teacher_layers=["stage1"], hint_weight=1.0, feature_stage_epochs=1)
    trainer = trainer_factory(callbacks=[record], max_epochs=3, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert record.sizes[0] == 0 and record.sizes[1] == 0 and record.sizes[2] > 0
