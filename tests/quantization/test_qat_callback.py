"""QuantizationAwareTraining: attaching without changing keys, phases, checkpoints, validation, logging."""

from __future__ import annotations

import copy
import io
import pickle

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import QuantizationAwareTraining
from lightning_compress.demo import MLP, ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.quantization.ptq import (
    _Calibration,
    _calibration_pass,
    _start_calibration,
    attach_all,
    resolve_specs,
)
from lightning_compress.quantization.quantizers import (
    QuantConv2d,
    QuantLinear,
    float_state_dict,
    quantized_layers,
    remove_quantizers,
)
from lightning_compress.testing import read_scalars


@pytest.fixture(scope="module")
def digits_dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, seed=0)


def _module(plain: bool = False) -> ClassifierModule:
    torch.manual_seed(0)
    backbone = PlainCNN(width=4) if plain else MLP(hidden=(32,))
    return ClassifierModule(backbone, lr=3e-3, lr_scheduler="none")


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_bits": 1}, "num_bits=1"),
        ({"num_bits": 17}, "num_bits=17"),
        ({"calibration": "minmax"}, "'minmax'"),
        ({"percentile": 0.0}, "percentile=0.0"),
        ({"percentile": 100.5}, "percentile=100.5"),
        ({"calibration": "global", "amax": 0.0}, "amax 0.0"),
        ({"calibration": "global", "amax": {"fc": -1.0}}, "amax -1.0"),
        ({"calibration": "global"}, "needs amax"),
        ({"learn": "adaround"}, "'adaround'"),
        ({"bit_widths": {"fc": 20}}, "bit_widths['fc']"),
        ({"calibration_data": "test"}, "'test'"),
    ],
)
def test_init_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        QuantizationAwareTraining(**kwargs)


def _nan_loader(bad: float) -> DataLoader:
    x = torch.randn(32, 1, 8, 8)
    x[3, 0, 0, 0] = bad
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (32,))), batch_size=16)


@pytest.mark.parametrize(
    ("callback", "data", "message"),
    [
        (QuantizationAwareTraining(layers=["nope"]), None, "'nope' matches no layer"),
        (QuantizationAwareTraining(layers=["block1.bn"]), None, "'block1.bn' matches no layer"),
        (QuantizationAwareTraining(bit_widths={"missing.*": 4}), None, "'missing.*' matches no layer"),
        (QuantizationAwareTraining(calibration="global", amax={"block.*": 2.0}), None, "'classifier'"),
        (QuantizationAwareTraining(), float("nan"), "layer 'block1.conv' contains 1 NaN"),
        (QuantizationAwareTraining(calibration="entropy"), float("inf"), "'block1.conv' contains 0 NaN and 1 Inf"),
        (QuantizationAwareTraining(unsigned=True), 0.0, "unsigned=True but layer 'block1.conv' has negative"),
    ],
)
def test_bad_model_or_data_fails_before_first_step(trainer_factory, digits_dm, callback, data, message) -> None:
    module = _module(plain=True)
    before = copy.deepcopy(module.backbone.block1.conv.weight.detach())
    trainer = trainer_factory(callbacks=[callback], num_sanity_val_steps=0, logger=False)
    loader = digits_dm if data is None else None
    with pytest.raises(ValueError, match=message):
        if loader is not None:
            trainer.fit(module, datamodule=loader)
        else:
            trainer.fit(module, train_dataloaders=_nan_loader(data))
    assert trainer.global_step == 0
    assert torch.equal(module.backbone.block1.conv.weight.detach(), before)


def test_unsupported_layer_type_is_named() -> None:
    class MyLinear(nn.Linear):  # its own forward: not a plain Linear (a construction-only subclass would do)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).relu()

    model = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 2))
    with pytest.raises(ValueError, match=r"\{'1': 'MyLinear'\}"):
        resolve_specs(model, layers=None, exclude=None, num_bits=8, bit_widths=None, per_channel=True,
                      unsigned=False, learn="none")


# ------------------------------------------------------------------------------------- keys and classes


