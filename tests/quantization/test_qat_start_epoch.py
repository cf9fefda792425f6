"""QuantizationAwareTraining(start_epoch=...): float training first (with in-place compaction in between), then
quantizers attached mid-fit; exact resume before, during and after calibration; loading; DDP."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_compress import FilterPruning, QuantizationAwareTraining
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.pruning.schedules import AGP
from lightning_compress.quantization.qat_start import learned_parameters
from lightning_compress.quantization.quantizers import QuantConv2d, quantized_layers
from lightning_compress.testing import read_scalars

BATCHES = 4  # training batches per epoch


class Record(pl.Callback):
    """Placed after the QAT callback: what the network and the callback look like at each epoch / batch."""

    def __init__(self, qat: QuantizationAwareTraining) -> None:
        self.qat = qat
        self.epochs: list[tuple[int, int, str, int]] = []  # (epoch, block2 filters, block2 class, quantized layers)
        self.phases: list[tuple[int, str]] = []  # (epoch, phase after each training batch)
        self.groups: list[int] = []  # parameter groups of the optimizer at each epoch start

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        conv = pl_module.backbone.block2.conv
        self.epochs.append((trainer.current_epoch, conv.out_channels, type(conv).__name__,
                            len(quantized_layers(pl_module.backbone))))
        self.groups.append(len(trainer.optimizers[0].param_groups))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.phases.append((trainer.current_epoch, self.qat.phase if self.qat.attached else "float"))


def _pruning() -> FilterPruning:  # filters removed in place at the ends of epochs 0 and 1, none after
    return FilterPruning(sparsity=0.5, mode="hard", schedule=AGP(start=0, end=2), compact_every_epoch=True,
                         recalibration_batches=0)


def _run(factory, root: Path, qat: QuantizationAwareTraining, epochs: int, *, pruning: FilterPruning | None = None,
         pruning_first: bool = True, ckpt: Path | None = None, tag: str = "full", learn_rate: float = 3e-3):
    """``factory``: the ``trainer_factory`` fixture (tests/conftest.py's ``make_trainer``)."""
    pl.seed_everything(0, verbose=False)
    record = Record(qat)
    callbacks: list[pl.Callback] = [qat] if pruning is None else [pruning, qat] if pruning_first else [qat, pruning]
    checkpoints = ModelCheckpoint(dirpath=root / tag, save_top_k=-1, filename="{epoch}")
    trainer = factory(max_epochs=epochs, callbacks=[*callbacks, record, checkpoints], limit_train_batches=BATCHES,
                      limit_val_batches=2, enable_checkpointing=True, num_sanity_val_steps=0,
                      logger=TensorBoardLogger(str(root), name=f"logs-{tag}"))
    module = ClassifierModule(PlainCNN(width=8), lr=learn_rate, lr_scheduler="none")
    trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt)
    return module, trainer, record


def _assert_same_run(a: QuantizationAwareTraining, b: QuantizationAwareTraining, ma, mb) -> None:
    assert (a.phase, a.calibrated_batches, a.attached) == (b.phase, b.calibrated_batches, b.attached)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        torch.testing.assert_close(sb[key], value, atol=1e-6, rtol=0, msg=key)
    for key, value in a.state_dict()["amax"].items():
        torch.testing.assert_close(b.state_dict()["amax"][key], value, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"start_epoch": -1}, "start_epoch=-1"),
    ({"start_epoch": 1.5}, "start_epoch=1.5"),
    ({"start_epoch": True}, "start_epoch=True"),
    ({"start_epoch": "2"}, "start_epoch='2'"),
    ({"start_epoch": 3, "freeze_epoch": 2}, "freeze_epoch=2 must be >= start_epoch=3"),
])
def test_bad_start_epoch_is_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_bad_layer_pattern_fails_in_setup_even_before_the_start(trainer_factory) -> None:
    trainer = trainer_factory(callbacks=[QuantizationAwareTraining(start_epoch=2, layers="nope")],
                           limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(ValueError, match="nope"):
        trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=32))


def test_a_start_after_the_last_epoch_warns_in_setup(trainer_factory) -> None:
    qat = QuantizationAwareTraining(start_epoch=3)
    trainer = trainer_factory(callbacks=[qat], max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"start_epoch=3\) starts after the last epoch \(max_epochs=3\): this fit "
                                         "will not quantize the network"):
        trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=32))
    assert not qat.attached


