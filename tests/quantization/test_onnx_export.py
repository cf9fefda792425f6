"""export_onnx / export_program / OnnxExport: float, compacted and QDQ models agree in onnxruntime; the QDQ nodes carry
our scales and int8 weights; a narrow range is mapped exactly; a disagreement raises and writes nothing;
torch.export traces a fake-quantized model; the callback writes the file at the end of fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from lightning_compress import CompressionReport, OnnxExport, export_onnx, export_program  # noqa: E402
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN  # noqa: E402
from lightning_compress.export import onnx as onnx_module  # noqa: E402
from lightning_compress.export.onnx import OnnxMismatchError, onnx_metadata, ort_session, run_session  # noqa: E402
from lightning_compress.export.qdq import batchnorm_folds, qdq_model  # noqa: E402
from lightning_compress.pruning import compact  # noqa: E402
from lightning_compress.quantization import quantize_model  # noqa: E402


def _inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.Conv1d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TinyTransformer(nn.Module):
    """Token features (batch, tokens, dim) through Linear projections, a softmax mixing and a pooled head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = self.norm(x + self.out(torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v))
        return self.head((x + self.ffn(x)).mean(1))


def _bn_stats(model: nn.Module) -> nn.Module:
    for module in model.modules():  # non-trivial batch norm, so that folding it is tested
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(-1.5, 1.5)  # negative factors flip the integers
    return model.eval()


def _initializers(path) -> dict[str, torch.Tensor]:
    model = onnx.load(str(path))
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}


def test_float_and_compacted_cnn_agree_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model, x = _bn_stats(PlainCNN(width=8)), _inputs(32, 1, 8, 8)
    result = export_onnx(model, x, tmp_path / "float.onnx")
    assert result["agreement"] == 1.0 and result["max_abs_diff"] < 1e-4 and result["qdq_nodes"] == 0
    assert onnx_metadata(tmp_path / "float.onnx")["opset"] == result["opset"] == 20
    with torch.no_grad():
        model.block2.conv.weight[:5] = 0  # five dead filters: the compacted model is smaller
        model.block2.bn.weight[:5], model.block2.bn.bias[:5] = 0, 0
    small = compact(model, x)
    assert small.block2.conv.out_channels == 11
    result = export_onnx(small, x, tmp_path / "small.onnx")
    assert result["agreement"] == 1.0
    session = ort_session(tmp_path / "small.onnx")
    assert torch.allclose(run_session(session, x[:3]), model(x[:3]), atol=1e-4)  # another batch size


