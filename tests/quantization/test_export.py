"""export_int8: a real int8 model with our scales, its agreement, determinism and how it is counted."""

from __future__ import annotations

import copy
import io

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_compress import QuantizationAwareTraining
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.export.int8 import export_int8, quantized_counts
from lightning_compress.measure import count_macs, count_parameters
from lightning_compress.quantization import quantize_model
from lightning_compress.quantization.quantizers import remove_quantizers


@pytest.fixture(scope="module")
def dm() -> DigitsDataModule:
    datamodule = DigitsDataModule(batch_size=64, seed=0)
    datamodule.setup()
    return datamodule


def _test_inputs(dm: DigitsDataModule) -> torch.Tensor:
    return torch.cat([batch[0] for batch in dm.test_dataloader()])


@pytest.fixture(scope="module")
def qat_residual(dm, tmp_path_factory) -> nn.Module:
    """A ResidualCNN trained briefly with QAT under Trainer(deterministic=True)."""
    torch.manual_seed(0)
    module = ClassifierModule(ResidualCNN(width=8), lr=3e-3)
    callback = QuantizationAwareTraining(calibration="entropy", calibration_batches=4)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, deterministic=True,
                         default_root_dir=str(tmp_path_factory.mktemp("qat")), callbacks=[callback])
    trainer.fit(module, dm)
    assert torch.are_deterministic_algorithms_enabled()  # what the Trainer leaves behind
    return module.backbone.eval()