# --------------------------------------------------------------------------------------- the start itself


def test_float_before_the_start_then_calibrates_over_steps_and_trains(trainer_factory, tmp_path) -> None:
    qat = QuantizationAwareTraining(start_epoch=1, calibration="entropy", calibration_batches=3)
    module, _, record = _run(trainer_factory, tmp_path, qat, epochs=3)
    assert [row[3] for row in record.epochs] == [0, 4, 4]  # nothing quantized in epoch 0; 3 convs + classifier
    assert [phase for epoch, phase in record.phases if epoch == 0] == ["float"] * BATCHES
    assert [phase for epoch, phase in record.phases if epoch == 1] == ["calibrating"] * 2 + ["training"] * 2
    assert qat.calibrated_batches == 3 and qat.phase == "training"
    scalars = read_scalars(tmp_path / "logs-full")
    assert [value for _, value in scalars["quant/phase"]] == [-1.0, 1.0, 1.0]
    assert [step for step, _ in scalars["quant/amax/block2.conv"]] == [s for s, _ in scalars["quant/phase"][1:]]
    conv = module.backbone.block2.conv
    assert float(conv.input_quantizer.amax) > 0
    torch.testing.assert_close(conv.weight_quantizer.amax, conv.weight.detach().abs().amax(dim=(1, 2, 3)))
    assert "on_load_checkpoint" not in module.__dict__  # the module's own hook again


def test_before_the_start_training_is_plain_float_training(trainer_factory, tmp_path) -> None:
    with_qat, _, _ = _run(trainer_factory, tmp_path, QuantizationAwareTraining(start_epoch=5), epochs=2, tag="qat")
    pl.seed_everything(0, verbose=False)
    plain = ClassifierModule(PlainCNN(width=8), lr=3e-3, lr_scheduler="none")
    trainer = trainer_factory(max_epochs=2, limit_train_batches=BATCHES, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(plain, DigitsDataModule(batch_size=32))
    assert quantized_layers(with_qat) == {}
    for key, value in plain.state_dict().items():
        assert torch.equal(with_qat.state_dict()[key], value), key


@pytest.mark.parametrize("data", ["train", "val", "global"])
def test_train_val_and_global_calibration_happen_at_the_start(trainer_factory, tmp_path, data) -> None:
    options = {"calibration": "global", "amax": 2.5} if data == "global" else {"calibration_data": data}
    qat = QuantizationAwareTraining(start_epoch=1, calibration_batches=2, **options)
    module, _, record = _run(trainer_factory, tmp_path, qat, epochs=2)
    assert [phase for epoch, phase in record.phases if epoch == 1] == ["training"] * BATCHES
    amax = float(module.backbone.block1.conv.input_quantizer.amax)
    if data == "global":
        assert amax == 2.5
    else:  # the max calibrator over the loader's first 2 batches (training order: that of epoch 1, the start), whose
        # network input peaks at the standardised full-intensity pixel, as any digits batch does
        datamodule = DigitsDataModule(batch_size=32)
        datamodule.setup()
        loader = datamodule.val_dataloader() if data == "val" else datamodule.train_dataloader()
        if data == "train":
            loader.sampler.set_epoch(1)
        first = [inputs for (inputs, _), _ in zip(loader, range(2), strict=False)]
        assert amax == pytest.approx(float(torch.cat(first).abs().max()))


def test_learned_steps_join_the_optimizer_as_a_new_group(trainer_factory, tmp_path) -> None:
    qat = QuantizationAwareTraining(start_epoch=1, learn="lsq", calibration_batches=2)
    module, trainer, record = _run(trainer_factory, tmp_path, qat, epochs=2)
    assert record.groups == [1, 2]
    optimizer = trainer.optimizers[0]
    steps = learned_parameters(quantized_layers(module.backbone))
    assert [id(p) for p in optimizer.param_groups[1]["params"]] == [id(p) for p in steps]
    assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"]
    assert not {id(p) for p in steps} & {id(p) for p in optimizer.param_groups[0]["params"]}
    assert all(p in optimizer.state for p in steps)  # they trained after calibration


# --------------------------------------------------------------------------------- with in-place compaction


def test_attaches_to_the_layers_compacted_before_the_start(trainer_factory, tmp_path) -> None:
    qat = QuantizationAwareTraining(start_epoch=2, calibration_batches=2)
    module, trainer, record = _run(trainer_factory, tmp_path, qat, epochs=3, pruning=_pruning())
    widths = [row[1] for row in record.epochs]
    assert widths[0] == 16 and widths[1] < 16 and widths[2] < widths[1] and widths[2] == 8
    assert [row[2] for row in record.epochs] == ["Conv2d", "Conv2d", "QuantConv2d"]
    conv = module.backbone.block2.conv
    assert isinstance(conv, QuantConv2d) and conv.weight.shape[0] == 8
    assert conv.weight_quantizer.amax.shape == (8,) and bool((conv.weight_quantizer.amax > 0).all())
    assert module.backbone.block3.conv.weight.shape[1] == 8  # the consumer shrank too
    params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.backbone.parameters()} <= params


