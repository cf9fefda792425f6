"""Validation inside fit measures the model the epoch ends with: the epoch-end pruning update runs before it."""

import lightning.pytorch as pl

from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.pruning.schedules import AGP


class ZeroAtValidation(pl.Callback):
    """Records, at every validation start inside fit, whether each pruned filter is zero and the global sparsity."""

    def __init__(self, pruning):
        self.pruning, self.checks = pruning, []

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        modules = dict(pl_module.backbone.named_modules())
        zero = all(bool((modules[name].weight[~mask] == 0).all()) for name, mask in self.pruning.masks.items())
        self.checks.append((trainer.current_epoch, zero, self.pruning.current_sparsity))


def _fit(trainer_factory, pruning, epochs=3):
    probe = ZeroAtValidation(pruning)
    trainer = trainer_factory(callbacks=[pruning, probe], max_epochs=epochs, limit_train_batches=3,
                              limit_val_batches=1)
    trainer.fit(ClassifierModule(PlainCNN(width=8), lr=3e-2), DigitsDataModule(batch_size=32))
    return probe.checks


def test_soft_filter_pruning_validates_the_pruned_model_not_the_regrown_one(trainer_factory):
    # Pruning starts after a first epoch, so BatchNorm shifts are no longer 0 and zeroed filters get gradients.
    pruning = FilterPruning(sparsity=0.5, mode="soft", schedule=AGP(start=1, end=3), recalibration_batches=0)
    checks = _fit(trainer_factory, pruning, epochs=4)
    assert [zero for _, zero, _ in checks] == [True] * 4


def test_magnitude_schedule_is_at_the_epochs_end_position_during_validation(trainer_factory):
    pruning = MagnitudePruning(sparsity=0.8, schedule=AGP(start=0, end=3))
    checks = _fit(trainer_factory, pruning)
    expected = [pruning.schedule.progress(epoch + 1) * 0.8 for epoch in range(3)]
    assert [round(s, 6) for _, _, s in checks] == [round(e, 6) for e in expected]