def test_attach_and_remove_keep_user_keys() -> None:
    model = ResidualCNN(width=4)
    float_keys = list(model.state_dict())
    specs = resolve_specs(model, layers=None, exclude=["fc"], num_bits=8, bit_widths={"stem.*": 4},
                          per_channel=True, unsigned=False, learn="lsq")
    attach_all(model, specs)
    assert isinstance(model.stem.conv, QuantConv2d) and isinstance(model.fc, nn.Linear)
    assert not isinstance(model.fc, QuantLinear)
    assert model.stem.conv.weight_quantizer.num_bits == 4 and model.stage1[0].conv1.input_quantizer.num_bits == 8
    keys = list(model.state_dict())
    assert [k for k in keys if k in float_keys] == float_keys
    assert "stem.conv.weight_quantizer.step" in keys and "stem.conv.input_quantizer.amax" in keys
    assert list(float_state_dict(model.state_dict())) == float_keys
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    assert type(clone.stem.conv) is QuantConv2d and type(restored.stem.conv) is QuantConv2d
    edges = resolve_specs(ResidualCNN(width=4), layers=None, exclude=None, num_bits=8, bit_widths=None,
                          per_channel=False, unsigned=False, learn="none", skip_first_and_last=True)
    assert "stem.conv" not in edges and "fc" not in edges and "stage1.0.conv1" in edges
    assert not edges["stage1.0.conv1"].per_channel
    names = remove_quantizers(model)
    assert "stem.conv" in names and list(model.state_dict()) == float_keys
    assert type(model.stem.conv) is nn.Conv2d and not quantized_layers(model)
    model(torch.zeros(2, 1, 8, 8))


# --------------------------------------------------------------------------------------- phases, logging


def test_phases_logging_and_freeze(trainer_factory, digits_dm, tmp_path) -> None:
    module = _module(plain=True)
    callback = QuantizationAwareTraining(calibration="percentile", calibration_batches=3, freeze_epoch=1)
    trainer = trainer_factory(callbacks=[callback], max_epochs=2, limit_train_batches=5, limit_val_batches=2)
    trainer.fit(module, datamodule=digits_dm)
    assert callback.phase == "frozen" and callback.calibrated_batches == 3
    scalars = read_scalars(tmp_path)
    assert [v for _, v in scalars["quant/phase"]] == [1.0, 2.0]
    for name in ("block1.conv", "block3.conv", "classifier"):
        assert scalars[f"quant/amax/{name}"][-1][1] > 0
        assert scalars[f"quant/weight_amax/{name}"][-1][1] > 0
        assert 0 < scalars[f"quant/error/{name}"][-1][1] < 1
    # frozen: BatchNorm statistics and weight amax no longer move
    bn = module.backbone.block1.bn
    stats, amax = bn.running_mean.clone(), module.backbone.block1.conv.weight_quantizer.amax.clone()
    trainer2 = trainer_factory(callbacks=[callback], max_epochs=3, limit_train_batches=3, limit_val_batches=1)
    trainer2.fit(module, datamodule=digits_dm)
    assert torch.equal(bn.running_mean, stats)
    assert torch.equal(module.backbone.block1.conv.weight_quantizer.amax, amax)
    assert callback.calibrated_batches == 3  # fit twice: no second calibration


