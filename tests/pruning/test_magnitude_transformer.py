"""MagnitudePruning on a transformer: token embeddings left dense by default (the embedding rule), the fused Q/K/V
weight of nn.MultiheadAttention pruned, an exclude pattern matching nothing an error."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import MagnitudePruning
from lightning_compress.demo import ClassifierModule


class TinyEncoder(nn.Module):
    """One-hot tokens -> a Linear token embedding -> nn.TransformerEncoder -> a tied LM-style head and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Linear(12, 16)
        self.position = nn.Embedding(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.decoder = nn.Linear(16, 6, bias=False)
        self.decoder.weight = self.position.weight  # tied to an nn.Embedding: an embedding by the rule
        self.classifier = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embedding(tokens) + self.position.weight
        hidden = self.encoder(hidden)
        unused = 0 * self.decoder(hidden).sum()  # runs before the classifier, the last layer
        return self.classifier(hidden.mean(dim=1)) + unused


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    tokens = nn.functional.one_hot(torch.randint(0, 12, (32, 6), generator=generator), 12).float()
    return DataLoader(TensorDataset(tokens, torch.randint(0, 3, (32,), generator=generator)), batch_size=16)


def classifier() -> ClassifierModule:
    return ClassifierModule(TinyEncoder(), num_classes=3)


def test_embeddings_stay_dense_and_qkv_is_pruned(trainer_factory):
    module = classifier()
    pruning = MagnitudePruning(sparsity=0.5, scope="layer")
    trainer_factory(callbacks=[pruning], max_epochs=1, logger=False).fit(module, loader())
    network = module.compression_target
    attention = network.encoder.layers[0].self_attn
    assert "encoder.layers.0.self_attn.in_proj" in pruning.masks
    assert (attention.in_proj_weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert "encoder.layers.0.self_attn.out_proj" in pruning.masks
    assert "token_embedding" not in pruning.masks and "decoder" not in pruning.masks
    assert (network.token_embedding.weight != 0).all() and (network.position.weight != 0).all()

    with_embeddings = MagnitudePruning(sparsity=0.5, prune_embeddings=True)
    trainer_factory(callbacks=[with_embeddings], max_epochs=1, logger=False).fit(classifier(), loader())
    assert {"token_embedding", "decoder"} <= set(with_embeddings.masks)


def test_an_exclude_pattern_matching_nothing_is_an_error(trainer_factory):
    module = classifier()
    with pytest.raises(ValueError, match=r"exclude pattern 'attn' matches no module.*'\.\*attn\.\*'"):
        trainer_factory(callbacks=[MagnitudePruning(exclude="attn")], max_epochs=1, logger=False).fit(module, loader())
    pruning = MagnitudePruning(sparsity=0.5, exclude=".*attn.*")
    trainer_factory(callbacks=[pruning], max_epochs=1, logger=False).fit(classifier(), loader())
    assert not any("attn" in name for name in pruning.masks) and "encoder.layers.0.linear1" in pruning.masks
