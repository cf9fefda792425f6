"""FilterPruning(compact_at_schedule_end=True): a student distilled and soft-filter-pruned along a schedule is
compacted in place when the schedule ends, and trains on, smaller, in the same fit; logging, resume and the
on_load_checkpoint chain across the compaction, and the combinations refused."""

import contextlib
import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import DistillationModule, FilterPruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.pruning.schedules import AGP, Constant
from lightning_compress.testing import read_scalars, read_tags
from lightning_compress.utils.load_hook import ModelLoadHook

EPOCHS, END = 6, 3  # AGP(start=0, end=3) reaches its end with the epoch-end update of epoch 2
COMPACTION_EPOCH = END - 1
PROBE = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def schedule_end_pruning(**overrides):
    options = dict(sparsity=0.4, mode="soft", schedule=AGP(start=0, end=END), compact_at_schedule_end=True,
                   recalibration_batches=2)
    return FilterPruning(**{**options, **overrides})


def outputs(network):
    network = copy.deepcopy(network).eval()
    with torch.no_grad():
        return network(PROBE)


def count(network):
    return sum(p.numel() for p in network.parameters())


class Probe(pl.Callback):
    """Placed before and after the pruning callback: what the student is at each epoch's end on either side."""

    def __init__(self):
        self.parameters, self.outputs, self.started = [], {}, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.started.append(count(pl_module.compression_target))

    def on_train_epoch_end(self, trainer, pl_module):
        self.parameters.append(count(pl_module.compression_target))
        self.outputs[trainer.current_epoch] = outputs(pl_module.compression_target)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(ResidualCNN(width=16), lr=3e-3, lr_scheduler="none")
    make_trainer(tmp_path_factory.mktemp("teacher"), max_epochs=3, limit_val_batches=0, logger=False).fit(
        module, DigitsDataModule(batch_size=64))
    return module.backbone


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    """One fit: distill + soft-prune for 3 epochs, compact at the end of epoch 2, distill the compact student on."""
    root = tmp_path_factory.mktemp("distilled")
    pl.seed_everything(0, verbose=False)
    pruning, before, after = schedule_end_pruning(), Probe(), Probe()
    calls = {"compute_masks": [], "finalize": 0, "compaction": []}
    compute_masks, finalize, compact_in_place = pruning.compute_masks, pruning.finalize, pruning.compact_in_place

    def spy_masks(modules, progress, position):
        calls["compute_masks"].append(trainer.current_epoch)
        return compute_masks(modules, progress, position)

    def spy_finalize(trainer):
        calls["finalize"] += 1
        finalize(trainer)

    def spy_compaction(trainer):  # the finalized student, then the compact one
        calls["compaction"].append((trainer.current_epoch, outputs(pruning._target)))
        plan = compact_in_place(trainer)
        calls["compaction"].append((trainer.current_epoch, outputs(pruning._target)))
        return plan

    pruning.compute_masks, pruning.finalize, pruning.compact_in_place = spy_masks, spy_finalize, spy_compaction
    trainer = make_trainer(root, callbacks=[before, pruning, after], max_epochs=EPOCHS, limit_train_batches=16,
                           limit_val_batches=4, num_sanity_val_steps=0)
    module = DistillationModule(ResidualCNN(width=8), copy.deepcopy(teacher), lr=1e-2, input_shape=[1, 8, 8])
    dense = count(module.student)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return {"root": root, "trainer": trainer, "module": module, "pruning": pruning, "before": before, "after": after,
            "dense": dense, "calls": calls}


