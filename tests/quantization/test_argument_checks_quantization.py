"""Bad quantization settings fail with a ValueError naming the value, before any step and with the model untouched."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from lightning_compress import PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.demo import MLP, ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.quantization import quantize_model
from lightning_compress.quantization.calibrators import compute_amax
from lightning_compress.quantization.ptq import resolve_specs
from lightning_compress.quantization.quantizers import quantized_layers


class FailOnStep(ClassifierModule):
    def training_step(self, batch, batch_idx):
        raise AssertionError("a training step ran")

    def validation_step(self, batch, batch_idx):
        raise AssertionError("a validation step ran")


def _two_layer_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(in_features=64, hidden=(8,), num_classes=10)  # layers.fc1 and classifier


def _fails_untouched(trainer_factory, callback, backbone: nn.Module, message: str, stage: str = "fit") -> None:
    """``stage`` with ``callback`` raises ``message`` before any step and leaves ``backbone``'s state as it was."""
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainer = trainer_factory(callbacks=[callback], limit_train_batches=2, limit_val_batches=2)
    with pytest.raises(ValueError, match=message):
        getattr(trainer, stage)(FailOnStep(backbone), datamodule=DigitsDataModule(batch_size=16))
    after = backbone.state_dict()
    assert list(after) == list(before) and not quantized_layers(backbone)
    for key, value in after.items():
        torch.testing.assert_close(value, before[key])


# ------------------------------------------------------------------------------- calibration options (init)