def test_qdq_cnn_carries_our_scales_and_int8_weights(tmp_path):
    torch.manual_seed(0)
    x = _inputs(64, 1, 8, 8)
    fq = quantize_model(_bn_stats(PlainCNN(width=8)), "static", x)
    result = export_onnx(fq, x, tmp_path / "qdq.onnx")
    assert result["agreement"] == 1.0 and result["max_abs_diff"] < 1e-4
    assert result["quantized_layers"] == 4 and result["qdq_nodes"] >= 12
    ops = [n.op_type for n in onnx.load(str(tmp_path / "qdq.onnx")).graph.node]
    assert ops.count("QuantizeLinear") == 4 and "BatchNormalization" not in ops
    init = _initializers(tmp_path / "qdq.onnx")
    layer = fq.classifier
    assert torch.equal(init["classifier.input_scale"], layer.input_quantizer.amax / 127)
    scale = layer.weight_quantizer.amax / 127
    assert torch.allclose(init["classifier.weight_scale"], scale)
    expected = torch.round(layer.weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    assert init["classifier.weight_q"].dtype == torch.int8 and torch.equal(init["classifier.weight_q"].T, expected)
    conv = init["block2.conv.weight_q"]
    assert conv.dtype == torch.int8 and int(conv.min()) >= -127
    assert init["block2.conv.weight_scale"].min() > 0  # folded batch norm, negative factors in the integers


class SharedOutput(nn.Module):
    """The convolution's output is read by its batch norm and by the skip connection: folding would change the
    skip, so the batch norm must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.bn(y) + y).flatten(1))


def test_batch_norm_outside_a_sequential_is_folded_where_it_alone_reads_the_convolution(tmp_path):
    """ResidualCNN calls ``self.bn1(self.conv1(x))`` in its forward: traced, every batch norm folds, the ONNX graph has
    none and the QDQ copy computes what the fake-quantized model computes."""
    torch.manual_seed(0)
    x = _inputs(64, 1, 8, 8)
    fq = quantize_model(_bn_stats(ResidualCNN(width=8)), "static", x, reduce_range=True)
    norms = {name for name, m in fq.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(norms) == 9
    folds = batchnorm_folds(fq, x)
    assert set(folds.values()) == norms and folds["stage1.0.conv1"] == "stage1.0.bn1"
    assert set(batchnorm_folds(fq).values()) == {"stem.bn", "stage2.0.shortcut.1", "stage3.0.shortcut.1"}  # Sequential
    deployable = qdq_model(fq, example_inputs=x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployable.modules())
    with torch.no_grad():
        torch.testing.assert_close(deployable(x), fq(x), atol=1e-4, rtol=0)
    result = export_onnx(fq, x, tmp_path / "residual.onnx")
    assert result["agreement"] >= 0.995
    ops = [n.op_type for n in onnx.load(str(tmp_path / "residual.onnx")).graph.node]
    assert "BatchNormalization" not in ops
    shared = quantize_model(_bn_stats(SharedOutput()), "static", x)
    assert batchnorm_folds(shared, x) == {}
    with torch.no_grad():
        torch.testing.assert_close(qdq_model(shared, example_inputs=x)(x), shared(x), atol=1e-4, rtol=0)


def test_narrow_range_is_mapped_exactly(tmp_path):
    layer = nn.Linear(4, 3)
    x = torch.tensor([[-5.0, -1.0, 0.3, 2.0]] * 4)
    fq = quantize_model(nn.Sequential(layer), "static", x, calibration="global", amax=1.0)
    result = export_onnx(fq, x, tmp_path / "narrow.onnx")
    # -5 clips at -amax (code -127) as in PyTorch, not at the int8 type's -128
    assert result["max_abs_diff"] < 1e-6


@pytest.mark.parametrize("reduce_range", [False, True])
def test_conv1d_and_transformer_qdq_agree(tmp_path, reduce_range):
    torch.manual_seed(0)
    for name, model, x in (("conv1d", _bn_stats(Conv1dNet()), _inputs(32, 4, 16)),
                           ("tokens", TinyTransformer().eval(), _inputs(32, 6, 16))):
        fq = quantize_model(model, "static", x, reduce_range=reduce_range)
        result = export_onnx(fq, x, tmp_path / f"{name}.onnx", check_inputs=[_inputs(16, *x.shape[1:], seed=1)])
        assert result["agreement"] >= 0.995 and result["samples"] == 48, (name, result)
        # integer kernels (7-bit) requantize in int32: a rare one-step difference, never a flipped answer
        assert result["relative_error"] < (1e-2 if reduce_range else 1e-5), (name, result)


def test_int8_embeddings_shrink_the_file_and_are_verified(tmp_path):
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(500, 32), nn.Linear(32, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids).mean(1))

    torch.manual_seed(0)
    ids = torch.randint(0, 500, (32, 10), generator=torch.Generator().manual_seed(0))
    fq = quantize_model(Bag().eval(), "static", ids)
    plain = export_onnx(fq, ids, tmp_path / "plain.onnx")
    small = export_onnx(fq, ids, tmp_path / "small.onnx", int8_embeddings=True)
    assert small["size_bytes"] < 0.4 * plain["size_bytes"] and small["agreement"] >= 0.995
    assert small["max_abs_diff"] > 0 and _initializers(tmp_path / "small.onnx")["embed.table_q"].dtype == torch.int8


def test_disagreement_raises_and_writes_nothing(tmp_path, monkeypatch):
    x = _inputs(16, 1, 8, 8)
    model = PlainCNN(width=8).eval()
    with pytest.raises(ValueError, match="min_agreement"):
        export_onnx(model, x, tmp_path / "bad.onnx", min_agreement=1.5)
    real = onnx_module.run_session
    monkeypatch.setattr(onnx_module, "run_session", lambda s, b: real(s, b).flip(0))  # a wrong runtime
    with pytest.raises(OnnxMismatchError, match="agrees with the PyTorch model on"):
        export_onnx(model, x, tmp_path / "bad.onnx", min_agreement=0.99)
    assert not (tmp_path / "bad.onnx").exists()
    with pytest.raises(OnnxMismatchError, match=r"max_abs_diff=0\.001") as raised:
        export_onnx(model, x, tmp_path / "bad.onnx", min_agreement=None, max_abs_diff=1e-3)
    assert "integer_kernels=False" not in str(raised.value)  # a float model: no integer convolution to blame
    fake_quantized = quantize_model(PlainCNN(width=8).eval(), "static", x, reduce_range=True)
    with pytest.raises(OnnxMismatchError, match=r"QLinearConv.*integer_kernels=False"):
        export_onnx(fake_quantized, x, tmp_path / "bad.onnx", min_agreement=None, max_abs_diff=1e-9,
                    integer_kernels=True)
    # the default layout tries float kernels after the integer one before it gives up
    with pytest.raises(OnnxMismatchError, match=r"float kernels .* after the integer layout \(agreement 100\.00%\)"):
        export_onnx(fake_quantized, x, tmp_path / "bad.onnx", min_agreement=None, max_abs_diff=1e-9)


def test_torch_export_of_a_fake_quantized_model():
    torch.manual_seed(0)
    x = _inputs(8, 2, 6, 6)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    fq = quantize_model(net, "static", x)  # a tensor amax per layer: no data-dependent branch may be left
    program = export_program(fq, x)
    other = _inputs(3, 2, 6, 6, seed=2)  # the batch axis is dynamic
    assert torch.equal(program.module()(other), fq(other))


def test_callback_writes_the_file_at_fit_end(tmp_path):
    from conftest import make_trainer

    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=32)
    data.setup()
    calibration = next(iter(data.train_dataloader()))[0]
    net = quantize_model(PlainCNN(width=8), "static", calibration, inplace=True).train()
    exporter = OnnxExport(filename="digits", eval_batches=1, batch_size=16)
    report = CompressionReport(batch_size=16, latency_runs=2, warmup=0)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                           callbacks=[report, exporter])  # the report asks the exporter first
    trainer.fit(ClassifierModule(net, lr=1e-3), data)
    path = tmp_path / "run" / "version_0" / "digits.onnx"
    assert exporter.results is not None and exporter.results["path"] == str(path) and path.is_file()
    assert exporter.results["samples"] == 48 and exporter.results["agreement"] >= 0.995
    assert onnx_metadata(path)["quantized_layers"] == 4
    deployed = report.report["onnx"]
    assert deployed["path"] == str(path) and deployed["size_bytes"] == path.stat().st_size
    assert set(deployed["latency_ms"]) == set(deployed["torch_latency_ms"]) == {1, 64}
    with pytest.raises(ValueError, match="opset=9"):
        OnnxExport(opset=9)


@pytest.mark.slow
def test_hugging_face_bert_exports_with_keyword_inputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = {"attention_mask": torch.ones(8, 12, dtype=torch.long),  # not forward's order: matched by name
              "input_ids": torch.randint(0, 100, (8, 12), generator=generator)}
    fq = quantize_model(bert, "static", [tokens])
    result = export_onnx(fq, tokens, tmp_path / "bert.onnx")
    assert result["quantized_layers"] == 8 and result["agreement"] == 1.0 and result["max_abs_diff"] < 1e-4
    session = ort_session(tmp_path / "bert.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]


def _fused_ops(path) -> list[str]:  # type: ignore[no-untyped-def]
    """The operators onnxruntime runs after its graph optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path) + ".optimized"
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(path) + ".optimized").graph.node]