def test_the_student_shrinks_exactly_at_the_end_of_the_schedule_epoch(distilled):
    before, after, dense = distilled["before"], distilled["after"], distilled["dense"]
    compact = count(distilled["module"].student)
    assert compact < 0.5 * dense
    # compacted before the epoch-end validation of the schedule's last epoch, so every callback's epoch end sees it
    assert before.parameters == [dense] * COMPACTION_EPOCH + [compact] * (EPOCHS - COMPACTION_EPOCH)
    assert after.parameters == [dense] * COMPACTION_EPOCH + [compact] * (EPOCHS - COMPACTION_EPOCH)
    assert after.started == [dense] * END + [compact] * (EPOCHS - END)
    student, pruning = distilled["module"].student, distilled["pruning"]
    assert pruning.compacted_at == COMPACTION_EPOCH and len(pruning.events) == 1 and pruning.masks == {}
    assert student.stage2[0].conv1.out_channels == 16 - round(0.4 * 16)
    assert student.stem.conv.out_channels == student.stage1[0].conv2.out_channels == 8 - round(0.4 * 8)  # residual
    assert student.fc.out_features == 10  # the classifier keeps its outputs


def test_the_compaction_changes_no_output_of_the_finalized_student(distilled):
    (epoch, finalized), (same_epoch, compacted) = distilled["calls"]["compaction"]
    assert epoch == same_epoch == COMPACTION_EPOCH
    torch.testing.assert_close(compacted, finalized, atol=1e-5, rtol=0)
    after = distilled["after"].outputs  # what the probe after the pruning callback saw
    torch.testing.assert_close(after[COMPACTION_EPOCH], compacted)
    assert not torch.allclose(after[COMPACTION_EPOCH], after[EPOCHS - 1])  # it trained on


def test_after_the_compaction_the_callback_leaves_the_weights_alone_and_training_goes_on(distilled):
    calls, trainer, student = distilled["calls"], distilled["trainer"], distilled["module"].student
    assert calls["finalize"] == 1  # not again at the end of fit
    assert max(calls["compute_masks"]) == COMPACTION_EPOCH  # no mask update after the compaction
    optimizer = trainer.optimizers[0]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in student.parameters()} <= held
    assert optimizer.state[student.stage2[0].conv1.weight]["exp_avg"].shape == student.stage2[0].conv1.weight.shape
    # the compact student goes on learning (relative to itself right after the compaction: no threshold that depends
    # on the floating-point order of the CPU)
    scalars = read_scalars(distilled["root"])
    accuracy = [value for _, value in scalars["val/acc"]]
    loss = [value for _, value in scalars["distill/total"]]
    assert len(accuracy) == len(loss) == EPOCHS
    assert accuracy[-1] > accuracy[COMPACTION_EPOCH] and loss[-1] < loss[COMPACTION_EPOCH], (accuracy, loss)


def test_every_tag_has_one_point_per_epoch_across_the_compaction(distilled):
    scalars, pruning = read_scalars(distilled["root"]), distilled["pruning"]
    layers = list(pruning.original_filters)
    assert "stem.conv" in layers and "fc" not in layers
    tags = ["prune/sparsity", "prune/progress", "prune/revived_filters", "prune/compacted"]
    tags += [f"prune/sparsity/{name}" for name in layers] + [f"prune/filters_alive/{name}" for name in layers]
    for tag in tags:
        steps = [step for step, _ in scalars[tag]]
        assert len(steps) == EPOCHS and steps == sorted(set(steps)), tag
    assert "prune/layer_sparsity" in read_tags(distilled["root"])["histograms"]

    def values(tag):
        return [value for _, value in scalars[tag]]

    assert values("prune/compacted") == [0.0] * COMPACTION_EPOCH + [1.0] * (EPOCHS - COMPACTION_EPOCH)
    assert values("prune/progress") == pytest.approx([1 - (1 - t / END) ** 3 for t in (1, 2)] + [1.0] * 4)
    sparsity = values("prune/sparsity")
    assert sparsity == sorted(sparsity) and len(set(sparsity[COMPACTION_EPOCH:])) == 1  # continuous, then flat
    kept = sum(group.size for group in pruning.groups)  # the groups of the compact student
    assert sparsity[-1] == pytest.approx(1 - kept / sum(pruning.original_sizes.values()))
    assert sparsity[-1] == pytest.approx(0.4, abs=0.03)
    student = distilled["module"].student
    for name in layers:
        width = student.get_submodule(name).out_channels
        assert values(f"prune/filters_alive/{name}")[-1] == width
        assert values(f"prune/sparsity/{name}")[-1] == pytest.approx(1 - width / pruning.original_filters[name])
        assert values(f"prune/sparsity/{name}")[COMPACTION_EPOCH - 1] <= values(f"prune/sparsity/{name}")[-1]


