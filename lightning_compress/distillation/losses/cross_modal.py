"""Cross-modal distillation math (no Lightning): named input views and the losses between two modalities -
feature statistics (moments, MMD) for unpaired data and pooled hints for paired data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.distillation import losses
from lightning_compress.distillation.checks import check_same_batch

View = Callable[[torch.Tensor], torch.Tensor]

#: Named views (``"name"`` or ``"name:value"``), as a YAML config gives them.
VIEW_NAMES = ("identity", "downsample", "mask", "noise")
MODES = ("paired", "unpaired")
STATISTICS = ("moments", "mmd")


# ---------------------------------------------------------------------------------------------------- views


def downsample_view(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool ``(B, C, H, W)`` images by ``factor`` and upsample back (nearest): same shape, less detail.

    >>> downsample_view(torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]]), 2)
    tensor([[[[4., 4.],
              [4., 4.]]]])
    """
    if x.dim() != 4:
        raise ValueError(f"downsample needs (batch, channels, height, width) images, got {tuple(x.shape)}.")
    if factor == 1:
        return x
    return F.interpolate(F.avg_pool2d(x, factor, ceil_mode=True), size=x.shape[2:], mode="nearest")


def mask_view(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero the bottom ``round(fraction * H)`` rows of ``(B, C, H, W)`` images (deterministic occlusion; 0 is the
    mean of standardised inputs).

    >>> mask_view(torch.ones(1, 1, 4, 1), 0.5).flatten().tolist()
    [1.0, 1.0, 0.0, 0.0]
    """
    if x.dim() != 4:
        raise ValueError(f"mask needs (batch, channels, height, width) images, got {tuple(x.shape)}.")
    rows = round(fraction * x.shape[2])
    if rows == 0:
        return x
    keep = torch.ones(x.shape[2], 1, dtype=x.dtype, device=x.device)
    keep[x.shape[2] - rows:] = 0
    return x * keep


def noise_view(x: torch.Tensor, std: float) -> torch.Tensor:
    """Add Gaussian noise of standard deviation ``std`` (drawn anew at every call, evaluation included)."""
    return x + std * torch.randn_like(x) if std > 0 else x


def _parse_number(spec: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"View {spec!r}: {text!r} is not a valid {kind.__name__}.") from None


def make_view(spec: str | View) -> View:
    """A view function from a YAML-expressible name or a Python callable (returned as is).

    Names: ``"identity"``; ``"downsample:k"`` (:func:`downsample_view`, integer ``k >= 1``); ``"mask:p"``
    (:func:`mask_view`, ``0 <= p <= 1``); ``"noise:s"`` (:func:`noise_view`, ``s >= 0``).

    Raises:
        ValueError: for an unknown name (the message lists the allowed ones), a missing or out-of-range value.

    >>> make_view("downsample:2")(torch.arange(4.0).reshape(1, 1, 2, 2)).flatten().tolist()
    [1.5, 1.5, 1.5, 1.5]
    >>> make_view("blur:2")
    Traceback (most recent call last):
    ...
    ValueError: Unknown view 'blur:2'; allowed: ['identity', 'downsample:<int >= 1>', 'mask:<fraction in [0, 1]>', \
'noise:<std >= 0>'] or a callable.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"A view must be a name or a callable, got {spec!r}.")
    name, _, value = spec.partition(":")
    allowed = ["identity", "downsample:<int >= 1>", "mask:<fraction in [0, 1]>", "noise:<std >= 0>"]
    if name not in VIEW_NAMES:
        raise ValueError(f"Unknown view {spec!r}; allowed: {allowed} or a callable.")
    if name == "identity":
        if value:
            raise ValueError(f"View 'identity' takes no value, got {spec!r}.")
        return _identity
    if not value:
        raise ValueError(f"View {name!r} needs a value, e.g. {allowed[VIEW_NAMES.index(name)]!r}; got {spec!r}.")
    if name == "downsample":
        factor = _parse_number(spec, value, int)
        if factor < 1:
            raise ValueError(f"View {spec!r}: the factor must be an integer >= 1.")
        return lambda x: downsample_view(x, factor)
    number = _parse_number(spec, value, float)
    if name == "mask":
        if not 0 <= number <= 1:
            raise ValueError(f"View {spec!r}: the masked fraction must lie in [0, 1].")
        return lambda x: mask_view(x, number)
    if number < 0:
        raise ValueError(f"View {spec!r}: the noise std must be non-negative.")
    return lambda x: noise_view(x, number)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ---------------------------------------------------------------------------------------------------- losses


