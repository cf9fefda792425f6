"""Graph-based distillation math (no Lightning): instance graphs over a batch, their matching loss, and soft-target
weights from the teacher graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_compress.distillation.checks import check_logits, check_same_batch, check_temperature

#: Rules of :func:`graph_soft_weights`.
WEIGHTINGS = ("none", "agreement", "confidence", "agreement*confidence")


# ---------------------------------------------------------------------------------------------------- graphs


def instance_graph(features: torch.Tensor) -> torch.Tensor:
    """Dense instance graph of a batch: ``A_ij = cos(f_i, f_j)`` of the ``(B, -1)`` flattened features (``(B, B)``,
    symmetric, ones on the diagonal for non-zero features).

    >>> instance_graph(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]))
    tensor([[1.0000, 0.7071, 0.0000],
            [0.7071, 1.0000, 0.7071],
            [0.0000, 0.7071, 1.0000]])
    """
    unit = F.normalize(features.flatten(1), p=2.0, dim=1)
    return unit @ unit.t()


def knn_mask(adjacency: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``(B, B)`` mask of each node's ``k`` strongest edges to *other* nodes (row ``i``: ``i``'s
    neighbours; ``k`` is clipped to ``B - 1``; ties broken as ``torch.topk`` does). Not symmetric in general.

    >>> knn_mask(torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]]), 1).int()
    tensor([[0, 1, 0],
            [1, 0, 0],
            [0, 1, 0]], dtype=torch.int32)
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    batch = adjacency.shape[0]
    eye = torch.eye(batch, dtype=torch.bool, device=adjacency.device)
    k = min(k, batch - 1)
    mask = torch.zeros_like(eye)
    if k == 0:
        return mask
    scores = adjacency.detach().masked_fill(eye, float("-inf"))
    return mask.scatter(1, scores.topk(k, dim=1).indices, True)


def graph_matching_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, k: int | None = None
) -> torch.Tensor:
    """Instance-graph matching: ``mean_{(i, j) in E} (A^s_ij - A^t_ij)^2`` with ``A`` from :func:`instance_graph`.

    ``E`` is every ordered pair ``i != j`` (dense graph), or with ``k`` the edges of the *teacher's* ``k``-nearest-
    neighbour graph (:func:`knn_mask`): the student reproduces the teacher's strongest relations only. This is the
    edge term of IRG (Liu et al. 2019, "Knowledge Distillation via Instance Relationship Graph"), with cosine
    similarity instead of Euclidean distance as the edge (scale-free, as in Tung & Mori 2019), and the kNN
    sparsification of graph-based KD (Lee & Song 2019, "Graph-based Knowledge Distillation by Multi-head Attention
    Network", whose graph is built from each sample's nearest neighbours). Widths may differ. ``B >= 2``.

    >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    >>> graph_matching_loss(s, t)  # off-diagonal cosines 0 vs 0.7071: (0.7071)^2
    tensor(0.5000)
    """
    check_same_batch(student_features, teacher_features)
    batch = student_features.shape[0]
    if batch < 2:
        raise ValueError(f"an instance graph needs a batch of at least 2, got {batch}.")
    student_graph, teacher_graph = instance_graph(student_features), instance_graph(teacher_features)
    if k is None:
        edges = ~torch.eye(batch, dtype=torch.bool, device=student_graph.device)
    else:
        edges = knn_mask(teacher_graph, k)
    return (student_graph - teacher_graph)[edges].pow(2).mean()


# ---------------------------------------------------------------------------------------------------- weighting


def neighbour_label_agreement(adjacency: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per node, the fraction of its ``k`` nearest neighbours (:func:`knn_mask`) that share its label; 1 for a
    batch of one.

    >>> a = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    >>> neighbour_label_agreement(a, torch.tensor([0, 0, 1]), k=1)
    tensor([1., 1., 0.])
    """
    mask = knn_mask(adjacency, k)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    count = mask.sum(dim=1)
    agreeing = (mask & same).sum(dim=1)
    return torch.where(count > 0, agreeing / count.clamp_min(1), torch.ones_like(count, dtype=torch.float)).float()


def graph_soft_weights(
    teacher_features: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    rule: str = "agreement",
    k: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weights of the teacher's soft targets from the teacher's instance graph.

    Rules: ``"agreement"``: ``a_i`` = fraction of sample ``i``'s ``k`` nearest neighbours in the teacher's graph
    (:func:`instance_graph` of ``teacher_features``) that carry ``i``'s label (:func:`neighbour_label_agreement`):
    where the teacher's representation puts a sample among other classes (a hard, atypical or mislabelled sample)
    its soft target is less trustworthy and reaches the student less; ``"confidence"``: ``c_i = p_t(y_i)``, the
    teacher's probability of the true label at ``T = 1``; ``"agreement*confidence"``: ``a_i c_i``; ``"none"``: 1.
    The weights are divided by their batch mean (so that their average is 1 and the soft term keeps KD's scale;
    all zero stays zero). Returns ``(weights, raw)``, ``raw`` before that normalisation.

    The kNN label agreement is the reliability signal of Deep k-NN for noisy labels (Bahri, Jiang & Gupta 2020,
    "Deep k-NN for Noisy Labels"), the per-sample re-weighting of soft targets that of weighted soft labels (Zhou
    et al. 2021, "Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff Perspective");
    combining them on the teacher's instance graph of the batch is this library's rule, not a published recipe.

    The graph is the batch's: a sample can only agree with the same-class samples the batch holds. Keep ``k`` below
    the expected number of same-class companions (about ``B / C - 1``), or the weights mostly record the batch's
    class counts (digits, ``B = 64``, 10 classes, a trained teacher: 26% of samples below 1 at ``k = 5``, 0.5% at
    ``k = 2``, 0.1% at ``k = 1``).

    >>> f = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    >>> weights, raw = graph_soft_weights(f, torch.zeros(4, 2), torch.tensor([0, 0, 1, 0]), k=1)
    >>> raw, weights
    (tensor([1., 1., 0., 0.]), tensor([2., 2., 0., 0.]))
    """
    if rule not in WEIGHTINGS:
        raise ValueError(f"rule must be one of {WEIGHTINGS}, got {rule!r}.")
    check_same_batch(teacher_features, teacher_logits)
    raw = torch.ones(labels.shape[0], device=teacher_logits.device)
    if "agreement" in rule:
        raw = raw * neighbour_label_agreement(instance_graph(teacher_features.detach()), labels, k)
    if "confidence" in rule:
        raw = raw * F.softmax(teacher_logits.detach(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    mean = raw.mean()
    weights = raw / mean if mean > 0 else raw
    return weights, raw


def weighted_soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """``T^2 * mean_i w_i KL(p_i^T || q_i^T)``: the soft-target loss of Hinton et al. (2015) with a weight per
    sample (all ones: :func:`~.losses.soft_target_loss`).

    >>> s, t = torch.zeros(2, 2), torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    >>> round(weighted_soft_target_loss(s, t, torch.tensor([2.0, 0.0]), 1.0).item(), 4)  # = soft_target_loss
    0.3278
    """
    check_temperature(temperature)
    check_logits(student_logits, teacher_logits)
    if weights.shape != student_logits.shape[:1]:
        raise ValueError(f"weights must hold one value per sample {tuple(student_logits.shape[:1])}, got "
                         f"{tuple(weights.shape)}.")
    if (weights < 0).any():
        raise ValueError(f"weights must be non-negative, got {weights.tolist()!r}.")
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    per_sample = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * student_log_probs).sum(dim=1)
    return temperature**2 * (weights * per_sample).mean()