# -- resume ------------------------------------------------------------------------------------------------------
def resume_run(root, tag, ckpt_path=None, extra=()):
    pl.seed_everything(0, verbose=False)
    pruning = schedule_end_pruning()
    checkpoints = ModelCheckpoint(dirpath=root / tag, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = make_trainer(root, callbacks=[pruning, *extra, checkpoints], max_epochs=5, limit_train_batches=4,
                           limit_val_batches=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=True)
    torch.manual_seed(0)  # the same (untrained) teacher in every run: it is not in the checkpoints
    module = DistillationModule(ResidualCNN(width=8), ResidualCNN(width=16), lr=3e-3, input_shape=[1, 8, 8])
    trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return module, pruning, trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, *resume_run(root, "full")


def assert_same_run(resumed, full):
    (module, pruning, trainer), (full_module, full_pruning, full_trainer) = resumed, full
    for key, value in full_module.student.state_dict().items():
        torch.testing.assert_close(module.student.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    assert pruning.events == full_pruning.events and pruning.compacted_at == full_pruning.compacted_at
    assert pruning.position == full_pruning.position and pruning.original_sizes == full_pruning.original_sizes
    state, full_state = trainer.optimizers[0].state_dict()["state"], full_trainer.optimizers[0].state_dict()["state"]
    assert state.keys() == full_state.keys()
    for index, moments in full_state.items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[index][name], moments[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("epoch", [1, COMPACTION_EPOCH, END], ids=["before", "at-compaction", "after"])
def test_resume_across_the_compaction_equals_an_uninterrupted_run(uninterrupted, epoch):
    root, *full = uninterrupted
    assert full[1].compacted_at == COMPACTION_EPOCH
    resumed = resume_run(root, f"resumed{epoch}", ckpt_path=root / "full" / f"epoch={epoch}.ckpt")
    assert_same_run(resumed, full)
    assert "on_load_checkpoint" not in vars(resumed[0])  # the module's own hook again


class WrapsLoadAfter(pl.Callback):
    """Like QuantizationAwareTraining(start_epoch=...): wraps on_load_checkpoint in setup (after FilterPruning),
    runs the original (with FilterPruning's replay) first, and restores what it replaced in on_fit_start."""

    def __init__(self):
        self.seen_widths = []

    def setup(self, trainer, pl_module, stage):
        self.module, self.replaced = pl_module, vars(pl_module).get("on_load_checkpoint")
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint):
            original(checkpoint)
            self.seen_widths.append(pl_module.student.stem.conv.out_channels)

        self.wrapper = pl_module.on_load_checkpoint = on_load_checkpoint

    def on_fit_start(self, trainer, pl_module):  # runs after FilterPruning's (callback order)
        assert vars(pl_module)["on_load_checkpoint"] is self.wrapper  # FilterPruning left it in place
        if self.replaced is None:
            del pl_module.on_load_checkpoint
        else:
            pl_module.on_load_checkpoint = self.replaced


def test_replay_comes_first_under_another_wrapper_and_every_wrapper_is_removed(uninterrupted):
    root, *full = uninterrupted
    wrapper = WrapsLoadAfter()
    resumed = resume_run(root, "wrapped", ckpt_path=root / "full" / f"epoch={END}.ckpt", extra=[wrapper])
    assert wrapper.seen_widths == [8 - round(0.4 * 8)]  # the student was already compact when it ran
    assert_same_run(resumed, full)
    assert "on_load_checkpoint" not in vars(resumed[0])  # FilterPruning's pass-through went at teardown


def test_before_model_load_restores_only_what_it_replaced():
    class Module:
        def on_load_checkpoint(self, checkpoint):
            checkpoint.append("own")

    module, calls = Module(), []
    ours = ModelLoadHook(module, before=lambda checkpoint: checkpoint.append("replay"))
    inner = module.on_load_checkpoint
    other = module.on_load_checkpoint = lambda checkpoint: (inner(checkpoint), checkpoint.append("attach"))
    assert not ours.remove()  # another wrapper on top: stay, as a pass-through
    assert vars(module)["on_load_checkpoint"] is other
    module.on_load_checkpoint(calls)
    assert calls == ["own", "attach"]
    module.on_load_checkpoint = inner  # the other wrapper restores what it replaced: ours
    assert ours.remove() and "on_load_checkpoint" not in vars(module)
    instance_hook = module.on_load_checkpoint = lambda checkpoint: checkpoint.append("instance")
    assert ModelLoadHook(module, before=lambda checkpoint: None).remove()
    assert vars(module)["on_load_checkpoint"] is instance_hook


def test_a_step_schedule_compacts_at_the_end_of_the_epoch_in_which_it_ends(trainer_factory):
    pruning = schedule_end_pruning(schedule=AGP(start=0, end=6, unit="step"))
    probe = Probe()
    trainer = trainer_factory(callbacks=[pruning, probe], max_epochs=3, limit_train_batches=4, limit_val_batches=1)
    module = ClassifierModule(PlainCNN(width=8), lr=3e-3)
    dense = count(module.backbone)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert pruning.compacted_at == 1  # step 6 falls in epoch 1 (steps 4-7)
    assert probe.parameters[0] == dense > probe.parameters[1] == probe.parameters[2] == count(module.backbone)
    assert module.backbone.block2.conv.out_channels == 16 - round(0.4 * 16)


def test_a_fit_ending_before_the_schedule_warns_and_a_resumed_run_compacts_on_its_first_step(tmp_path):
    def run(epochs, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        pruning, probe = schedule_end_pruning(), Probe()
        checkpoints = ModelCheckpoint(dirpath=tmp_path / f"ckpt{epochs}", save_top_k=-1, every_n_epochs=1,
                                      filename="{epoch}")
        trainer = make_trainer(tmp_path, callbacks=[pruning, probe, checkpoints], max_epochs=epochs, logger=False,
                               limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True)
        module = ClassifierModule(PlainCNN(width=8), lr=3e-3)
        trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
        return pruning, probe, module

    with pytest.warns(UserWarning, match="stopped before the schedule's end"):
        pruning, _, module = run(END - 1)  # finalized at its last epoch, the schedule not ended
    assert pruning.finalized and pruning.compacted_at is None and module.backbone.block2.conv.out_channels == 16
    pruning, probe, module = run(END + 1, ckpt_path=tmp_path / f"ckpt{END - 1}" / f"epoch={END - 2}.ckpt")
    assert pruning.compacted_at == END - 1 and module.backbone.block2.conv.out_channels == 16 - round(0.4 * 16)
    assert probe.started[0] > probe.parameters[0] == probe.parameters[1]  # compacted before its first step


# -- refused combinations ----------------------------------------------------------------------------------------
def test_compact_every_epoch_and_at_schedule_end_exclude_each_other():
    with pytest.raises(ValueError, match="choose one"):
        FilterPruning(mode="hard", compact_every_epoch=True, compact_at_schedule_end=True)


class FailOnStep(ClassifierModule):
    def training_step(self, batch, batch_idx):
        raise AssertionError("a training step ran")


def test_quantization_starting_before_the_compaction_fails_before_the_first_step(trainer_factory):
    from lightning_compress import QuantizationAwareTraining

    trainer = trainer_factory(callbacks=[schedule_end_pruning(), QuantizationAwareTraining(start_epoch=2)],
                              max_epochs=5, limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"start_epoch=2.*end of epoch 2.*start_epoch >= 3"):
        trainer.fit(FailOnStep(PlainCNN(width=4)), DigitsDataModule(batch_size=16))


@pytest.mark.parametrize("quantization_first", [False, True])
@pytest.mark.parametrize(("start_epoch", "unit", "message"), [
    (2, "step", r"start_epoch=2.*end of epoch 2 \(its schedule ends at step 5\).*start_epoch >= 3"),  # 2 per epoch
    (0, "step", r"start_epoch=0.*end of the epoch that reaches it.*step 5"),  # known before the loaders exist
    (0, "epoch", r"start_epoch=0.*end of epoch 4.*start_epoch >= 5"),
])
def test_quantization_before_the_compaction_leaves_the_model_untouched(trainer_factory, start_epoch, unit, message,
                                                                       quantization_first):
    from lightning_compress import QuantizationAwareTraining

    callbacks = [schedule_end_pruning(schedule=AGP(start=0, end=5, unit=unit)),
                 QuantizationAwareTraining(start_epoch=start_epoch)]
    trainer = trainer_factory(callbacks=callbacks[::-1] if quantization_first else callbacks, max_epochs=6,
                              limit_train_batches=2, limit_val_batches=0)
    network = PlainCNN(width=4)
    before = copy.deepcopy(network.state_dict())
    with pytest.raises(ValueError, match=message):
        trainer.fit(FailOnStep(network), DigitsDataModule(batch_size=16))
    assert network.state_dict().keys() == before.keys()


def test_quantization_after_a_compaction_in_steps_is_accepted(trainer_factory):
    from lightning_compress import QuantizationAwareTraining

    pruning = schedule_end_pruning(schedule=AGP(start=0, end=5, unit="step"))  # compaction at the end of epoch 2
    qat = QuantizationAwareTraining(start_epoch=3, calibration_batches=1)
    trainer = trainer_factory(callbacks=[pruning, qat], max_epochs=4, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=16))
    assert pruning.compacted_at == 2 and qat.attached


def test_quantized_layers_at_the_compaction_are_refused(trainer_factory):
    from lightning_compress.quantization.quantizers import QuantSpec, attach_quantizer

    class QuantizeFirst(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            attach_quantizer(pl_module.backbone.block1.conv, QuantSpec(num_bits=8))

    pruning = schedule_end_pruning(schedule=Constant(start=0))
    trainer = trainer_factory(callbacks=[QuantizeFirst(), pruning], max_epochs=2, limit_train_batches=2,
                              limit_val_batches=0)
    with pytest.raises(ValueError, match=r"quantized layers \['block1.conv'\].*after the compaction"):
        trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=16))


# -- DDP ---------------------------------------------------------------------------------------------------------
class SaveRank(pl.Callback):
    def __init__(self, directory, pruning):
        self.directory, self.pruning = directory, pruning

    def on_fit_end(self, trainer, pl_module):  # after FilterPruning's (callback order)
        backbone = pl_module.backbone
        torch.save({"weights": {k: v.detach().clone() for k, v in backbone.state_dict().items()},
                    "outputs": outputs(backbone), "events": self.pruning.events},
                   self.directory / f"rank{trainer.global_rank}.pt")


DDP_CASES = {
    # stage3 is left alone: some parameters survive the compaction, the DDP wrapper must still follow all of them
    "schedule-end-soft": lambda: schedule_end_pruning(schedule=AGP(start=0, end=2), exclude="stage3.*"),
    "every-epoch-hard": lambda: FilterPruning(sparsity=0.5, mode="hard", schedule=AGP(start=0, end=2),
                                              compact_every_epoch=True, recalibration_batches=0),
    "fit-end-copy": lambda: FilterPruning(sparsity=0.4, mode="soft", compact_on_fit_end=True, recalibration_batches=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DDP_CASES))
def test_ddp_ranks_end_identical_and_compact_and_the_main_process_gets_the_network_back(tmp_path, case):
    from lightning_compress.pruning import compact

    pruning = DDP_CASES[case]()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_notebook", max_epochs=4, limit_train_batches=4,
                         limit_val_batches=2, callbacks=[pruning, SaveRank(tmp_path, pruning)], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    module = ClassifierModule(ResidualCNN(width=8), lr=3e-3)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["events"] == ranks[1]["events"] and bool(ranks[0]["events"]) == (case != "fit-end-copy")
    for key, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][key], value, atol=0, rtol=0, msg=key)
    weights = ranks[0]["weights"]
    assert weights["stage2.0.conv1.weight"].shape[0] < 16 and weights["stem.conv.weight"].shape[0] < 8
    # The main process holds the same network in the original shapes (removed channels zero); compact shrinks it.
    backbone = module.backbone
    assert backbone.stage2[0].conv1.weight.shape[0] == 16
    torch.testing.assert_close(outputs(backbone), ranks[0]["outputs"], atol=1e-5, rtol=0)
    small = compact(backbone.eval(), PROBE[:2])
    assert small.state_dict().keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(small.state_dict()[key], value, atol=0, rtol=0, msg=key)
    if case != "fit-end-copy":
        assert float(trainer.callback_metrics["prune/compacted"]) == 1.0


