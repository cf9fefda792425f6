"""Graph-based distillation: an instance graph over the batch as the carrier of knowledge and as a filter on it.

Samples are the nodes, the cosine similarity of their features the edges (optionally sparsified to each node's
``k`` nearest neighbours). The teacher's graph is (1) matched by the student's graph (:func:`graph_matching_loss`)
and (2) used to decide how much of the teacher's soft target reaches each sample (:func:`graph_soft_weights`).
The math is in :mod:`~lightning_compress.distillation.losses.graph`; :class:`GraphDistillationModule` is the thin
Lightning part.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_compress.distillation.checks import check_nonnegative
from lightning_compress.distillation.losses.graph import (
    WEIGHTINGS,
    graph_matching_loss,
    graph_soft_weights,
    instance_graph,
    knn_mask,
    neighbour_label_agreement,
    weighted_soft_target_loss,
)
from lightning_compress.distillation.module import DistillationModule

# ---------------------------------------------------------------------------------------------------- module


class GraphDistillationModule(DistillationModule):
    """Graph-based distillation: the teacher's instance graph of each batch as knowledge and as a filter.

    - ``graph`` term (``graph_weight``): :func:`graph_matching_loss` between the student's and the teacher's
      instance graphs, summed over the tapped layer pairs (``student_layers`` / ``teacher_layers``), or on the
      logits when no layers are tapped; ``graph_k`` sparsifies to the teacher's ``k`` nearest neighbours.
    - graph-weighted soft targets (``soft_weighting``): the ``soft`` term becomes
      :func:`weighted_soft_target_loss` with per-sample weights from :func:`graph_soft_weights`, computed on the
      teacher's graph of the last tapped teacher layer (its logits without layers) with ``weighting_k``
      neighbours. The mean raw weight of the batch is logged as ``distill/graph_soft_weight``.

    Every term of :class:`~.module.DistillationModule` stays available (one teacher for the weighted soft term).
    Logged every epoch: ``distill/graph``, ``distill/soft``, ``distill/graph_soft_weight`` and the base metrics.

    Args:
        student: the network to train.
        teacher: the trained network.
        graph_weight: weight of the graph-matching term.
        graph_k: neighbours per node of the matched graph (``None``: dense).
        soft_weighting: ``"none"``, ``"agreement"``, ``"confidence"`` or ``"agreement*confidence"``.
        weighting_k: neighbours per node for the ``agreement`` rule.
        **kwargs: any argument of :class:`~.module.DistillationModule` (soft/hard weights, temperature, layers...).

    Raises:
        ValueError: for a negative weight, ``graph_k`` or ``weighting_k`` below 1, an unknown ``soft_weighting``
            (naming the allowed ones), ``soft_weighting`` with ``soft_weight = 0`` or with several teachers.

    >>> module = GraphDistillationModule(nn.Linear(4, 3), nn.Linear(4, 3), graph_weight=1.0, graph_k=2)
    >>> module.weights["graph"], module.graph_k
    (1.0, 2)
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | list[nn.Module],
        graph_weight: float = 0.0,
        graph_k: int | None = None,
        soft_weighting: str = "none",
        weighting_k: int = 5,
        **kwargs: Any,
    ) -> None:
        check_nonnegative(graph_weight, "graph_weight")
        if graph_k is not None and graph_k < 1:
            raise ValueError(f"graph_k must be a positive integer or None, got {graph_k!r}.")
        if weighting_k < 1:
            raise ValueError(f"weighting_k must be a positive integer, got {weighting_k!r}.")
        if soft_weighting not in WEIGHTINGS:
            raise ValueError(f"soft_weighting must be one of {WEIGHTINGS}, got {soft_weighting!r}.")
        super().__init__(student, teacher, **kwargs)
        self.save_hyperparameters(ignore=["student", "teacher", *self.recipe_callables()])
        if soft_weighting != "none" and self.weights["soft"] == 0:
            raise ValueError(f"soft_weighting={soft_weighting!r} weighs the soft term, but soft_weight is 0.")
        if soft_weighting != "none" and len(self.teachers) > 1:
            raise ValueError(f"soft_weighting={soft_weighting!r} supports one teacher, got {len(self.teachers)}.")
        self.weights["graph"] = float(graph_weight)
        if not any(value > 0 for value in self.weights.values()):
            raise ValueError(f"At least one loss weight must be positive, got {self.weights!r}.")
        self.graph_k, self.soft_weighting, self.weighting_k = graph_k, soft_weighting, weighting_k

    @staticmethod
    def check_term_weights(**weights: float) -> dict[str, float]:
        """Negative weights fail here; "all zero" is checked once the ``graph`` weight is known."""
        for name, value in weights.items():
            check_nonnegative(value, f"{name}_weight")
        return dict(weights)

    @override
    def active_terms(self) -> list[str]:
        names = [name for name in super().active_terms() if name != "graph"]  # base: no stage for it
        if self.weights["graph"] > 0 and (self.feature_stage_epochs == 0 or self.in_feature_stage):
            names.append("graph")
        return names

    def _feature_pairs(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._student_taps is None or self._teacher_taps is None:
            return [(student_logits, teacher_logits)]
        return list(zip(self._student_taps.features(), self._teacher_taps.features(), strict=True))

    @override
    def compute_terms(
        self, student_logits: torch.Tensor, teacher_logits: list[torch.Tensor], targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms = super().compute_terms(student_logits, teacher_logits, targets)
        active = self.active_terms()
        pairs = self._feature_pairs(student_logits, teacher_logits[0])
        if "graph" in active:
            if student_logits.shape[0] < 2:
                terms["graph"] = student_logits.new_zeros(())  # e.g. a last batch of one sample
            else:
                terms["graph"] = torch.stack([graph_matching_loss(s, t, self.graph_k) for s, t in pairs]).sum()
        if "soft" in active and self.soft_weighting != "none":
            weights, raw = graph_soft_weights(pairs[-1][1], teacher_logits[0], targets, self.soft_weighting,
                                              self.weighting_k)
            terms["soft"] = weighted_soft_target_loss(student_logits, teacher_logits[0], weights, self.temperature)
            if self._trainer is not None:
                self.log_epoch("distill/graph_soft_weight", raw.mean(), len(targets))
        return terms


__all__ = [
    "WEIGHTINGS",
    "GraphDistillationModule",
    "graph_matching_loss",
    "graph_soft_weights",
    "instance_graph",
    "knn_mask",
    "neighbour_label_agreement",
    "weighted_soft_target_loss",
]
