"""A generated token task for transformers (nothing downloaded): sentiment-like sequences in which a model has to
count polar words and read each "not" with the word after it, and a BERT classifier built from its config.

Token 0 starts every sequence (``[CLS]``-like), token 1 is "not" (15% of positions), ids 2..7 are positive words
(+1), 8..13 negative (-1), 14..19 neutral; "not" flips the next word. The label says whether the summed polarity is
<= -2, -1..1 or >= 2 (three classes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["POLARITY_SEQ", "POLARITY_VOCAB", "TokenDataset", "polarity_bert", "polarity_tokens"]

POLARITY_SEQ, POLARITY_VOCAB, _GROUP = 12, 20, 6


def polarity_tokens(count: int, seed: int) -> dict[str, torch.Tensor]:
    """``count`` sequences as a tokenizer's batch: ``input_ids``, ``attention_mask`` and ``labels``.

    >>> data = polarity_tokens(4, seed=0)
    >>> data["input_ids"].shape, data["labels"].tolist() == polarity_tokens(4, seed=0)["labels"].tolist()
    (torch.Size([4, 12]), True)
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, POLARITY_VOCAB, (count, POLARITY_SEQ), generator=generator)
    ids[torch.rand(count, POLARITY_SEQ, generator=generator) < 0.15] = 1
    ids[:, 0] = 0
    polarity = torch.zeros(POLARITY_VOCAB)
    polarity[2:2 + _GROUP], polarity[2 + _GROUP:2 + 2 * _GROUP] = 1.0, -1.0
    negated = torch.cat([torch.zeros(count, 1, dtype=torch.bool), ids[:, :-1] == 1], dim=1)
    score = (polarity[ids] * (1 - 2 * negated.float())).sum(dim=1)
    labels = (score > -2).long() + (score > 1).long()  # negative / balanced / positive
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class TokenDataset(Dataset):
    """Dict samples (``input_ids``, ``attention_mask``, ``labels``), as a tokenizer's dataset gives them."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.data.items()}


def polarity_bert(hidden: int, layers: int, heads: int, ffn: int | None = None) -> Any:
    """A ``BertForSequenceClassification`` for the task (FFN ``2 * hidden`` by default, no dropout, eager
    attention so that attention probabilities are in its outputs); needs ``transformers``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(  # type: ignore[call-arg]  # num_labels is a PretrainedConfig keyword
        vocab_size=POLARITY_VOCAB, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=ffn or 2 * hidden, max_position_embeddings=POLARITY_SEQ,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"  # SDPA returns no attention probabilities
    return BertForSequenceClassification(config)