class Killed(Exception):
    pass


class StopAtEpoch(pl.Callback):
    """A run killed when epoch ``epoch`` starts (its last checkpoint is the one written before)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Killed


@pytest.mark.parametrize("validation", [{"val_check_interval": 0.5}, {"check_val_every_n_epoch": 2}],
                         ids=["twice-per-epoch", "every-2-epochs"])
@pytest.mark.parametrize("compaction", ["schedule_end", "every_epoch"])
def test_checkpoints_saved_at_validation_end_hold_the_compaction(tmp_path, validation, compaction):
    """With validation more or less often than once per epoch, ModelCheckpoint saves at validation end, before
    on_train_epoch_end: the epoch's compaction happens before that validation, so the checkpoint holds the compact
    network and a resume, with QAT starting the next epoch, equals the uninterrupted run."""
    from lightning_compress import QuantizationAwareTraining

    def callbacks():
        pruning = (schedule_end_pruning(schedule=AGP(start=0, end=2)) if compaction == "schedule_end" else
                   FilterPruning(0.4, mode="hard", schedule=AGP(start=0, end=2), compact_every_epoch=True))
        return [pruning, QuantizationAwareTraining(calibration_batches=1, start_epoch=2)]

    def run(directory, extra=(), ckpt=None):
        pl.seed_everything(0, verbose=False)
        module = ClassifierModule(PlainCNN(width=8), lr_scheduler="none")
        saver = ModelCheckpoint(dirpath=str(directory), save_last=True)
        trainer = make_trainer(tmp_path / "logs", callbacks=[*callbacks(), saver, *extra], max_epochs=3,
                               limit_train_batches=4, limit_val_batches=2, enable_checkpointing=True, logger=False,
                               **validation)
        with contextlib.suppress(Killed):
            trainer.fit(module, DigitsDataModule(batch_size=32, seed=0), ckpt_path=ckpt)
        return module

    uninterrupted = run(tmp_path / "a")
    run(tmp_path / "b", [StopAtEpoch(2)])
    checkpoint = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"]["backbone.block1.conv.weight"].shape[0] < 8  # compacted before the save
    resumed = run(tmp_path / "c", ckpt=tmp_path / "b" / "last.ckpt")
    expected = uninterrupted.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)
