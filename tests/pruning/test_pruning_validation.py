"""Validation inside fit measures the model the epoch ends with: the epoch-end pruning update runs before it."""

import lightning.pytorch as pl

from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.pruning.schedules import AGP


def _nonzero_pruned_weights(pruning, backbone):
    """How many weights of the pruned entries (filters or elements) are non-zero (0: the pruned model)."""
    modules = dict(backbone.named_modules())
    return sum(int((modules[name].weight[~mask] != 0).sum()) for name, mask in pruning.masks.items())


class ZeroAtValidation(pl.Callback):
    """Records, at every validation start inside fit, whether every pruned entry is zero, the global sparsity and
    the number of pruned entries; and, after the epoch's last training step, how many pruned weights had regrown."""

    def __init__(self, pruning):
        self.pruning, self.checks, self.regrown = pruning, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == trainer.num_training_batches - 1:
            self.regrown.append(_nonzero_pruned_weights(self.pruning, pl_module.backbone))

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        zero = _nonzero_pruned_weights(self.pruning, pl_module.backbone) == 0
        pruned = sum(int((~mask).sum()) for mask in self.pruning.masks.values())
        self.checks.append((trainer.current_epoch, zero, self.pruning.current_sparsity, pruned))


def _fit(trainer_factory, pruning, epochs=3):
    probe = ZeroAtValidation(pruning)
    trainer = trainer_factory(callbacks=[pruning, probe], max_epochs=epochs, limit_train_batches=3,
                              limit_val_batches=1)
    trainer.fit(ClassifierModule(PlainCNN(width=8), lr=3e-2), DigitsDataModule(batch_size=32))
    return probe


def test_soft_filter_pruning_validates_the_pruned_model_not_the_regrown_one(trainer_factory):
    # Pruning starts after a first epoch, so BatchNorm shifts are no longer 0 and zeroed filters get gradients.
    pruning = FilterPruning(sparsity=0.5, mode="soft", schedule=AGP(start=1, end=3), recalibration_batches=0)
    probe = _fit(trainer_factory, pruning, epochs=4)
    assert [zero for _, zero, _, _ in probe.checks] == [True] * 4
    # Not vacuous: filters are pruned from the end of epoch 1 on, and in epochs 2 and 3 pruned weights had regrown
    # by the last training step, so validating before the epoch-end update would have seen non-zero filters.
    assert [pruned > 0 for _, _, _, pruned in probe.checks] == [False, True, True, True]
    assert probe.regrown[2] > 0 and probe.regrown[3] > 0


def test_magnitude_schedule_is_at_the_epochs_end_position_during_validation(trainer_factory):
    pruning = MagnitudePruning(sparsity=0.8, schedule=AGP(start=0, end=3))
    checks = _fit(trainer_factory, pruning).checks
    expected = [pruning.schedule.progress(epoch + 1) * 0.8 for epoch in range(3)]
    assert [round(s, 6) for _, _, s, _ in checks] == [round(e, 6) for e in expected]