# ------------------------------------------------------------------------------------------- resume


@pytest.fixture
def plain_run(trainer_factory, tmp_path):
    """4 epochs, start at 1, calibration over 6 batches (epochs 1 and 2), frozen from 3."""
    root = tmp_path / "plain"

    def make() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(start_epoch=1, calibration="entropy", calibration_batches=6, freeze_epoch=3,
                                         num_bins=256, start_bin=32)

    qat = make()
    module, _, _ = _run(trainer_factory, root, qat, epochs=4)
    return root, make, qat, module


@pytest.mark.parametrize(("epoch", "saved_phase"), [(0, None), (1, "calibrating"), (2, "training")])
def test_resume_before_during_and_after_calibration_is_exact(trainer_factory, plain_run, epoch,
                                                             saved_phase) -> None:
    root, make, qat, module = plain_run
    path = root / "full" / f"epoch={epoch}.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][qat.state_key]
    assert saved["attached"] == (saved_phase is not None)
    assert saved["phase"] == (saved_phase or "calibrating")
    if saved_phase is None:  # nothing happened before the start
        assert saved["calibrated_batches"] == 0 and saved["amax"] == {} and saved["calibrators"] == {}
    resumed_qat = make()
    resumed, _, record = _run(trainer_factory, root, resumed_qat, epochs=4, ckpt=path, tag=f"resumed{epoch}")
    assert record.epochs[0][0] == epoch + 1
    assert qat.phase == "frozen"
    _assert_same_run(qat, resumed_qat, module, resumed)


@pytest.mark.parametrize(("epoch", "pruning_first"), [(1, True), (2, False), (3, True)])
def test_lsq_with_compaction_resumes_exactly(trainer_factory, tmp_path, epoch, pruning_first) -> None:
    def make() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(start_epoch=2, learn="lsq", calibration_batches=6)

    qat = make()
    full, full_trainer, _ = _run(trainer_factory, tmp_path, qat, epochs=5, pruning=_pruning())
    assert qat.phase == "training"
    resumed_qat = make()
    resumed, trainer, record = _run(trainer_factory, tmp_path, resumed_qat, epochs=5, pruning=_pruning(),
                                    pruning_first=pruning_first, ckpt=tmp_path / "full" / f"epoch={epoch}.ckpt",
                                    tag="resumed")
    assert record.groups == [2] * (5 - epoch - 1)  # the resumed optimizer has the learned steps' group
    _assert_same_run(qat, resumed_qat, full, resumed)
    groups, full_groups = trainer.optimizers[0].param_groups, full_trainer.optimizers[0].param_groups
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in full_groups]
    step = resumed.backbone.block2.conv.weight_quantizer.step
    assert step.shape == (8,) and any(p is step for p in groups[1]["params"])
    full_step = full.backbone.block2.conv.weight_quantizer.step
    torch.testing.assert_close(trainer.optimizers[0].state[step]["exp_avg"],
                               full_trainer.optimizers[0].state[full_step]["exp_avg"], atol=1e-6, rtol=0)
    assert "on_load_checkpoint" not in resumed.__dict__


# ------------------------------------------------------------------------------------------ loading