@pytest.fixture(scope="module")
def trained_residual(dm) -> nn.Module:
    """A float ResidualCNN trained for two epochs with a plain loop (a few seconds)."""
    torch.manual_seed(0)
    model = ResidualCNN(width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for inputs, targets in dm.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return model.eval()


def _agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def test_export_ptq_residual_agrees_under_deterministic_mode(trained_residual, dm) -> None:
    x = _test_inputs(dm)
    qmodel = quantize_model(trained_residual, "static", dm.train_dataloader(), calibration="entropy")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        int8 = export_int8(qmodel, x[:256])
        assert torch.are_deterministic_algorithms_enabled()
        agreement = _agreement(qmodel, int8, x)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert agreement >= 0.99, agreement
    _check_scales(qmodel, int8)


def _check_scales(qmodel: nn.Module, int8: nn.Module) -> None:
    # our scales, not a recalibration: the model input uses stem.conv's calibrated amax
    amax = float(qmodel.stem.conv.input_quantizer.amax)
    assert float(int8.model._input_clip_0_input_scale_0) == pytest.approx(amax / 127, rel=1e-6)
    assert int(int8.model._input_clip_0_input_zero_point_0) == 128
    # per-channel weight scales: amax / 127 times the folded BatchNorm factor
    bn = qmodel.stem.bn
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().detach()
    expected = qmodel.stem.conv.weight_quantizer.current_amax(qmodel.stem.conv.weight) * factor / 127
    scales = int8.model.stem.conv.weight().q_per_channel_scales().float()
    assert torch.allclose(scales, expected, rtol=1e-4)


@pytest.mark.slow
def test_export_qat_residual_agrees_under_deterministic_mode(qat_residual, dm) -> None:
    x = _test_inputs(dm)
    assert torch.are_deterministic_algorithms_enabled()
    int8 = export_int8(qat_residual, x[:256])
    agreement = _agreement(qat_residual, int8, x)
    assert torch.are_deterministic_algorithms_enabled()
    assert agreement >= 0.99, agreement
    _check_scales(qat_residual, int8)
    torch.use_deterministic_algorithms(False)


def test_export_ptq_plain_and_counts(dm) -> None:
    torch.manual_seed(0)
    model = PlainCNN(width=8).eval()
    x = _test_inputs(dm)
    float_model = copy.deepcopy(model)
    qmodel = quantize_model(model, "static", dm.val_dataloader(), calibration="percentile")
    int8 = export_int8(qmodel, x[:128])
    assert _agreement(qmodel, int8, x) >= 0.97  # untrained weights: small logit margins
    counts = quantized_counts(int8, x[:8])
    float_macs, _ = count_macs(float_model, x[:8])
    assert counts["macs"] == float_macs
    convs_and_linear = [m for m in float_model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = sum(m.weight.numel() for m in convs_and_linear)
    biases = sum(m.weight.shape[0] for m in convs_and_linear)  # BatchNorm folding gives every conv a bias
    assert counts["parameters"] == weights + biases
    # the classifier computes in float on its int8 weight (logits are not requantized): its bias stays float
    assert counts["quantized_parameters"] == weights + biases - float_model.classifier.out_features
    assert 4 * count_parameters(float_model) / counts["weight_bytes"] > 3  # tiny layers: scales and biases weigh

    def size(m: nn.Module) -> int:
        buffer = io.BytesIO()
        torch.save(m.state_dict(), buffer)
        return buffer.getbuffer().nbytes

    assert size(int8) < size(float_model)


def test_excluded_layers_stay_float(dm) -> None:
    torch.manual_seed(0)
    model = PlainCNN(width=4).eval()
    qmodel = quantize_model(model, "static", dm.val_dataloader(), exclude=["classifier"])
    int8 = export_int8(qmodel, _test_inputs(dm)[:64])
    assert type(int8.model.classifier) is nn.Linear
    assert _agreement(qmodel, int8, _test_inputs(dm)) >= 0.97


def test_export_rejects_models_without_static_scales() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no quantized layer"):
        export_int8(model, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="layer '0' has no static input scale"):
        export_int8(quantize_model(model, "dynamic"), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="layer '0' uses 16 bits"):
        export_int8(quantize_model(model, "static", torch.randn(4, 4), num_bits=16), torch.zeros(2, 4))
    qmodel = quantize_model(model, "static", torch.randn(4, 4))
    export_int8(qmodel, torch.zeros(2, 4))
    remove_quantizers(qmodel)


def test_conv1d_model_quantizes_and_exports() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(nn.functional.relu(self.conv(x)), 1))

    torch.manual_seed(0)
    x = torch.randn(64, 2, 16)
    qmodel = quantize_model(Net().eval(), "static", [x], calibration="mse")
    assert type(qmodel.conv).__name__ == "QuantConv1d"
    int8 = export_int8(qmodel, x)
    with torch.no_grad():
        assert torch.allclose(int8(x), qmodel(x), atol=0.05)


def test_counts_see_pruned_int8_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight[:, :4] = 0
    int8 = export_int8(quantize_model(model, "static", torch.randn(16, 8)), torch.randn(16, 8))
    counts = quantized_counts(int8, torch.randn(3, 8))
    assert counts["parameters"] == 46 and counts["nonzero_parameters"] == 46 - 16 and counts["macs"] == 40
    # first layer: int8 weights, float bias, scale + zero point per row; the output layer: int8 codes, a float scale
    # per row (weight-only packed: logits are not requantized) and its float bias
    assert counts["weight_bytes"] == (32 + 4 * 4 + 8 * 4) + (8 + 4 * 2 + 4 * 2)


def test_measure_model_counts_an_exported_int8_model():
    from lightning_compress.measure import count_macs, measure_model
    from lightning_compress.quantization import export_int8

    torch.manual_seed(0)
    model = PlainCNN(width=32).eval()
    inputs = torch.randn(16, 1, 8, 8)
    quantized = quantize_model(model, "static", [inputs], calibration="max")
    exported = export_int8(quantized, inputs)
    report = measure_model(exported, inputs, baseline=model, latency_runs=2, warmup=0)
    assert report["macs"] == count_macs(model, inputs)[0] > 0
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert report["parameters"] >= weights
    assert report["ratios"]["size_bytes"] > 3.0


class _LinearBatchNormReLU(nn.Module):
    """The standard MLP block, Linear -> BatchNorm1d -> ReLU, as modules or with a functional ReLU."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32))
        self.relu = nn.ReLU()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x)
        return self.head(nn.functional.relu(hidden) if self.functional else self.relu(hidden))


@pytest.mark.parametrize("functional", [False, True], ids=["module-relu", "functional-relu"])
def test_relu_after_batchnorm_survives_the_export(functional) -> None:
    """torch.ao lowers linear -> relu -> quantize to linear -> quantize, trusting the output range to start at 0: the
    signed input scale of the next layer must not let the negative values through (they did: agreement 0.64)."""
    torch.manual_seed(0)
    x = torch.randn(256, 1, 8, 8)
    net = _LinearBatchNormReLU(functional).train()
    with torch.no_grad():
        net.body[2].bias.fill_(-0.5)  # half the pre-activations negative
        net(x)  # running statistics
    qmodel = quantize_model(net.eval(), "static", [x])
    int8 = export_int8(qmodel, x)
    with torch.no_grad():
        expected, got = qmodel(x), int8(x)
    step = float(qmodel.head.input_quantizer.current_amax()) / 127
    assert (got - expected).abs().max() < 4 * step * net.head.weight.abs().sum(1).max()
    assert _agreement(qmodel, int8, x) >= 0.98


class _ViewIntoClassifier(nn.Module):
    def __init__(self, conv: type[nn.Module]) -> None:
        super().__init__()
        self.conv = conv(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.conv, nn.Conv1d):
            x = x.view(x.size(0), 1, -1)
        x = nn.functional.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_a_view_into_the_classifier_runs_in_int8(conv, monkeypatch) -> None:
    """Quantized convolutions return channels-last strides, which ``view`` rejects: the export uses ``reshape``."""
    import lightning_compress.export.int8 as export

    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    qmodel = quantize_model(_ViewIntoClassifier(conv).eval(), "static", [x])
    int8 = export_int8(qmodel, x)
    with torch.no_grad():
        assert torch.allclose(int8(x), qmodel(x), atol=0.05)
    # Without the rewrite the converted model fails: the export says so itself instead of returning it.
    monkeypatch.setattr(export, "views_as_reshapes", lambda converted: converted)
    with pytest.raises(RuntimeError, match=r"int8 model converted by torch.ao for engine '\w+' fails on the "
                                           r"example inputs \(RuntimeError: view size is not compatible(.|\n)*"
                                           r"Other engines that compute it exactly here: \["):
        export_int8(qmodel, x)


def test_an_export_leaves_no_copy_of_the_model_behind() -> None:
    """torch.ao's FX passes cache every model they ask for its device (``functools.cache``): without releasing that
    cache each export kept its traced, prepared and converted copies alive (300 MB per ConvNeXt-T export)."""
    import gc

    def graph_modules() -> int:
        gc.collect()
        return sum(isinstance(o, torch.fx.GraphModule) for o in gc.get_objects())

    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    fake_quantized = quantize_model(PlainCNN(width=4).eval(), "static", x)
    before = graph_modules()
    for _ in range(2):
        int8 = export_int8(fake_quantized, x, min_agreement=None)
        del int8
    assert graph_modules() == before


class PooledByMean(nn.Module):
    """Convolutions down to 1x1 positions, then ``mean([2, 3])`` as torchvision's ShuffleNetV2 pools."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.last(self.conv(x)).mean([2, 3]))


def test_a_mean_over_one_position_exports_under_every_engine() -> None:
    from lightning_compress.export.engines import exact_engines

    torch.manual_seed(0)
    x = torch.randn(32, 1, 7, 7)  # 3x3 after the first convolution, 1x1 after the second
    fake_quantized = quantize_model(PooledByMean().eval(), "static", x, reduce_range=True)
    for engine in exact_engines(127):  # x86, fbgemm and onednn refused the 1x1 mean before it was flattened
        int8 = export_int8(fake_quantized, x, engine=engine, min_agreement=None)
        assert int8.verification["agreement"] >= 0.95 and int8.verification["relative_error"] <= 0.05, engine
