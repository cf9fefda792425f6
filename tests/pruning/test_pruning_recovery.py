"""Pruning defaults that recover: an AGP schedule that ends ``recovery_epochs`` before the fit, masks fixed after it,
the warning for a schedule that leaves no recovery epoch, and the resolved schedule kept in the checkpoint state."""

import itertools
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.pruning.schedules import AGP, Constant, recovery_schedule


class MaskProbe(pl.Callback):
    """Per epoch: the pruning callback's masks at the epoch end, and whether every masked entry was zero after
    every training step of the epoch."""

    def __init__(self, pruning):
        self.pruning, self.masks, self.zero_after_steps = pruning, [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.zero_after_steps.append(True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.pruning.masks.items():
            weight = pl_module.backbone.get_submodule(name).weight.detach()
            pruned = ~mask.view(-1, *([1] * (weight.dim() - 1))) if mask.dim() == 1 else ~mask
            if bool((weight * pruned).abs().sum() > 0):
                self.zero_after_steps[-1] = False

    def on_train_epoch_end(self, trainer, pl_module):
        self.masks.append({k: v.clone() for k, v in self.pruning.masks.items()})


def fit(trainer_factory, pruning, epochs, optimizer="adam"):
    probe = MaskProbe(pruning)
    trainer = trainer_factory(callbacks=[pruning, probe], max_epochs=epochs, limit_train_batches=3,
                              limit_val_batches=1)
    trainer.fit(ClassifierModule(PlainCNN(width=8), optimizer=optimizer, lr=1e-2), DigitsDataModule(batch_size=32))
    return probe


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_default_schedule_leaves_recovery_epochs():
    assert recovery_schedule(30) == AGP(start=0, end=20)
    assert recovery_schedule(12, recovery_epochs=3) == AGP(start=0, end=9)
    assert recovery_schedule(2, recovery_epochs=5) == Constant(start=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="recovery_epochs"):
            recovery_schedule(10, bad)
    with pytest.raises(ValueError, match="max_epochs"):
        recovery_schedule(0)


def test_filter_pruning_by_default_is_hard_ramps_and_keeps_what_it_pruned(trainer_factory):
    pruning = FilterPruning(sparsity=0.5)  # hard, nothing else named: 5 epochs -> AGP(0, 3), 2 recovery epochs
    probe = fit(trainer_factory, pruning, epochs=5)
    assert pruning.mode == "hard" and pruning.schedule == AGP(start=0, end=3) and pruning.finalized
    alive = [int(m["block2.conv"].sum()) for m in probe.masks]
    assert alive[0] > alive[1] and alive[2:] == [8, 8, 8]
    for before, after in itertools.pairwise(probe.masks):  # a pruned filter never comes back
        assert not bool((after["block2.conv"] & ~before["block2.conv"]).any())
    assert all(probe.zero_after_steps)  # pruned filters are zero after every step, also while ramping


def test_soft_filter_pruning_ramps_then_fixes_the_selection(trainer_factory):
    pruning = FilterPruning(sparsity=0.5, mode="soft")  # 5 epochs -> AGP(0, 3), 2 recovery epochs
    probe = fit(trainer_factory, pruning, epochs=5)
    assert pruning.schedule == AGP(start=0, end=3) and pruning.finalized
    alive = [int(m["block2.conv"].sum()) for m in probe.masks]
    assert alive[0] > alive[1] and alive[2:] == [8, 8, 8]  # 16 filters: 10, 8 along the ramp, half at the end
    assert _same(probe.masks[2], probe.masks[3]) and _same(probe.masks[3], probe.masks[4])
    # soft while ramping (pruned filters regrow between updates), fixed and zero in the recovery epochs
    assert probe.zero_after_steps[3:] == [True, True] and not probe.zero_after_steps[1]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_magnitude_pruning_by_default_fixes_its_masks_when_the_schedule_ends(trainer_factory, optimizer):
    pruning = MagnitudePruning(sparsity=0.8, recovery_epochs=1, scope="layer")  # 3 epochs -> AGP(0, 2)
    probe = fit(trainer_factory, pruning, epochs=3, optimizer=optimizer)
    assert pruning.schedule == AGP(start=0, end=2)
    kept = [float(m["block2.conv"].float().mean()) for m in probe.masks]
    assert kept[0] == pytest.approx(1 - 0.8 * (1 - 0.5 ** 3), abs=0.01) and kept[1] == pytest.approx(0.2, abs=0.01)
    assert _same(probe.masks[1], probe.masks[2]) and all(probe.zero_after_steps)


def test_a_schedule_without_recovery_epochs_warns(trainer_factory):
    with pytest.warns(UserWarning, match="leaving 0 recovery epoch"):
        fit(trainer_factory, MagnitudePruning(sparsity=0.5, schedule=AGP(start=0, end=2)), epochs=2)
    with pytest.warns(UserWarning, match="re-selects filters at every update"):
        fit(trainer_factory, FilterPruning(sparsity=0.5, mode="soft", schedule=Constant(start=0)), epochs=1)


def test_a_schedule_with_recovery_epochs_fixes_the_masks_silently(trainer_factory):
    pruning = FilterPruning(sparsity=0.5, schedule=Constant(start=0), recovery_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*(workers|training batches|eval mode).*")
        probe = fit(trainer_factory, pruning, epochs=2)
    assert pruning.finalized and _same(probe.masks[0], probe.masks[1]) and probe.zero_after_steps[1]


def test_the_resolved_schedule_is_checkpoint_state(trainer_factory):
    pruning = MagnitudePruning(sparsity=0.5)
    fit(trainer_factory, pruning, epochs=4)
    resumed = MagnitudePruning(sparsity=0.5)
    resumed.load_state_dict(pruning.state_dict())
    assert resumed.schedule == pruning.schedule == AGP(start=0, end=2) and resumed.fix_at_schedule_end


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: FilterPruning(recovery_epochs=-1), "recovery_epochs"),
        (lambda: MagnitudePruning(recovery_epochs=2.5), "recovery_epochs"),
        (lambda: MagnitudePruning(method="splicing", recovery_epochs=2), "method='splicing'"),
    ],
)
def test_bad_recovery_epochs_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()
