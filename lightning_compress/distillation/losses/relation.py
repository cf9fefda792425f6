"""Relation and structural knowledge: similarity-preserving, relational (RKD) and pair-wise spatial losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_compress.distillation.checks import check_same_batch, pool_to_common


def batch_similarity(features: torch.Tensor) -> torch.Tensor:
    """Row-normalised batch similarity ``normalize(Q Q^T)`` of Tung & Mori (2019), ``Q`` the flattened features.

    >>> batch_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    tensor([[0.7071, 0.7071],
            [0.4472, 0.8944]])
    """
    flat = features.flatten(1)
    return F.normalize(flat @ flat.t(), p=2.0, dim=1)


def similarity_preserving_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving loss (Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation").

    ``||G_s - G_t||_F^2 / B^2`` with ``G = normalize(Q Q^T)`` (:func:`batch_similarity`, each row divided by its L2
    norm) and ``Q`` the ``(B, -1)`` flattened activations; student and teacher may have any widths and sizes.

    >>> x = torch.eye(2)
    >>> similarity_preserving_loss(x, 3 * x)
    tensor(0.)
    """
    check_same_batch(student_features, teacher_features)
    batch = student_features.shape[0]
    difference = batch_similarity(student_features) - batch_similarity(teacher_features)
    return difference.pow(2).sum() / batch**2


def _offdiagonal_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``||x_i - x_j||`` of the ``B (B - 1)`` ordered pairs with ``i != j``.

    Squared distances are clamped at ``1e-12`` before the root, as in the authors' ``pdist``: two equal samples
    (a duplicate image, features zeroed by ReLU) would otherwise give the root an infinite gradient and NaN weights.
    """
    flat = embeddings.flatten(1)
    squared = (flat.unsqueeze(1) - flat.unsqueeze(0)).pow(2).sum(dim=2)
    mask = ~torch.eye(flat.shape[0], dtype=torch.bool, device=flat.device)
    return squared[mask].clamp_min(1e-12).sqrt()


def rkd_distance_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """Distance-wise relational KD loss (Park et al. 2019, "Relational Knowledge Distillation").

    ``psi_D(x_i, x_j) = ||x_i - x_j|| / mu`` with ``mu`` the mean distance over the pairs of the batch; the loss
    is the Huber loss (``delta = 1``, i.e. ``smooth_l1``) between student and teacher ``psi_D``, averaged over the
    ``B (B - 1)`` ordered pairs ``i != j`` (the authors' code also counts the zero diagonal, which scales the value
    by ``(B - 1) / B``). Inputs are flattened to ``(B, -1)``; widths may differ. Needs ``B >= 2`` distinct samples.

    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    >>> rkd_distance_loss(x, 4 * x)  # distances normalised by their mean: scale-free
    tensor(0.)
    """
    check_same_batch(student_embeddings, teacher_embeddings)
    if student_embeddings.shape[0] < 2:
        raise ValueError(f"RKD distance needs a batch of at least 2, got {student_embeddings.shape[0]}.")
    student = _offdiagonal_distances(student_embeddings)
    teacher = _offdiagonal_distances(teacher_embeddings)
    return F.smooth_l1_loss(student / student.mean(), teacher / teacher.mean(), beta=1.0)


def _triplet_cosines(embeddings: torch.Tensor) -> torch.Tensor:
    """``cos`` of the angle at ``x_j`` between ``x_i - x_j`` and ``x_k - x_j`` for distinct ``i, j, k``."""
    flat = embeddings.flatten(1)
    batch = flat.shape[0]
    directions = F.normalize(flat.unsqueeze(0) - flat.unsqueeze(1), p=2.0, dim=2)  # [j, i] = unit(x_i - x_j)
    cosines = torch.bmm(directions, directions.transpose(1, 2))  # [j, i, k]
    eye = torch.eye(batch, dtype=torch.bool, device=flat.device)
    distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))
    return cosines[distinct]


def rkd_angle_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """Angle-wise relational KD loss (Park et al. 2019).

    ``psi_A(x_i, x_j, x_k) = <e_ij, e_kj>`` with ``e_ij = (x_i - x_j) / ||x_i - x_j||``; the loss is the Huber loss
    (``delta = 1``) between student and teacher ``psi_A``, averaged over the ``B (B - 1) (B - 2)`` ordered triplets
    of distinct samples (the authors' code averages over all ``B^3`` entries, degenerate ones included). Inputs are
    flattened to ``(B, -1)``. Needs ``B >= 3`` distinct samples.

    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> rkd_angle_loss(x, 2 * x + 1)  # angles are invariant to scale and shift
    tensor(0.)
    """
    check_same_batch(student_embeddings, teacher_embeddings)
    if student_embeddings.shape[0] < 3:
        raise ValueError(f"RKD angle needs a batch of at least 3, got {student_embeddings.shape[0]}.")
    return F.smooth_l1_loss(_triplet_cosines(student_embeddings), _triplet_cosines(teacher_embeddings), beta=1.0)


def spatial_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of spatial positions of ``(B, C, *spatial)`` maps (Liu et al. 2019).

    Returns:
        ``(B, N, N)`` with ``N`` the number of positions: ``a_ij = f_i . f_j / (||f_i|| ||f_j||)``, ``f_i`` the
        ``C``-vector at position ``i``.

    >>> spatial_similarity(torch.tensor([[[[1.0, 0.0, 2.0]], [[0.0, 1.0, 0.0]]]]))
    tensor([[[1., 0., 1.],
             [0., 1., 0.],
             [1., 0., 1.]]])
    """
    if features.dim() < 3:
        raise ValueError(f"spatial similarity needs (batch, channels, *spatial) maps, got {tuple(features.shape)}.")
    unit = F.normalize(features.flatten(2), p=2.0, dim=1)
    return torch.bmm(unit.transpose(1, 2), unit)


def pairwise_similarity_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Pair-wise distillation of Structured KD (Liu et al. CVPR 2019, "Structured Knowledge Distillation for
    Semantic Segmentation").

    ``sum_{i,j} (a_ij^s - a_ij^t)^2 / N^2``, averaged over the batch, with ``a`` from :func:`spatial_similarity`
    and ``N`` the number of spatial nodes. ``scale`` (as the authors' code) first max-pools each 2-D map into nodes
    of ``ceil(H * scale) x ceil(W * scale)`` positions; ``None`` keeps every position a node. When the spatial sizes
    differ the larger map is average-pooled to the smaller first; channel counts may differ.

    >>> x = torch.randn(2, 3, 4, 4)
    >>> pairwise_similarity_loss(x, x, scale=0.5)
    tensor(0.)
    """
    check_same_batch(student_features, teacher_features)
    student_features, teacher_features = pool_to_common(student_features, teacher_features)
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError(f"scale must lie in (0, 1], got {scale!r}.")
        if student_features.dim() != 4:
            raise ValueError(f"node pooling (scale) needs (B, C, H, W) maps, got {tuple(student_features.shape)}.")
        kernel = (math.ceil(student_features.shape[2] * scale), math.ceil(student_features.shape[3] * scale))
        student_features = F.max_pool2d(student_features, kernel, stride=kernel, ceil_mode=True)
        teacher_features = F.max_pool2d(teacher_features, kernel, stride=kernel, ceil_mode=True)
    difference = spatial_similarity(student_features) - spatial_similarity(teacher_features)
    nodes = difference.shape[1]
    return difference.pow(2).sum(dim=(1, 2)).mean() / nodes**2
