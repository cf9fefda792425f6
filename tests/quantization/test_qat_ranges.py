"""QuantizationAwareTraining(ranges=...): input ranges that track the network while it trains (moving-average
min / max until freeze_epoch), chosen automatically from scratch, exact on resume, identical across DDP ranks."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import QuantizationAwareTraining
from lightning_compress.demo import MLP, ClassifierModule
from lightning_compress.quantization.qat_ranges import RangeTracker, connect_trackers
from lightning_compress.quantization.quantizers import QuantSpec, attach_quantizer, remove_quantizers

pytestmark = [pytest.mark.filterwarnings("ignore:.*val_dataloader"),
              pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint")]

LAYERS = ("layers.fc1", "classifier")


def _module() -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(MLP(in_features=16, hidden=(8,)), lr=1e-2, lr_scheduler="none")


def _loader(n: int = 32, batch_size: int = 8, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g) * torch.linspace(0.5, 3.0, n).view(n, 1, 1, 1)  # ranges grow
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=batch_size)


def _trainer(callbacks: list, **overrides) -> pl.Trainer:
    options = {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False, "enable_checkpointing": False, "num_sanity_val_steps": 0,
               "deterministic": True, "callbacks": callbacks}
    return pl.Trainer(**{**options, **overrides})


class _RecordInputs(pl.Callback):
    """The input of every quantized layer at every training step, and its ``amax`` after each epoch."""

    def __init__(self) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in LAYERS}
        self.amax: list[dict[str, float]] = []
        self.hooks: list = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for name in LAYERS:
            layer = pl_module.backbone.get_submodule(name)
            self.hooks.append(layer.register_forward_pre_hook(
                lambda m, args, name=name: self.inputs[name].append(args[0].detach().clone())))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.amax.append({n: float(pl_module.backbone.get_submodule(n).input_quantizer.amax) for n in LAYERS})


def _ema(start_low: float, start_high: float, batches: list[torch.Tensor], c: float = 0.01) -> float:
    low, high = start_low, start_high
    for x in batches:
        low, high = low + c * (float(x.min()) - low), high + c * (float(x.max()) - high)
    return max(-low, high)


def test_tracker_hand_computed() -> None:
    quantizer = attach_quantizer(torch.nn.Linear(2, 2), QuantSpec(num_bits=8)).input_quantizer
    tracker = RangeTracker(-1.0, 2.0)
    connect_trackers({"fc": type("L", (), {"input_quantizer": quantizer})()}, {"fc": tracker})
    out = quantizer(torch.tensor([-3.0, 6.0]))  # min -1 + 0.01 (-3 + 1) = -1.02, max 2 + 0.01 (6 - 2) = 2.04
    assert float(quantizer.amax) == pytest.approx(2.04) and float(out.max()) == pytest.approx(2.04)
    quantizer(torch.tensor([-30.0, 0.0]))  # min -1.02 + 0.01 (-30 + 1.02) = -1.3098, max 2.04 - 0.0204 = 2.0196
    assert float(tracker.low) == pytest.approx(-1.3098) and float(quantizer.amax) == pytest.approx(2.0196)


def test_ranges_follow_training_then_freeze() -> None:
    loader = _loader()
    qat = QuantizationAwareTraining(num_bits=4, calibration="max", calibration_batches=2, freeze_epoch=1)
    record = _RecordInputs()
    module = _module()
    _trainer([qat, record]).fit(module, train_dataloaders=loader)
    assert qat.ranges_in_use == "track" and qat.phase == "frozen"
    quantizers = {n: module.backbone.get_submodule(n).input_quantizer for n in LAYERS}
    assert not quantizers["layers.fc1"].unsigned and quantizers["classifier"].unsigned  # after a ReLU: [0, 15]
    for name in LAYERS:  # calibration: batches 0-1 (max); tracked: 2-3; epoch 1 (4-7) frozen
        seen = record.inputs[name]
        calibrated = max(float(x.abs().max()) for x in seen[:2])
        low = min(min(float(x.min()) for x in seen[:2]), 0.0)
        expected = _ema(max(low, -calibrated), calibrated, seen[2:4])
        assert record.amax[0][name] == pytest.approx(expected, rel=1e-5), name
        assert record.amax[1][name] == record.amax[0][name]  # frozen from freeze_epoch
        assert expected != pytest.approx(calibrated, rel=1e-4)  # the range did move


def test_auto_tracks_from_scratch_fixes_when_fine_tuning() -> None:
    loader = _loader()
    module = _module()
    scratch = QuantizationAwareTraining(calibration_batches=1)
    _trainer([scratch], max_epochs=1).fit(module, train_dataloaders=loader)
    assert scratch.ranges_in_use == "track" and scratch.trackers
    remove_quantizers(module.backbone)  # the trained float network, fine-tuned with a new callback
    fine_tune = QuantizationAwareTraining(calibration_batches=1)
    fixed_amax = []
    record = type("R", (pl.Callback,), {"on_train_epoch_end": lambda self, t, m: fixed_amax.append(
        float(m.backbone.classifier.input_quantizer.amax))})()
    _trainer([fine_tune, record]).fit(module, train_dataloaders=loader)
    assert fine_tune.ranges_in_use == "fixed" and not fine_tune.trackers
    assert not module.backbone.classifier.input_quantizer.unsigned  # fixed ranges keep their sign as before
    assert fixed_amax[0] == fixed_amax[1]
    lsq = QuantizationAwareTraining(learn="lsq", calibration_batches=1)
    _trainer([lsq], max_epochs=1).fit(_module(), train_dataloaders=loader)
    assert lsq.ranges_in_use == "fixed"
    forced = QuantizationAwareTraining(ranges="track", calibration_batches=1)
    _trainer([forced], max_epochs=1).fit(module, train_dataloaders=loader)
    assert forced.ranges_in_use == "track"
    remove_quantizers(module.backbone)
    signs = QuantizationAwareTraining(calibration_batches=1, ranges="fixed", unsigned="auto")
    _trainer([signs], max_epochs=1).fit(module, train_dataloaders=loader)
    inputs = {name: layer.input_quantizer.unsigned for name, layer in signs.quantized_layers.items()}
    assert inputs == {"layers.fc1": False, "classifier": True}  # signed data stay signed; after a ReLU: unsigned


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ranges": "ema"}, "ranges='ema'"),
    ({"ranges": "track", "learn": "pact"}, "learn='pact'"),
    ({"averaging_constant": 0.0}, "averaging_constant=0.0"),
    ({"averaging_constant": True}, "averaging_constant=True"),
    ({"unsigned": "yes"}, "unsigned='yes' must be True, False or 'auto'"),
])
def test_bad_ranges_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


@pytest.mark.parametrize("calibration_batches", [3, 6])  # checkpoint while tracking / while calibrating
def test_resume_mid_tracking_is_exact(tmp_path, calibration_batches) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(epochs: int, ckpt: str | None = None, save: bool = False) -> tuple:
        qat = QuantizationAwareTraining(num_bits=4, calibration="entropy", calibration_batches=calibration_batches,
                                        num_bins=64, start_bin=8)
        callbacks: list = [qat]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="e", save_top_k=-1))
        module = _module()
        _trainer(callbacks, max_epochs=epochs, enable_checkpointing=save).fit(module, train_dataloaders=_loader(),
                                                                              ckpt_path=ckpt)
        return module, qat

    straight, straight_qat = fit(3)
    fit(1, save=True)
    resumed, resumed_qat = fit(3, ckpt=str(tmp_path / "e.ckpt"))
    assert resumed_qat.ranges_in_use == "track" and resumed_qat.phase == "training"
    for (key, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    for name, tracker in straight_qat.trackers.items():
        assert torch.equal(tracker.high, resumed_qat.trackers[name].high), name


class _SaveRanges(pl.Callback):
    def __init__(self, directory) -> None:
        self.directory, self.batches = directory, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[0].clone())

    def on_train_end(self, trainer, pl_module) -> None:
        amax = {k: v.clone() for k, v in pl_module.state_dict().items() if k.endswith("input_quantizer.amax")}
        torch.save((amax, self.batches), self.directory / f"rank{trainer.global_rank}.pt")


def test_ddp_ranks_track_the_same_global_range(tmp_path) -> None:
    data = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    data[16:24] *= 5.0  # wide batches on one rank only: the tracked min / max must be all-reduced
    loader = DataLoader(TensorDataset(data, torch.randint(0, 10, (64,))), batch_size=8)
    qat = QuantizationAwareTraining(calibration="max", calibration_batches=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[qat, _SaveRanges(tmp_path)], limit_train_batches=4)
    trainer.fit(_module(), train_dataloaders=loader)
    (rank0, batches0), (rank1, batches1) = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # one process tracking the global batches (both ranks' batches at each step)
    steps = [torch.cat([a, b]) for a, b in zip(batches0, batches1, strict=True)]
    calibrated = float(steps[0].abs().max())
    expected = _ema(max(float(steps[0].min()), -calibrated), calibrated, steps[1:])
    assert float(rank0["backbone.layers.fc1.input_quantizer.amax"]) == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(calibrated, rel=1e-4)