def pool_features(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` maps to ``(B, C)`` by global average pooling; ``(B, C)`` vectors unchanged."""
    return features.flatten(2).mean(dim=2) if features.dim() > 2 else features


def moment_matching_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Unpaired match of the first two moments over the batch (no sample is compared with its counterpart).

    ``mean_d (mu_s - mu_t)^2 + ||C_s - C_t||_F^2 / (4 d^2)`` with ``mu`` the batch means and ``C`` the unbiased
    batch covariances of the ``(B, d)`` pooled features (:func:`pool_features`); the covariance part is the CORAL
    loss (Sun & Saenko 2016, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation"). Invariant to a
    permutation of either batch; the batches may differ in size. Needs ``B >= 2`` on both sides and equal widths.

    >>> moment_matching_loss(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]]))  # means equal; C 2 vs 0
    tensor(1.)
    """
    s, t = pool_features(student_features), pool_features(teacher_features)
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(f"feature statistics need equal widths, got {tuple(s.shape)} and {tuple(t.shape)}.")
    if min(s.shape[0], t.shape[0]) < 2:
        raise ValueError(f"covariances need a batch of at least 2, got {s.shape[0]} and {t.shape[0]}.")
    width = s.shape[1]
    mean_term = (s.mean(0) - t.mean(0)).pow(2).mean()
    cov_term = (torch.cov(s.t()).reshape(width, width) - torch.cov(t.t()).reshape(width, width)).pow(2).sum()
    return mean_term + cov_term / (4 * width**2)


def mmd_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    bandwidths: Sequence[float] = (0.5, 1.0, 2.0),
    relative: bool = True,
) -> torch.Tensor:
    """Squared maximum mean discrepancy (Gretton et al. 2012, "A Kernel Two-Sample Test"), biased estimate.

    ``MMD^2 = mean k(s, s') + mean k(t, t') - 2 mean k(s, t)`` over all pairs (diagonals included) of the pooled
    features, with the Gaussian kernel mixture ``k(x, y) = sum_sigma exp(-||x - y||^2 / (2 sigma^2 m))``;
    ``m`` is the mean squared distance over all pairs of the joint batch (detached: the median-like heuristic that
    keeps the kernel scale-free) when ``relative``, else 1. Invariant to permutations; batch sizes may differ.

    >>> mmd_loss(torch.zeros(1, 1), torch.ones(1, 1), bandwidths=[1.0], relative=False)  # 1 + 1 - 2 exp(-1/2)
    tensor(0.7869)
    """
    s, t = pool_features(student_features), pool_features(teacher_features)
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(f"MMD needs features of equal widths, got {tuple(s.shape)} and {tuple(t.shape)}.")
    if not bandwidths or any(b <= 0 for b in bandwidths):
        raise ValueError(f"bandwidths must be positive numbers, got {list(bandwidths)!r}.")
    joint = torch.cat([s, t])
    squared = torch.cdist(joint, joint).pow(2)
    scale = squared.detach().mean().clamp_min(1e-12) if relative else 1.0
    kernel = torch.stack([torch.exp(-squared / (2 * b**2 * scale)) for b in bandwidths]).sum(dim=0)
    n = s.shape[0]
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def feature_statistics_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, statistic: str = "moments"
) -> torch.Tensor:
    """:func:`moment_matching_loss` (``"moments"``) or :func:`mmd_loss` (``"mmd"``)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
    loss = moment_matching_loss if statistic == "moments" else mmd_loss
    return loss(student_features, teacher_features)


def paired_hint_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, projection: nn.Module | None = None
) -> torch.Tensor:
    """Per-sample supervision transfer (Gupta, Hoffman & Malik 2016, "Cross Modal Distillation for Supervision
    Transfer"): ``1/2 ||r(f_s(x_i^B)) - f_t(x_i^A)||^2`` averaged over the batch, on pooled features
    (:func:`pool_features`), ``r`` a linear projection to the teacher's width (or the identity).

    >>> paired_hint_loss(torch.ones(2, 3, 4, 4), torch.zeros(2, 3))
    tensor(1.5000)
    """
    check_same_batch(student_features, teacher_features)
    return losses.hint_loss(pool_features(student_features), pool_features(teacher_features), projection)