def test_training_phase_observes_weights_and_fakequantizes(trainer_factory, digits_dm) -> None:
    module = _module()
    callback = QuantizationAwareTraining(num_bits=4, calibration_batches=2, ranges="fixed")  # signed, as calibrated
    trainer_factory(callbacks=[callback], limit_train_batches=4, limit_val_batches=1).fit(module, digits_dm)
    layer = module.backbone.classifier
    assert torch.allclose(layer.weight_quantizer.amax, layer.weight.detach().abs().amax(dim=1))
    x = torch.randn(5, 32)
    step = layer.input_quantizer.amax / 7  # 4 bits, narrow range: levels -7..7
    with torch.no_grad():
        quantized = layer.input_quantizer(x)
    # on the 4-bit grid (an identity quantizer would leave x off it), and within half a step of x inside the range
    torch.testing.assert_close(quantized / step, torch.round(quantized / step), rtol=0, atol=1e-4)
    assert not torch.allclose(quantized, x) and torch.round(quantized / step).abs().max() <= 7
    inside = x.abs() <= layer.input_quantizer.amax
    assert inside.any() and bool(((quantized - x)[inside].abs() <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("learn", ["lsq", "pact"])
def test_learned_scales_train(trainer_factory, learn) -> None:
    dm = DigitsDataModule(batch_size=64, seed=0, normalization="unit")  # non-negative inputs for PACT
    module = _module()
    callback = QuantizationAwareTraining(learn=learn, calibration_batches=2)
    trainer_factory(callbacks=[callback], limit_train_batches=6, limit_val_batches=1).fit(module, dm)
    inq = module.backbone.layers.fc1.input_quantizer
    learned = inq.step if learn == "lsq" else inq.alpha
    calibrated = callback.calibrators["layers.fc1"].compute_amax() / (inq.qmax if learn == "lsq" else 1)
    assert learned.requires_grad and not torch.allclose(learned.detach().abs(), calibrated)
    assert torch.equal(inq.amax, inq.current_amax())  # synced into the buffer at the end of training


def test_global_and_val_calibration(trainer_factory, digits_dm) -> None:
    module = _module()
    callback = QuantizationAwareTraining(calibration="global", amax={"layers.*": 3.0, "classifier": 5.0})
    trainer_factory(callbacks=[callback], limit_train_batches=2, limit_val_batches=1).fit(module, digits_dm)
    assert float(module.backbone.layers.fc1.input_quantizer.amax) == 3.0
    assert float(module.backbone.classifier.input_quantizer.amax) == 5.0
    module = _module()
    callback = QuantizationAwareTraining(calibration_data="val", calibration_batches=2)
    trainer = trainer_factory(callbacks=[callback], limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, digits_dm)
    val = torch.cat([b[0] for b, _ in zip(digits_dm.val_dataloader(), range(2), strict=False)])
    assert float(module.backbone.layers.fc1.input_quantizer.amax) == pytest.approx(float(val.abs().max()))


# ---------------------------------------------------------------------------------- checkpoint / resume


def _fit(trainer_factory, dm, callback, epochs, ckpt=None, module=None):
    module = module or _module(plain=True)
    trainer = trainer_factory(callbacks=[callback], max_epochs=epochs, limit_train_batches=6, limit_val_batches=1)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module, trainer


@pytest.mark.parametrize("calibration_batches", [8, 3])
def test_resume_continues_exactly(trainer_factory, digits_dm, tmp_path, calibration_batches) -> None:
    def make() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(calibration="entropy", calibration_batches=calibration_batches,
                                         freeze_epoch=1)

    straight, _ = _fit(trainer_factory, digits_dm, make(), 2)
    first_cb = make()
    _, first = _fit(trainer_factory, digits_dm, first_cb, 1)
    path = str(tmp_path / "epoch1.ckpt")
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]["QuantizationAwareTraining"]
    assert saved["phase"] == ("calibrating" if calibration_batches > 6 else "training")
    resumed_cb = make()
    resumed, _ = _fit(trainer_factory, digits_dm, resumed_cb, 2, ckpt=path)
    assert resumed_cb.phase == "frozen" and resumed_cb.calibrated_batches == calibration_batches
    for (key, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    counts = first_cb.calibrators["block2.conv"].counts
    assert counts.sum() > 0 and counts.numel() >= 2048


def test_checkpoint_loads_into_fresh_model(trainer_factory, digits_dm, tmp_path) -> None:
    fit_callback = QuantizationAwareTraining(calibration_batches=2)
    module, trainer = _fit(trainer_factory, digits_dm, fit_callback, 1)
    path = str(tmp_path / "qat.ckpt")
    trainer.save_checkpoint(path)
    fresh = _module(plain=True)
    tester = trainer_factory(callbacks=[QuantizationAwareTraining()], limit_test_batches=2)
    results = tester.test(fresh, datamodule=digits_dm, ckpt_path=path)
    assert results[0]["test/acc"] > 0
    restored, trained = fresh.backbone.block2.conv, module.backbone.block2.conv
    assert torch.equal(restored.input_quantizer.amax, trained.input_quantizer.amax)
    same = trainer_factory(callbacks=[fit_callback], limit_test_batches=2)  # the callback that trained it
    assert same.test(module, datamodule=digits_dm, ckpt_path=path)[0]["test/acc"] == results[0]["test/acc"]
    # validating before any training: float where nothing was calibrated (not amax 0)
    untrained = _module(plain=True)
    float_acc = trainer_factory(limit_val_batches=2).validate(untrained, digits_dm)[0]["val/acc"]
    cb = QuantizationAwareTraining()
    assert trainer_factory(callbacks=[cb], limit_val_batches=2).validate(untrained, digits_dm)[0]["val/acc"] == (
        float_acc)
    # without the callback: strip the quantizer keys
    plain = _module(plain=True)
    state = torch.load(path, weights_only=False)["state_dict"]
    plain.load_state_dict(float_state_dict(state), strict=True)


@pytest.mark.parametrize("learn", ["none", "lsq"])
def test_a_checkpoint_saved_while_calibrating_evaluates_in_float_as_fit_did(trainer_factory, digits_dm, tmp_path,
                                                                            learn) -> None:
    """Fit computes in float until calibration ends; so does validate/test from such a checkpoint (an LSQ step or
    PACT alpha not yet initialised from the calibration is not a scale: it quantized with step 1 before)."""
    def make() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(calibration_batches=100, learn=learn)  # still calibrating after 6 batches

    module, trainer = _fit(trainer_factory, digits_dm, make(), 1)
    path = str(tmp_path / "calibrating.ckpt")
    trainer.save_checkpoint(path)
    fresh = _module(plain=True)
    tester = trainer_factory(callbacks=[make()], limit_val_batches=2)
    from_checkpoint = tester.validate(fresh, datamodule=digits_dm, ckpt_path=path)[0]["val/acc"]
    float_acc = trainer_factory(limit_val_batches=2).validate(module, datamodule=digits_dm)[0]["val/acc"]
    assert from_checkpoint == float_acc
    inputs = next(iter(digits_dm.val_dataloader()))[0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(inputs), module.eval()(inputs))


class _UserNet(pl.LightningModule):
    """A user's module: the layers are its own attributes (no ``compression_target``), plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.relu(self.conv1(x)).flatten(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("learn", ["none", "lsq"])
def test_a_checkpoint_saved_while_training_evaluates_as_fit_does(trainer_factory, tmp_path, learn) -> None:
    """validate(ckpt_path=...) on a fresh module computes in the checkpoint's phase: LSQ weights keep their learned
    step (their amax buffer is only written at the end of fit; they were left float), others observe as in fit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def make() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(calibration_batches=2, learn=learn, num_bits=4)

    generator = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(128, 1, 8, 8, generator=generator),
                                    torch.randint(0, 10, (128,), generator=generator)), batch_size=32)
    pl.seed_everything(0, verbose=False)
    module = _UserNet()
    saver = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)  # saved at the epoch's end, before the fit's end
    trainer = trainer_factory(callbacks=[make(), saver], max_epochs=2, enable_checkpointing=True, logger=False)
    trainer.fit(module, data, data)
    in_memory = trainer.validate(module, data, verbose=False)[0]["val_loss"]
    fresh = _UserNet()
    tester = trainer_factory(callbacks=[make()], logger=False)
    from_checkpoint = tester.validate(fresh, data, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert from_checkpoint[0]["val_loss"] == pytest.approx(in_memory, abs=1e-6)
    assert fresh.conv1.weight_quantizer.enabled and fresh.fc.weight_quantizer.enabled


def test_calibrator_state_does_not_grow() -> None:
    model = PlainCNN(width=4)
    layers = attach_all(model, resolve_specs(model, layers=None, exclude=None, num_bits=8, bit_widths=None,
                                             per_channel=True, unsigned=False, learn="none"))
    batches = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sizes = []
    for passes in (10, 100):
        calibrators = _start_calibration(layers, _Calibration("entropy"))
        for layer in layers.values():
            layer.input_quantizer.calibrating = True
        _calibration_pass(model, batches * passes, None, torch.device("cpu"))
        buffer = io.BytesIO()
        torch.save({n: c.state_dict() for n, c in calibrators.items()}, buffer)
        sizes.append(buffer.getbuffer().nbytes)
        assert int(calibrators["block1.conv"].counts.sum()) == passes * 2 * 16 * 64
    assert sizes[0] == sizes[1]


@pytest.mark.slow
def test_qat_reaches_float_accuracy(trainer_factory, digits_dm) -> None:
    results = {}
    for name, callbacks in (("fp32", []), ("qat", [QuantizationAwareTraining(calibration="entropy")])):
        pl.seed_everything(0)
        module = ClassifierModule(PlainCNN(width=16), lr=3e-3)
        trainer = trainer_factory(callbacks=callbacks, max_epochs=4)
        trainer.fit(module, datamodule=digits_dm)
        results[name] = trainer.test(module, datamodule=digits_dm)[0]["test/acc"]
        if callbacks:  # the QAT run did train and test a fake-quantized network
            assert callbacks[0].phase == "training" and len(quantized_layers(module.backbone)) == 4
    print(results)
    assert results["qat"] >= results["fp32"] - 0.01, results


class _SaveScales(pl.Callback):
    def __init__(self, directory) -> None:
        self.directory, self.batches = directory, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[0].clone())

    def on_train_end(self, trainer, pl_module) -> None:
        scales = {k: v.clone() for k, v in pl_module.state_dict().items() if k.endswith("amax")}
        torch.save((scales, self.batches), self.directory / f"rank{trainer.global_rank}.pt")