BAD_CALIBRATION = [
    ({"calibration": "mse", "start_bin": -1}, r"start_bin=-1 must be an integer >= 0"),
    ({"calibration": "entropy", "start_bin": 2.5}, r"start_bin=2.5 must be an integer >= 0"),
    ({"calibration": "mse", "start_bin": True}, r"start_bin=True must be an integer >= 0"),
    ({"num_bins": True}, r"num_bins=True must be an integer >= 2"),
    ({"calibration": "percentile", "percentile": True}, r"percentile=True must be in \(0, 100\].*not a bool"),
    ({"calibration": "global", "amax": math.inf}, r"global amax inf must be a finite positive number"),
    ({"calibration": "global", "amax": math.nan}, r"global amax nan must be a finite positive number"),
    ({"calibration": "global", "amax": {"classifier": math.inf}}, r"amax inf \(pattern 'classifier'\) must be a fi"),
    ({"calibration": "global", "amax": {"classifier": True}}, r"amax True \(pattern 'classifier'\)"),
    ({"calibration": "global", "amax": {}}, r"global amax=\{\} is empty"),
    ({"calibration": "global", "amax": {3: 1.0}}, r"global amax pattern 3 must be a layer name or regex"),
    ({"calibration": "global", "amax": {"fc(": 1.0}}, r"global amax pattern 'fc\(' is not a valid regular exp"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CALIBRATION)
def test_qat_rejects_calibration_options_in_init(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [c for c in BAD_CALIBRATION if "start_bin" not in c[0]])
def test_ptq_rejects_calibration_options_in_init(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        PostTrainingQuantization(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), BAD_CALIBRATION)
def test_quantize_model_rejects_calibration_options(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_model(_two_layer_mlp(), "static", torch.randn(4, 64), **kwargs)


def test_start_bin_past_the_bins_is_still_clamped() -> None:
    inputs = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    network = _two_layer_mlp()
    model = quantize_model(network, "static", inputs, calibration="mse", num_bins=16)
    # default start_bin=128 > 16 bins: the search starts at (and so picks) the last bin, centre 15.5 / 16 of the max
    with torch.no_grad():
        hidden = network.layers(inputs)
    expected = compute_amax(hidden, "mse", num_bins=16, start_bin=15)
    assert float(model.classifier.input_quantizer.amax) == pytest.approx(float(expected), rel=1e-6)
    assert float(expected) == pytest.approx(15.5 / 16 * float(hidden.abs().max()), rel=1e-6)


# ------------------------------------------------------------------------ calibration_batches, flags, modes


@pytest.mark.parametrize("batches", [0, -3, 1.5, True])
def test_calibration_batches_rejected_in_ptq_init_and_quantize_model(batches) -> None:
    message = rf"calibration_batches={batches!r} must be a positive integer or None"
    with pytest.raises(ValueError, match=message):
        PostTrainingQuantization(calibration_batches=batches)
    with pytest.raises(ValueError, match=message):
        quantize_model(_two_layer_mlp(), "static", torch.randn(4, 64), calibration_batches=batches)


@pytest.mark.parametrize("flag", ["per_channel", "unsigned", "inplace"])
def test_quantize_model_rejects_non_bool_flags(flag) -> None:
    model = _two_layer_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"inplace": True, flag: "no"}
    allowed = "True, False or 'auto'" if flag == "unsigned" else "True or False"
    with pytest.raises(ValueError, match=rf"{flag}='no' must be {allowed}"):
        quantize_model(model, "weight_only", **options)
    assert not quantized_layers(model) and model.state_dict().keys() == before.keys()


def test_ptq_rejects_non_bool_per_channel_and_empty_modes() -> None:
    with pytest.raises(ValueError, match=r"per_channel='no' must be True or False"):
        PostTrainingQuantization(per_channel="no")
    with pytest.raises(ValueError, match=r"modes=\[\] is empty; give one or more of 'weight_only', 'static'"):
        PostTrainingQuantization(modes=[])


# ---------------------------------------------------------------------------- PTQ layer patterns in setup


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_ptq_unknown_layer_fails_in_setup(trainer_factory, stage) -> None:
    callback = PostTrainingQuantization(layers="nope")
    _fails_untouched(trainer_factory, callback, PlainCNN(width=4), r"Layer pattern 'nope' matches no layer", stage)


def test_ptq_partial_global_amax_fails_in_setup(trainer_factory) -> None:
    callback = PostTrainingQuantization(calibration="global", amax={"block.*": 1.0})
    _fails_untouched(trainer_factory, callback, PlainCNN(width=4),
                     r"no amax pattern in \['block\.\*'\] matches layers \['classifier'\]")


def test_quantize_model_partial_global_amax_leaves_model_untouched() -> None:
    model = _two_layer_mlp()
    with pytest.raises(ValueError, match=r"no amax pattern in \['layers\..*'\] matches layers \['classifier'\]"):
        quantize_model(model, "static", calibration="global", amax={"layers.*": 1.0}, inplace=True)
    assert not quantized_layers(model)


# -------------------------------------------------------------------------------------- skip_first_and_last


@pytest.mark.parametrize("layers", [["layers.fc1", "classifier"], ["classifier"]])
def test_skip_first_and_last_with_one_or_two_layers(layers) -> None:
    message = rf"skip every chosen layer {re.escape(repr(layers))}.*use skip_first_and_last=False"
    with pytest.raises(ValueError, match=message):
        resolve_specs(_two_layer_mlp(), layers=layers, exclude=None, num_bits=8, bit_widths=None, per_channel=True,
                      unsigned=False, learn="none", skip_first_and_last=True)


def test_qat_skip_first_and_last_with_two_layers_fails_before_the_first_step(trainer_factory) -> None:
    callback = QuantizationAwareTraining(skip_first_and_last=True)
    _fails_untouched(trainer_factory, callback, _two_layer_mlp(),
                     r"skip_first_and_last=True would skip every chosen layer \['layers.fc1', 'classifier'\]")


def test_skip_first_and_last_keeps_the_middle_of_three() -> None:
    specs = resolve_specs(PlainCNN(width=4), layers=["block1.conv", "block2.conv", "classifier"], exclude=None,
                          num_bits=8, bit_widths=None, per_channel=True, unsigned=False, learn="none",
                          skip_first_and_last=True)
    assert list(specs) == ["block2.conv"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"per_channel": "no"}, r"per_channel='no' must be True or False"),
    ({"unsigned": 1}, r"unsigned=1 must be True, False or 'auto'"),
    ({"skip_first_and_last": "yes"}, r"skip_first_and_last='yes' must be True or False"),
    ({"log_error": None}, r"log_error=None must be True or False"),
    ({"freeze_epoch": True}, r"freeze_epoch=True must be a non-negative integer or None"),
])
def test_qat_flags_and_freeze_epoch_are_checked_at_construction(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_qat_partial_global_amax_fails_in_setup_before_attaching(trainer_factory) -> None:
    callback = QuantizationAwareTraining(calibration="global", amax={"block.*": 1.0})
    _fails_untouched(trainer_factory, callback, PlainCNN(width=4),
                     r"no amax pattern in \['block\.\*'\] matches layers \['classifier'\]")
