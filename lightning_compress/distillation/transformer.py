"""Transformer terms of :class:`~.module.DistillationModule` (no Lightning): what to distill between two
transformers (:class:`TransformerKnowledge`), and the module that reads it from their outputs or taps and holds the
learned projections (:class:`TransformerTerms`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.distillation.checks import check_nonnegative
from lightning_compress.distillation.losses.transformer import (
    HIDDEN_LOSSES,
    HiddenProjection,
    attention_distribution_loss,
    hidden_state_loss,
    layer_mapping,
    value_relation_loss,
)
from lightning_compress.distillation.taps import FeatureTaps, check_layer_names

#: The transformer terms, as logged (``distill/<term>``) and weighted.
TRANSFORMER_TERMS = ("hidden", "attention_kl", "value_relation")


@dataclass
class TransformerKnowledge:
    """What :class:`~.module.DistillationModule` distills between two transformers (``transformer=...``; in YAML a
    mapping of these fields).

    Hidden states come from the models' outputs (``output_hidden_states=True``: Hugging Face models) or, when
    ``student_blocks`` / ``teacher_blocks`` name the transformer blocks, from taps on them (``nn.TransformerEncoder``
    layers, timm blocks); attention probabilities from ``output_attentions=True`` (Hugging Face: build the models
    with ``attn_implementation="eager"``, SDPA returns none); values from taps on the value projections.

    Args:
        hidden_weight: weight of the hidden-state term (:func:`~.losses.transformer.hidden_state_loss`, one learned
            :class:`~.losses.transformer.HiddenProjection` per layer pair when widths differ), summed over the pairs
            of ``layer_map``.
        hidden_loss: ``"mse"`` (TinyBERT) or ``"cosine"`` (DistilBERT).
        attention_weight: weight of MiniLM's attention-distribution KL, summed over the pairs of ``layer_map``.
        value_weight: weight of MiniLM's value-relation KL between ``student_values`` and ``teacher_values``.
        layer_map: ``"uniform"``, ``"last"``, ``"final"`` or one teacher layer per student layer
            (:func:`~.losses.transformer.layer_mapping`).
        relation_heads: relation heads of the value relation (must divide both value widths).
        student_blocks, teacher_blocks: names of the transformer blocks to tap for hidden states (in order).
        student_values, teacher_values: names of the value projections to tap (MiniLM: the last layer's).
    """

    hidden_weight: float = 0.0
    hidden_loss: str = "mse"
    attention_weight: float = 0.0
    value_weight: float = 0.0
    layer_map: str | list[int] = "uniform"
    relation_heads: int = 1
    student_blocks: list[str] = field(default_factory=list)
    teacher_blocks: list[str] = field(default_factory=list)
    student_values: str | None = None
    teacher_values: str | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_weight", "attention_weight", "value_weight"):
            check_nonnegative(getattr(self, name), name)
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss={self.hidden_loss!r} is not one of {list(HIDDEN_LOSSES)}.")
        layer_mapping(1, 1, self.layer_map if isinstance(self.layer_map, str) else [1])  # a known rule
        if isinstance(self.relation_heads, bool) or not isinstance(self.relation_heads, int) \
                or self.relation_heads < 1:
            raise ValueError(f"relation_heads={self.relation_heads!r} must be a positive integer.")
        if bool(self.student_blocks) != bool(self.teacher_blocks):
            raise ValueError("student_blocks and teacher_blocks go together: give both or neither, got "
                             f"{self.student_blocks!r} and {self.teacher_blocks!r}.")
        if self.value_weight > 0 and not (self.student_values and self.teacher_values):
            raise ValueError(f"value_weight={self.value_weight} needs student_values and teacher_values (names of the "
                             "value projections to tap, e.g. 'bert.encoder.layer.3.attention.self.value').")

    @classmethod
    def parse(cls, value: TransformerKnowledge | Mapping[str, Any] | None, hparams: Any = None
              ) -> TransformerKnowledge | None:
        """``value`` as a :class:`TransformerKnowledge` (from itself or a mapping of its fields); stored in
        ``hparams`` (when given) as a plain dictionary, so checkpoints load without this class."""
        knowledge = cls(**value) if isinstance(value, Mapping) else value
        if knowledge is not None and not isinstance(knowledge, cls):
            raise ValueError(f"transformer must be a TransformerKnowledge or a mapping of its fields, got {value!r}.")
        if hparams is not None:
            hparams["transformer"] = None if knowledge is None else asdict(knowledge)
        return knowledge

    def weights(self) -> dict[str, float]:
        return {"hidden": self.hidden_weight, "attention_kl": self.attention_weight,
                "value_relation": self.value_weight}

    def output_options(self) -> dict[str, bool]:
        """The keywords asking a Hugging Face model for what the terms read from its output."""
        options = {}
        if self.hidden_weight > 0 and not self.student_blocks:
            options["output_hidden_states"] = True
        if self.attention_weight > 0:
            options["output_attentions"] = True
        return options


def _states(output: Any, name: str, model: str) -> list[torch.Tensor]:
    found = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    if not found:
        advice = (" (Hugging Face: build the model with attn_implementation='eager'; SDPA returns no attentions)"
                  if name == "attentions" else " (or name the blocks to tap: student_blocks / teacher_blocks)")
        raise ValueError(f"The {model}'s output has no {name!r}: the transformer terms need a model that returns "
                         f"them when called with output_{name}=True{advice}.")
    return list(found)


class TransformerTerms(nn.Module):
    """The transformer terms of one student/teacher pair: :meth:`build` checks the pair on one example output and
    creates the projections; :meth:`attach` taps blocks and values; :meth:`forward` returns the unweighted terms."""

    def __init__(self, knowledge: TransformerKnowledge) -> None:
        super().__init__()
        self.knowledge = knowledge
        self.projections = nn.ModuleList()
        self.register_buffer("widths", torch.zeros(0, 2, dtype=torch.long))  # (student, teacher) width per pair
        self._taps: list[FeatureTaps] = []

    def check_names(self, student: nn.Module, teacher: nn.Module) -> None:
        k = self.knowledge
        check_layer_names(student, k.student_blocks + ([k.student_values] if k.student_values else []), "student")
        check_layer_names(teacher, k.teacher_blocks + ([k.teacher_values] if k.teacher_values else []), "teacher")

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Tap the named blocks and value projections (once; :meth:`remove` detaches)."""
        k = self.knowledge
        if self._taps:
            return
        names = [k.student_blocks + ([k.student_values] if k.student_values else []),
                 k.teacher_blocks + ([k.teacher_values] if k.teacher_values else [])]
        if names[0] or names[1]:
            self._taps = [FeatureTaps(student, names[0]), FeatureTaps(teacher, names[1])]

    def remove(self) -> None:
        for taps in self._taps:
            taps.remove()
        self._taps = []

    def clear(self) -> None:
        for taps in self._taps:
            taps.clear()

    def _hidden(self, output: Any, role: int) -> list[torch.Tensor]:
        """Hidden states indexed by layer (index 0: the embeddings, or ``None`` from taps)."""
        blocks = (self.knowledge.student_blocks, self.knowledge.teacher_blocks)[role]
        if blocks:
            return [torch.empty(0), *self._taps[role].features(blocks)]
        return _states(output, "hidden_states", ("student", "teacher")[role])

    def pairs(self, student_output: Any, teacher_output: Any) -> list[tuple[int, int]]:
        student = self._hidden(student_output, 0) if self.knowledge.hidden_weight > 0 else \
            [None, *_states(student_output, "attentions", "student")]
        teacher = self._hidden(teacher_output, 1) if self.knowledge.hidden_weight > 0 else \
            [None, *_states(teacher_output, "attentions", "teacher")]
        return layer_mapping(len(student) - 1, len(teacher) - 1, self.knowledge.layer_map)

    def build(self, student_output: Any, teacher_output: Any) -> None:
        """Check the outputs hold what the active terms read (one example forward with :meth:`attach`'s taps and
        ``output_options``) and create the projections where hidden widths differ."""
        k = self.knowledge
        pairs = self.pairs(student_output, teacher_output)
        if k.attention_weight > 0:
            _states(student_output, "attentions", "student")
            _states(teacher_output, "attentions", "teacher")
        if k.hidden_weight > 0 and len(self.projections) == 0:
            student, teacher = self._hidden(student_output, 0), self._hidden(teacher_output, 1)
            self.widths = torch.tensor([[student[s].shape[-1], teacher[t].shape[-1]] for s, t in pairs])
            self._projections_from_widths()
        self.clear()

    def _projections_from_widths(self) -> None:
        for s, t in self.widths.tolist():
            self.projections.append(HiddenProjection(s, t) if s != t else nn.Identity())

    def build_from_state(self, state: Mapping[str, Any], prefix: str) -> None:
        """Create the projections from a checkpoint's ``<prefix>widths`` (before loading it into a fresh module)."""
        widths = state.get(f"{prefix}widths")
        if len(self.projections) == 0 and isinstance(widths, torch.Tensor) and len(widths):
            self.widths = widths.clone()
            self._projections_from_widths()

    def forward(self, student_output: Any, teacher_output: Any, active: list[str],
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Unweighted terms named in ``active``; ``mask``: the batch's ``attention_mask`` (padding ignored)."""
        k, terms = self.knowledge, {}
        if "hidden" in active or "attention_kl" in active:
            pairs = self.pairs(student_output, teacher_output)
        if "hidden" in active:
            student, teacher = self._hidden(student_output, 0), self._hidden(teacher_output, 1)
            terms["hidden"] = torch.stack([
                hidden_state_loss(student[s], teacher[t], projection, k.hidden_loss, mask)
                for (s, t), projection in zip(pairs, self.projections, strict=True)]).sum()
        if "attention_kl" in active:
            student = _states(student_output, "attentions", "student")
            teacher = _states(teacher_output, "attentions", "teacher")
            terms["attention_kl"] = torch.stack([
                attention_distribution_loss(student[s - 1], teacher[t - 1], mask) for s, t in pairs]).sum()
        if "value_relation" in active:
            assert k.student_values is not None and k.teacher_values is not None
            terms["value_relation"] = value_relation_loss(self._taps[0][k.student_values],
                                                          self._taps[1][k.teacher_values], k.relation_heads, mask)
        return terms


def attention_mask_of(inputs: Any) -> torch.Tensor | None:
    """The ``attention_mask`` of keyword inputs (a tokenized batch), else ``None``."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask if isinstance(mask, torch.Tensor) else None


__all__ = ["TRANSFORMER_TERMS", "TransformerKnowledge", "TransformerTerms", "attention_mask_of"]