def test_unsigned_auto_gives_8_bit_inputs_that_onnxruntime_chains_into_qlinearconv(tmp_path):
    from lightning_compress.export.engines import has_vnni

    images = _inputs(64, 1, 8, 8).abs()  # non-negative like pixels: the first layer becomes unsigned too
    model = PlainCNN(width=8).eval()
    quantized = quantize_model(model, "static", images, unsigned="auto")
    signs = {name: (layer.input_quantizer.unsigned, layer.input_quantizer.num_bits)
             for name, layer in quantized.named_modules() if hasattr(layer, "input_quantizer")}
    assert set(signs.values()) == {(True, 8)}, signs  # every input is after a ReLU or a pixel
    signed = quantize_model(model, "static", _inputs(64, 1, 8, 8), unsigned="auto")
    assert not signed.block1.conv.input_quantizer.unsigned and signed.block2.conv.input_quantizer.unsigned
    with pytest.raises(ValueError, match=r"unsigned='yes' must be True, False or 'auto'"):
        quantize_model(model, "static", images, unsigned="yes")

    chained = export_onnx(quantized, images, tmp_path / "vnni.onnx", integer_kernels=True, min_agreement=None)
    ops = _fused_ops(tmp_path / "vnni.onnx")
    assert chained["quantized_conv_outputs"] == 3 and ops.count("QLinearConv") == 3, ops
    assert ops.count("Relu") == 1  # two folded into the uint8 outputs' saturation at zero; the last one before
    # the classifier's Flatten stays float
    if has_vnni():  # without VNNI the integer kernels saturate on 8-bit inputs: the portable layout is below
        assert chained["agreement"] == 1.0 and chained["relative_error"] < 1e-4, chained
    portable = export_onnx(quantized, images, tmp_path / "portable.onnx", min_agreement=None)
    assert "QLinearConv" not in _fused_ops(tmp_path / "portable.onnx")  # float kernels: exact on every CPU
    assert portable["agreement"] == 1.0 and portable["relative_error"] < 1e-5, portable
