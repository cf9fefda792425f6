"""int8 Linear for transformers without FX: BERT, GPT-2 and nn.TransformerEncoder exported module by module, checked
against the float / fake-quantized model; Int8Export takes that path and refuses FX for transformers in setup."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.export import Int8Export, export_int8, load_int8_dynamic
from lightning_compress.export.int8_dynamic import dynamic_int8_layers
from lightning_compress.quantization.quantizers import QuantSpec, attach_quantizer

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*token_id.*")
DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


class EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(32, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


def bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32))


def gpt2() -> nn.Module:
    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=32, pad_token_id=0,
        bos_token_id=1, eos_token_id=1))


def _logits(output):  # type: ignore[no-untyped-def]
    return output.logits if hasattr(output, "logits") else output


@pytest.mark.parametrize(("build", "layers"), [(bert, 14), (gpt2, 9), (EncoderClassifier, 13)],
                         ids=["bert", "gpt2", "encoder"])
def test_transformers_export_every_linear_to_int8_and_agree(build, layers):
    model = build().eval()
    ids = torch.randint(2, 50, (8, 12))
    int8 = export_int8(model, ids, min_agreement=None)  # "auto": no FX tracing for transformers
    assert int8.verification["method"] == "dynamic" and int8.verification["int8_layers"] == layers
    assert int8.engine in ("x86", "fbgemm", "qnnpack", "onednn")
    leftover = [n for n, m in int8.model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    assert leftover == [] and sum(isinstance(m, DynamicLinear) for m in int8.model.modules()) == layers
    with torch.no_grad():
        reference, got = _logits(model(ids)), _logits(int8(ids))
    assert float((reference - got).norm() / reference.norm()) < 0.1
    assert isinstance(next(m for n, m in model.named_modules() if n.endswith("query") or n.endswith("c_attn")
                           or n.endswith("linear1")), nn.Module)  # the original is untouched
    assert not any(isinstance(m, DynamicLinear) for m in model.modules())


def test_weight_scales_come_from_our_quantizer():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    attach_quantizer(model[0], QuantSpec(per_channel=True))
    with torch.no_grad():
        model[0].weight_quantizer.amax.copy_(torch.full_like(model[0].weight_quantizer.amax, 0.05))
        model[0].input_quantizer.amax.fill_(4.0)
    int8 = export_int8(model, torch.randn(16, 8), method="dynamic", min_agreement=None)
    scales = int8.model[0].weight().q_per_channel_scales()
    assert torch.allclose(scales.float(), torch.full((4,), 0.05 / 127))
    assert dynamic_int8_layers(model, exclude=r"\d") == []


def _loader() -> DataLoader:
    ids = torch.randint(0, 50, (32, 10), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids, (ids[:, 0] < 25).long()), batch_size=16)


def _module():  # type: ignore[no-untyped-def]
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.network = EncoderClassifier()

        @property
        def compression_target(self) -> nn.Module:
            return self.network

        def forward(self, ids):  # type: ignore[no-untyped-def]
            return self.network(ids)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return None

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Classifier()


def test_int8_export_callback_takes_the_dynamic_path_and_refuses_fx_before_training(trainer_factory, tmp_path):
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="method='fx' cannot export EncoderClassifier"):
        trainer_factory(max_epochs=1, limit_train_batches=1, callbacks=[Int8Export(method="fx")]).fit(
            module, _loader(), _loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # no step was taken
    export = Int8Export(output_dir=str(tmp_path), batch_size=16, min_agreement=0.9)
    trainer_factory(max_epochs=1, limit_train_batches=1, callbacks=[export], deterministic=False).fit(
        module, _loader(), _loader())
    assert export.results is not None and export.results["agreement"] >= 0.9
    assert export.results["identical_after_load"] and export.results["quantized_layers"] == 13
    loaded = load_int8_dynamic(export.results["path"])
    assert sum(isinstance(m, DynamicLinear) for m in loaded.modules()) == 13
