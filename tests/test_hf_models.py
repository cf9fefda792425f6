"""Hugging Face models (built from tiny configs, nothing downloaded) in the distillation module and the callbacks:
dict batches with ``labels``, keyword forwards, ``ModelOutput``; the transformer terms read ``hidden_states`` and
``attentions``; a module without ``compression_target`` gets the friendly message."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, Dataset

from lightning_compress import (
    CompressionReport,
    DistillationModule,
    MagnitudePruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_compress.distillation import TransformerKnowledge
from lightning_compress.quantization.quantizers import quantized_layers

transformers = pytest.importorskip("transformers")


def bert(hidden: int = 32, layers: int = 2, heads: int = 2, eager: bool = True) -> Any:
    config = transformers.BertConfig(vocab_size=30, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=2 * hidden,
                                     max_position_embeddings=16, num_labels=3)
    if eager:
        config._attn_implementation = "eager"
    return transformers.BertForSequenceClassification(config)


class Tokens(Dataset):
    """Tokenized batches as a Hugging Face pipeline gives them; the label is the first token modulo 3."""

    def __init__(self, count: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 30, (count, 8), generator=generator)
        self.mask = torch.ones(count, 8, dtype=torch.long)
        self.mask[::2, 6:] = 0  # some padding

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": self.mask[index], "labels": self.ids[index, 0] % 3}


def loader() -> DataLoader:
    return DataLoader(Tokens(), batch_size=16)


def test_distillation_trains_hf_models_on_dict_batches_with_transformer_terms(trainer_factory, tmp_path):
    teacher, student = bert(), bert(hidden=16, layers=1)
    knowledge = TransformerKnowledge(hidden_weight=1.0, attention_weight=1.0, value_weight=1.0, layer_map="final",
                                     relation_heads=2, student_values="bert.encoder.layer.0.attention.self.value",
                                     teacher_values="bert.encoder.layer.1.attention.self.value")
    module = DistillationModule(student, teacher, transformer=knowledge, lr=1e-2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = trainer_factory(max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(module, loader(), loader())
    metrics = trainer.callback_metrics
    for term in ("soft", "hard", "hidden", "attention_kl", "value_relation"):
        assert torch.isfinite(metrics[f"distill/{term}"]) and metrics[f"distill/{term}"] > 0, term
    assert 0 <= float(metrics["val/acc"]) <= 1
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())
    projection = module.transformer_terms.projections[0].proj.weight  # widths 16 -> 32: trained with the student
    assert projection.shape == (32, 16)
    path = tmp_path / "kd.ckpt"
    trainer.save_checkpoint(path)
    restored = DistillationModule.load_from_checkpoint(path, student=bert(hidden=16, layers=1), teacher=bert(),
                                                       transformer=knowledge)
    assert torch.equal(restored.transformer_terms.projections[0].proj.weight, projection)
    predictions = trainer.predict(module, loader())
    assert torch.cat(predictions).shape == (32,)


def test_attention_terms_on_an_sdpa_model_fail_before_training(trainer_factory):
    module = DistillationModule(bert(hidden=16, layers=1, eager=False), bert(eager=False),
                                transformer=TransformerKnowledge(attention_weight=1.0))
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        trainer_factory(max_epochs=1, logger=False).fit(module, loader())
    assert module.global_step == 0


class UserModule(LightningModule):
    """How a user trains an HF model: the whole batch into the model, its loss back."""

    def __init__(self, with_target: bool = True) -> None:
        super().__init__()
        self.model = bert()
        self.with_target = with_target

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    @property
    def compression_target(self) -> Any:
        return self.model if self.with_target else None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self(batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_ptq_qat_and_report_on_an_hf_model_with_dict_batches(trainer_factory, tmp_path):
    ptq = PostTrainingQuantization(modes=["static"])
    report = CompressionReport(monitor="val/loss", batch_size=8, latency_runs=2, warmup=1, output_dir=str(tmp_path))
    trainer_factory(callbacks=[ptq, report], max_epochs=1, logger=False).fit(UserModule(), loader(), loader())
    assert report.report["macs"] > 0 and report.report["latency_ms"] > 0  # measured on the keyword inputs
    quantized = ptq.models["static"]
    amax = [q.input_quantizer.amax for q in quantized_layers(quantized).values()]
    assert amax and all(torch.isfinite(a).all() and (a > 0).all() for a in amax)
    model = quantized.eval()
    with torch.no_grad():  # accuracy of the quantized copy from the batches' keyword inputs and labels
        correct = sum(int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(1)
                           == b["labels"]).sum()) for b in loader())
    assert ptq.results["static"] == correct / 32

    qat = QuantizationAwareTraining(calibration_batches=1)
    module = UserModule()
    trainer_factory(callbacks=[qat], max_epochs=1, logger=False).fit(module, loader())
    assert qat.phase != "calibrating"
    amax = [q.input_quantizer.amax for q in quantized_layers(module.model).values()]
    assert amax and all(torch.isfinite(a).all() and (a > 0).all() for a in amax)


class LabelsInForward(UserModule):
    """A forward with the labels among its arguments, as in many HF fine-tuning modules."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(**batch).loss


def test_without_compression_target_the_module_runs_or_gets_the_friendly_message(trainer_factory):
    module = LabelsInForward(with_target=False)  # the callback gives input_ids and attention_mask, not labels
    with pytest.raises(ValueError, match=r"keyword arguments \['input_ids', 'attention_mask'\].*labels.*"
                                         r"compression_target"):
        trainer_factory(callbacks=[MagnitudePruning(sparsity=0.5)], max_epochs=1, logger=False).fit(module, loader())
    assert module.global_step == 0
    pruning = MagnitudePruning(sparsity=0.5)  # forward(batch) takes the dict batch: the whole module is pruned
    trainer_factory(callbacks=[pruning], max_epochs=1, logger=False).fit(UserModule(with_target=False), loader())
    assert "model.classifier" not in pruning.masks
    assert "model.bert.encoder.layer.0.attention.self.query" in pruning.masks
    pruning = MagnitudePruning(sparsity=0.5)
    trainer_factory(callbacks=[pruning], max_epochs=1, logger=False).fit(UserModule(), loader())
    assert "classifier" not in pruning.masks and "bert.encoder.layer.0.attention.self.query" in pruning.masks


def test_gpt2_distills_with_cosine_hidden_states_and_its_conv1d_layers_are_pruned(trainer_factory):
    def gpt2(width: int, layers: int) -> Any:
        config = transformers.GPT2Config(vocab_size=30, n_positions=8, n_embd=width, n_layer=layers, n_head=2,
                                         num_labels=3, pad_token_id=0, eos_token_id=0, bos_token_id=0,
                                         attn_implementation="eager")
        return transformers.GPT2ForSequenceClassification(config)

    knowledge = TransformerKnowledge(hidden_weight=1.0, hidden_loss="cosine", attention_weight=1.0, layer_map="last")
    module = DistillationModule(gpt2(16, 1), gpt2(32, 2), transformer=knowledge)
    pruning = MagnitudePruning(sparsity=0.5)
    trainer = trainer_factory(callbacks=[pruning], max_epochs=1, logger=False)
    trainer.fit(module, loader())
    assert 0 < float(trainer.callback_metrics["distill/hidden"]) <= 2  # 1 - cos
    assert float(trainer.callback_metrics["distill/attention_kl"]) > 0
    assert set(pruning.masks) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                  "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}  # Conv1D, no embeddings
    weight = module.student.transformer.h[0].attn.c_attn.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
