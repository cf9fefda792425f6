"""Head and FFN pruning of transformers: exact compaction (BERT, GPT-2, nn.TransformerEncoder), the plan's head
counts and shapes, unsupported attention named, the callback soft -> compacted in a fit, and resume."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.graph.heads import find_unit_groups, mask_units, norm_scores
from lightning_compress.graph.heads_compact import CompactMultiheadAttention, compact_units, unit_counts
from lightning_compress.pruning import HeadPruning
from lightning_compress.pruning.head_select import select_units
from lightning_compress.pruning.schedules import Linear

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*token_id.*")


def bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def gpt2(dropout: float = 0.1) -> nn.Module:
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=32,
                                     num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2ForSequenceClassification(config)


class EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("build", [bert, gpt2, EncoderClassifier], ids=["bert", "gpt2", "encoder"])
def test_half_heads_and_ffn_compact_exactly_to_the_planned_shapes(build):
    model = build().eval()
    ids = torch.randint(2, 50, (3, 12))
    groups, unsupported = find_unit_groups(model)
    assert unsupported == {}
    assert sorted(g.kind for g in groups) == ["ffn", "ffn", "heads", "heads"]
    keeps = select_units({g.name: norm_scores(model, g) for g in groups}, 0.5)
    for group in groups:
        mask_units(model, group, keeps[group.name])
    masked = logits(model, ids)
    dense_params = sum(p.numel() for p in model.parameters())
    model = compact_units(model, groups, keeps)
    compacted = logits(model, ids)
    assert float((masked - compacted).norm() / masked.norm()) <= 1e-4
    assert sorted(unit_counts(model).values()) == [2, 2, 32, 32]
    removed = dense_params - sum(p.numel() for p in model.parameters())
    assert removed == 2 * (4 * 16 * 32 + 3 * 16 + 2 * 32 * 32 + 32)  # Q/K/V/O rows+biases, FFN rows+biases+cols
    model.train()  # and it still trains (backward through the smaller layers)
    out = model(ids)
    (out.logits if hasattr(out, "logits") else out).sum().backward()


def test_compact_multihead_attention_matches_masked_module_with_padding_and_causal_masks():
    mha = nn.MultiheadAttention(16, 4, batch_first=False).eval()
    groups, _ = find_unit_groups(mha)
    keep = {"": torch.tensor([True, False, True, False])}
    mask_units(mha, groups[0], keep[""])
    x = torch.randn(6, 2, 16)
    padding = torch.tensor([[False] * 5 + [True], [False] * 6])
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    with torch.no_grad():
        want, want_w = mha(x, x, x, key_padding_mask=padding, attn_mask=causal, average_attn_weights=False)
        small = compact_units(mha, groups, keep)
        got, got_w = small(x, x, x, key_padding_mask=padding, attn_mask=causal, average_attn_weights=False)
    assert isinstance(small, CompactMultiheadAttention) and small.num_heads == 2
    assert torch.allclose(want, got, atol=1e-5) and torch.allclose(want_w[:, [0, 2]], got_w, atol=1e-5)


class OddAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)[..., :8]


class Tagged(pl.LightningModule):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    @property
    def compression_target(self) -> nn.Module:
        return self.network

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.network(ids)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        ids, labels = batch
        return nn.functional.cross_entropy(self(ids), labels)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_unsupported_attention_is_named_and_exclude_must_match(trainer_factory):
    network = nn.Sequential(OddAttention(), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    with pytest.raises(ValueError, match=r"'0'.*unknown attention layout \(OddAttention\)"):
        HeadPruning(0.5).setup(trainer_factory(), Tagged(network), "fit")
    HeadPruning(0.5, exclude="0").setup(trainer_factory(), Tagged(network), "fit")  # named: left alone
    with pytest.raises(ValueError, match="exclude pattern 'nothing'"):
        HeadPruning(0.5, exclude=["0", "nothing"]).setup(trainer_factory(), Tagged(network), "fit")
    with pytest.raises(ValueError, match="criterion"):
        HeadPruning(0.5, criterion="l3")


def _data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (64, 10), generator=generator)
    return DataLoader(TensorDataset(ids, (ids[:, 0] < 25).long()), batch_size=16)


def test_soft_pruning_then_compaction_at_fit_end(trainer_factory):
    module = Tagged(EncoderClassifier())
    pruning = HeadPruning(0.5, 0.5, mode="soft", schedule=Linear(start=0, end=2), compact_on_fit_end=True)
    trainer_factory(max_epochs=2, limit_train_batches=2, callbacks=[pruning]).fit(module, _data())
    assert pruning.compacted and pruning.alive("heads") == 0.5 and pruning.alive("ffn") == 0.5
    layer = module.network.encoder.layers[0]
    assert isinstance(layer.self_attn, CompactMultiheadAttention) and layer.self_attn.num_heads == 2
    assert layer.linear1.out_features == 32 and layer.linear2.in_features == 32
    module.eval()
    assert module(torch.randint(0, 50, (2, 10))).shape == (2, 2)
    trainer_factory(max_epochs=1, limit_train_batches=1, callbacks=[pruning]).fit(module, _data())  # fine-tune
    assert module.network.encoder.layers[1].self_attn.num_heads == 2 and layer.linear1.out_features == 32


def _fit(root, epochs, resume=None, save=None):  # type: ignore[no-untyped-def]
    pl.seed_everything(0)
    module = Tagged(gpt2(dropout=0.0))  # dropout draws are not in checkpoints
    pruning = HeadPruning(0.5, 0.25, criterion="taylor", scope="global", mode="hard",
                          schedule=Linear(start=0, end=4, unit="step", frequency=3))
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=2, callbacks=[pruning], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(root), deterministic=True)
    module.network.forward = _logits_only(module.network)  # type: ignore[method-assign]
    trainer.fit(module, _data(), ckpt_path=resume)
    if save:
        trainer.save_checkpoint(save)
    return module, pruning


def _logits_only(network):  # type: ignore[no-untyped-def]
    forward = network.forward
    return lambda ids: forward(ids).logits


def test_resume_continues_exactly(tmp_path):
    straight, pruning = _fit(tmp_path / "a", 3)
    _fit(tmp_path / "b", 1, save=tmp_path / "half.ckpt")
    resumed, pruning_b = _fit(tmp_path / "c", 3, resume=str(tmp_path / "half.ckpt"))
    assert pruning.position == 6 and 0 < pruning.alive("heads") < 1
    assert {k: v.tolist() for k, v in pruning.masks.items()} == {k: v.tolist() for k, v in pruning_b.masks.items()}
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    copy.deepcopy(resumed)  # still a plain module