def test_ddp_reduces_statistics_before_amax(tmp_path) -> None:
    data = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    data[5] *= 4.0  # one wide sample on one rank: the histogram range must be all-reduced
    loader = DataLoader(TensorDataset(data, torch.randint(0, 10, (64,))), batch_size=8)
    callback = QuantizationAwareTraining(calibration="entropy", calibration_batches=3, num_bins=128, start_bin=16,
                                         ranges="fixed")  # the calibrated amax, not tracked on from there
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[callback, _SaveScales(tmp_path)], limit_train_batches=4)
    trainer.fit(_module(plain=True), train_dataloaders=loader)
    (rank0, batches0), (rank1, batches1) = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # one process collecting the global batches (the union of both ranks' batches at each step)
    from lightning_compress.quantization.calibrators import HistogramCalibrator

    reference = HistogramCalibrator(128)
    for step in range(3):
        reference.collect(torch.cat([batches0[step], batches1[step]]))
    expected = reference.compute_amax("entropy", start_bin=16)
    assert float(rank0["backbone.block1.conv.input_quantizer.amax"]) == pytest.approx(float(expected), rel=1e-6)


# ------------------------------------------------------------------------------- with the other families


def test_with_magnitude_pruning(trainer_factory, digits_dm) -> None:
    from lightning_compress.pruning.magnitude_callback import MagnitudePruning

    module = _module()
    callbacks = [MagnitudePruning(sparsity=0.5), QuantizationAwareTraining(calibration_batches=2)]
    trainer_factory(callbacks=callbacks, max_epochs=2, limit_train_batches=4, limit_val_batches=1).fit(module,
                                                                                                       digits_dm)
    fc1 = module.backbone.layers.fc1
    assert isinstance(fc1, QuantLinear)
    assert float((fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():  # pruned weights stay exactly zero through fake quantization
        assert torch.equal(fc1.weight_quantizer(fc1.weight) == 0, fc1.weight == 0)


def test_with_distillation_quantizes_only_the_student(trainer_factory, digits_dm) -> None:
    from lightning_compress.distillation import DistillationModule

    torch.manual_seed(0)
    teacher, student = PlainCNN(width=4), MLP(hidden=(16,))
    teacher_state = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(student, teacher, lr=3e-3)
    callback = QuantizationAwareTraining(calibration_batches=2)
    trainer_factory(callbacks=[callback], limit_train_batches=4, limit_val_batches=1).fit(module, digits_dm)
    assert set(callback.quantized_layers) == {"layers.fc1", "classifier"}
    assert quantized_layers(student) and not quantized_layers(teacher)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