def test_checkpoints_load_into_fresh_models_for_testing(trainer_factory, plain_run) -> None:
    root, make, _, module = plain_run
    fresh = ClassifierModule(PlainCNN(width=8))
    tester = trainer_factory(callbacks=[make()], limit_test_batches=2)
    accuracy = tester.test(fresh, DigitsDataModule(batch_size=32), ckpt_path=root / "full" / "epoch=3.ckpt")
    assert isinstance(fresh.backbone.block2.conv, QuantConv2d)
    for name, layer in quantized_layers(module.backbone).items():
        restored = fresh.backbone.get_submodule(name)
        assert torch.equal(restored.input_quantizer.amax, layer.input_quantizer.amax), name
        assert torch.equal(restored.weight_quantizer.amax, layer.weight_quantizer.amax), name
    same = trainer_factory(callbacks=[make()], limit_test_batches=2)
    assert same.test(module, DigitsDataModule(batch_size=32))[0]["test/acc"] == accuracy[0]["test/acc"]
    assert "on_load_checkpoint" not in fresh.__dict__
    # a checkpoint from before the start: a float model
    early = ClassifierModule(PlainCNN(width=8))
    trainer_factory(callbacks=[make()], limit_test_batches=1).test(
        early, DigitsDataModule(batch_size=32), ckpt_path=root / "full" / "epoch=0.ckpt")
    assert quantized_layers(early) == {}


def test_fit_twice_continues_without_recalibrating(trainer_factory, tmp_path) -> None:
    qat = QuantizationAwareTraining(start_epoch=1, calibration_batches=2)
    module, _, _ = _run(trainer_factory, tmp_path, qat, epochs=2)
    amax = module.backbone.block1.conv.input_quantizer.amax.clone()
    trainer = trainer_factory(callbacks=[qat], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert qat.phase == "training" and qat.calibrated_batches == 2
    assert torch.equal(module.backbone.block1.conv.input_quantizer.amax, amax)


# ---------------------------------------------------------------------------------------------- DDP


class _SaveRank(pl.Callback):
    def __init__(self, directory: Path, qat: QuantizationAwareTraining) -> None:
        self.directory, self.qat, self.wrappers = directory, qat, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model
        seen = getattr(ddp, "seen_by_test", False)  # (ids of freed objects get reused: mark the wrapper instead)
        ddp.seen_by_test = True
        known = len(getattr(ddp, "modules_buffers", list(pl_module.buffers())))
        self.wrappers.append((seen, known == len(list(pl_module.buffers()))))

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}
        torch.save({"state": state, "phase": self.qat.phase, "wrappers": self.wrappers},
                   self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_starts_on_every_rank_with_identical_scales(trainer_factory, tmp_path) -> None:
    qat = QuantizationAwareTraining(start_epoch=1, calibration="entropy", calibration_batches=3, num_bins=256,
                                    start_bin=32)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_notebook", max_epochs=3, limit_train_batches=4,
                         limit_val_batches=2, callbacks=[qat, _SaveRank(tmp_path, qat), checkpoints], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    module = ClassifierModule(PlainCNN(width=8), lr=3e-3)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        assert rank["phase"] == "training"
        # a new wrapper at the start (epoch 1), which knows the quantizer buffers; the same one afterwards
        assert rank["wrappers"] == [(False, True), (False, True), (True, True)]
    amax_keys = [k for k in ranks[0]["state"] if k.endswith("amax")]
    assert len(amax_keys) == 8
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert all(float(ranks[0]["state"][k].abs().sum()) > 0 for k in amax_keys)
    # the workers' weights come back into the main process without the quantizer keys (Lightning loads them
    # non-strictly into the float module there); the last checkpoint quantizes it
    torch.testing.assert_close(module.backbone.block2.conv.weight, ranks[0]["state"]["block2.conv.weight"])
    tester = trainer_factory(callbacks=[QuantizationAwareTraining(start_epoch=1)], limit_test_batches=1)
    tester.test(module, DigitsDataModule(batch_size=16), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert isinstance(module.backbone.block2.conv, QuantConv2d)
    for key in amax_keys:
        assert torch.equal(module.backbone.state_dict()[key], ranks[0]["state"][key]), key
