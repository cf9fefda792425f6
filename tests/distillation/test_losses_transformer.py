"""Transformer distillation losses against hand-computed values, layer mappings, the knowledge config's checks, and
the CNN attention term refusing token-shaped states."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_compress.distillation import DistillationModule, TransformerKnowledge
from lightning_compress.distillation.losses.transformer import (
    HiddenProjection,
    attention_distribution_loss,
    hidden_state_loss,
    layer_mapping,
    value_relation_loss,
)
from lightning_compress.distillation.terms import unbalanced_terms


def test_hidden_state_losses_by_hand():
    student = torch.tensor([[[1.0, 0.0], [3.0, 3.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [3.0, 3.0]]])
    assert hidden_state_loss(student, teacher).item() == pytest.approx((1 + 4) / 2 / 2)  # second token equal
    mask = torch.tensor([[1, 0]])
    assert hidden_state_loss(student, teacher, mask=mask).item() == pytest.approx(2.5)  # padding ignored
    assert hidden_state_loss(student, teacher, kind="cosine", mask=mask).item() == pytest.approx(1.0)  # orthogonal
    assert hidden_state_loss(student, teacher, kind="cosine").item() == pytest.approx(0.5)
    projection = HiddenProjection(2, 3)
    with torch.no_grad():
        projection.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    wide = torch.cat([teacher, torch.zeros(1, 2, 1)], dim=-1)
    assert hidden_state_loss(student, wide, projection).item() == pytest.approx((1 + 4) / 3 / 2)
    with pytest.raises(ValueError, match="hidden widths differ"):
        hidden_state_loss(student, wide)


def test_attention_distribution_kl_by_hand():
    teacher = torch.tensor([0.5, 0.5]).expand(1, 1, 2, 2)
    student = torch.tensor([0.25, 0.75]).expand(1, 1, 2, 2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert attention_distribution_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    # different head counts: head-averaged distributions
    two_heads = torch.stack([teacher[0, 0], teacher[0, 0]])[None]
    assert attention_distribution_loss(student, two_heads).item() == pytest.approx(expected, rel=1e-5)


def test_value_relation_by_hand():
    student = torch.tensor([[[1.0], [0.0]]])
    teacher = torch.zeros(1, 2, 1)  # uniform relations
    p = math.e / (math.e + 1)
    row0 = 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))
    assert value_relation_loss(student, teacher).item() == pytest.approx(row0 / 2, rel=1e-5)  # second row equal
    assert value_relation_loss(student, teacher, mask=torch.tensor([[1, 0]])).item() == pytest.approx(0.0, abs=1e-6)
    wide = torch.randn(2, 5, 8)
    assert value_relation_loss(torch.randn(2, 5, 4), wide, heads=2).item() > 0  # widths may differ
    with pytest.raises(ValueError, match="must divide"):
        value_relation_loss(torch.randn(2, 5, 3), wide, heads=2)


def test_layer_mappings():
    assert layer_mapping(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert layer_mapping(2, 6, "last") == [(1, 5), (2, 6)]
    assert layer_mapping(3, 6, "final") == [(3, 6)]
    assert layer_mapping(3, 6, [1, 0, 6]) == [(1, 1), (3, 6)]
    for rule, message in (("middle", "not one of"), ([1, 2], "one teacher layer"), ([1, 2, 7], "one teacher layer")):
        with pytest.raises(ValueError, match=message):
            layer_mapping(3, 6, rule)
    with pytest.raises(ValueError, match="no more student layers"):
        layer_mapping(4, 2)


def test_knowledge_is_checked_when_built():
    with pytest.raises(ValueError, match="hidden_loss='l1'"):
        TransformerKnowledge(hidden_weight=1.0, hidden_loss="l1")
    with pytest.raises(ValueError, match="needs student_values and teacher_values"):
        TransformerKnowledge(value_weight=1.0)
    with pytest.raises(ValueError, match="layer_map='middle'"):
        TransformerKnowledge(layer_map="middle")
    with pytest.raises(ValueError, match="Unknown student layer 'nope'"):
        DistillationModule(nn.Linear(2, 2), nn.Linear(2, 2),
                           transformer=TransformerKnowledge(hidden_weight=1.0, student_blocks=["nope"],
                                                            teacher_blocks=["nope"]))


class Tokens(nn.Module):
    """(batch, tokens) ids -> (batch, tokens, hidden) states -> logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Embedding(10, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(ids.long())).mean(dim=1))


def test_cnn_attention_term_refuses_token_states():
    with pytest.raises(ValueError, match=r"token-shaped \(batch, tokens, hidden\)"):
        DistillationModule(Tokens(4), Tokens(8), attention_weight=1.0, student_layers=["block"],
                           teacher_layers=["block"], input_shape=[5])


def test_tapped_blocks_give_hidden_states_with_projection():
    module = DistillationModule(Tokens(4), Tokens(8), input_shape=[5], transformer=TransformerKnowledge(
        hidden_weight=1.0, student_blocks=["block"], teacher_blocks=["block"]))
    assert isinstance(module.transformer_terms.projections[0], HiddenProjection)
    module.setup("fit")
    ids = torch.randint(0, 10, (4, 5))
    module.student_forward(ids)
    module.teacher_forward(ids)
    terms = module.compute_terms(torch.zeros(4, 3), [torch.zeros(4, 3)], torch.zeros(4, dtype=torch.long))
    assert terms["hidden"].item() > 0 and terms["hidden"].requires_grad
    module.remove_taps()


def test_unbalanced_warning_reads_terms_without_a_user_warning():
    soft = torch.tensor(2.0, requires_grad=True) * 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = unbalanced_terms({"soft": soft, "hint": torch.tensor(200.0, requires_grad=True) * 1.0},
                                   {"soft": 1.0, "hint": 1.0})
    assert message is not None and message.startswith("hint term is 100x")
