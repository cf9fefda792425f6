"""Choosing the clipping threshold ``amax`` from a histogram of ``|x|``: percentile, MSE and entropy (KL) searches.

Follows the TensorRT / NVIDIA pytorch-quantization (and modelopt) histogram conventions, so a user moving from
them gets the same ``amax`` for the same data and settings (``REFERENCES.md`` section 3):

* the histogram is of ``|x|``, ``num_bins`` bins over ``[0, max of the first batch]``; a later batch with a larger
  max adds bins of the same width (counts are int64, never float32 that saturates at 2^24);
* ``percentile``: the LEFT edge of the bin in which the CDF reaches ``percentile / 100``;
* ``mse``: each bin centre from ``start_bin`` on (every ``stride``-th) is tried as amax; the one minimising
  ``sum_k count_k (fake_quantize(centre_k) - centre_k)^2`` wins, the FIRST of equal minima;
* ``entropy`` (``kl``): TensorRT's KL search: ``bins[0] = bins[1]``; for ``i`` kept bins, P is the histogram with
  all outliers added to its last bin, Q the kept bins merged into ``2^(b-1)`` levels (``2^b`` when unsigned, as
  NVIDIA's code) where empty bins stay empty and non-empty ones share their level's mass equally; the LAST
  minimum of KL(P || Q) wins and ``amax`` is the right edge of the last kept bin.

The MSE and KL searches are vectorised over the candidates with prefix sums (no Python loop over thresholds);
they agree with the reference per-candidate loop to the bin (``benchmarks/calibration_speed.py``). Minima are
taken with a tolerance (``1e-9`` relative, plus ``1e-12`` nats for KL or ``1e-13`` of the total second moment for
MSE) so that float rounding does not decide between mathematically equal candidates. One deliberate deviation:
a candidate whose kept bins are all empty (possible when ``bins[1] == 0``) has an infinite divergence here, where
the reference computes NaN and ``np.argmin`` then selects it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_compress.quantization.functional import qrange, validate_num_bits

__all__ = [
    "METHODS",
    "amax_entropy",
    "amax_mse",
    "amax_percentile",
    "check_finite",
    "validate_method",
    "validate_percentile",
]

METHODS = ("max", "percentile", "mse", "entropy", "kl")
_TIE_RTOL = 1e-9


def validate_method(method: str) -> str:
    """Return the canonical method name (``"kl"`` becomes ``"entropy"``) or raise a ``ValueError``."""
    if method not in METHODS:
        raise ValueError(f"Unknown calibration method {method!r}; allowed: {', '.join(map(repr, METHODS))}")
    return "entropy" if method == "kl" else method


def validate_percentile(percentile: float) -> None:
    """Raise a ``ValueError`` unless ``percentile`` is a number (not a bool) with ``0 < percentile <= 100``."""
    if isinstance(percentile, bool) or not (isinstance(percentile, int | float) and 0 < percentile <= 100):
        raise ValueError(f"percentile={percentile!r} must be in (0, 100] (a number, not a bool)")


def _what(name: str | None) -> str:
    return f"layer {name!r}" if name else "calibration data"


def check_finite(x: Tensor, name: str | None = None) -> None:
    """Raise a ``ValueError`` naming ``name`` (a layer) if ``x`` holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(f"{_what(name)} contains {n_nan} NaN and {n_inf} Inf values; cannot calibrate")


def _check_unsigned(x: Tensor, unsigned: bool, name: str | None) -> None:
    if unsigned and x.numel() and bool((x < 0).any()):
        raise ValueError(
            f"unsigned=True but {_what(name)} has negative values (min={float(x.min()):.6g}); "
            "use unsigned=False or quantize after a ReLU"
        )


# ------------------------------------------------------------------------------------------ searches


def _as_counts(counts: Tensor) -> Tensor:
    if counts.dim() != 1 or counts.numel() < 2:
        raise ValueError(f"counts must be a 1-D histogram of at least 2 bins, got shape {tuple(counts.shape)}")
    c = counts.detach().cpu().to(torch.float64)
    if bool((c < 0).any()):
        raise ValueError(f"counts must be non-negative, got a minimum of {float(c.min())!r}")
    return c


def _candidates(start_bin: int, stop: int, stride: int, n_bins: int) -> Tensor:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride={stride!r} must be a positive integer")
    if isinstance(start_bin, bool) or not isinstance(start_bin, int) or not 0 <= start_bin < stop:
        raise ValueError(f"start_bin={start_bin!r} must be in [0, {stop - 1}] for a histogram of {n_bins} bins")
    return torch.arange(start_bin, stop, stride, dtype=torch.int64)


def _ties(values: Tensor, atol: float) -> Tensor:
    best = values.min()
    return torch.nonzero(values <= best + _TIE_RTOL * best.abs() + atol).flatten()


def amax_percentile(counts: Tensor, bin_width: float, percentile: float = 99.99) -> Tensor:
    """Left edge of the bin where the CDF of the histogram reaches ``percentile`` (TensorRT convention).

    Args:
        counts: 1-D histogram of ``|x|``, bin ``k`` covering ``[k w, (k + 1) w)``.
        bin_width: ``w``.
        percentile: in ``(0, 100]``.

    >>> amax_percentile(torch.tensor([5, 3, 1, 1]), 0.5, 90.0)  # CDF 0.5 0.8 0.9 1.0: bin 2, left edge 1.0
    tensor(1.)
    """
    validate_percentile(percentile)
    c = counts.detach().cpu().to(torch.float64)
    cdf = torch.cumsum(c / c.sum(), dim=0)
    idx = int(torch.searchsorted(cdf, torch.tensor([percentile / 100], dtype=torch.float64))[0])
    return torch.tensor(min(idx, c.numel()) * float(bin_width), dtype=torch.float32)


def amax_mse(
    counts: Tensor,
    bin_width: float,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
) -> Tensor:
    """Bin centre that minimises the histogram-weighted MSE of fake quantization (first minimum).

    Candidates are the centres ``(i + 1/2) w`` for ``i`` in ``range(start_bin, len(counts), stride)``. Each
    candidate's error is a sum over quantization levels of ``N_j (j s)^2 - 2 j s M1_j + M2_j`` with the level's
    count / first / second moments taken from prefix sums (the level boundaries are exact integer arithmetic), so
    the cost is ``candidates x min(levels, bins)`` without a Python loop.

    >>> counts = torch.tensor([0, 6, 0, 0, 0, 0, 0, 1])  # six values at 1.5, one at 7.5
    >>> amax_mse(counts, 1.0, num_bits=3, start_bin=1)  # errors 36, 25.2, 16.7, 9, 4.7, 3.7, 6 for 1.5 ... 7.5
    tensor(6.5000)
    """
    c = _as_counts(counts)
    n = c.numel()
    cand = _candidates(start_bin, n, stride, n)
    _, qmax = qrange(num_bits, unsigned)
    centre2 = torch.arange(1, 2 * n, 2, dtype=torch.float64)  # centres in units of w / 2: 2k + 1
    amax2 = (2 * cand + 1).to(torch.float64)  # candidate amax in the same units
    err = _mse_direct(c, centre2, amax2, qmax) if qmax + 1 >= n else _mse_by_levels(c, centre2, cand, qmax)
    i = int(_ties(err, 1e-13 * float((c * centre2 * centre2).sum()))[0])  # first minimum
    return torch.tensor((float(cand[i]) + 0.5) * float(bin_width), dtype=torch.float32)


def _mse_by_levels(c: Tensor, centre2: Tensor, cand: Tensor, qmax: int) -> Tensor:
    # err_i = sum_j [N_j (j s)^2 - 2 j s M1_j + M2_j] over levels j = 0..qmax with N, M1, M2 prefix-sum differences
    # between the first bins B_j of consecutive levels; summation by parts leaves one gather per prefix sum:
    # sum_j j^2 N_j = qmax^2 N - sum_{j>=1} (2j - 1) P0[B_j],  sum_j j M1_j = qmax M1 - sum_{j>=1} P1[B_j].
    zero = torch.zeros(1, dtype=torch.float64)
    p0 = torch.cat([zero, torch.cumsum(c, 0)])
    p1 = torch.cat([zero, torch.cumsum(c * centre2, 0)])
    m2 = float((c * centre2 * centre2).sum())
    odd_j = torch.arange(1, 2 * qmax, 2, dtype=torch.float64)  # 2j - 1 for j = 1..qmax
    # B_j = first k with 2 (2k + 1) qmax > (2j - 1)(2i + 1) (never equal: even vs odd) = floor(((2j - 1)(2i + 1)
    # + 2 qmax) / (4 qmax)); exact in float64 (the quotient is never within rounding of an integer from below)
    odd_i = (2 * cand + 1).to(torch.float64)
    first = torch.outer(odd_i, odd_j).add_(2 * qmax).div_(4 * qmax).long().clamp_(max=c.numel())
    rows = (cand.numel(), c.numel() + 1)
    g0, g1 = p0.expand(rows).gather(1, first), p1.expand(rows).gather(1, first)
    s = odd_i / qmax
    n_tot, m1_tot = float(p0[-1]), float(p1[-1])
    return s * s * (qmax * qmax * n_tot - g0 @ odd_j) - 2 * s * (qmax * m1_tot - g1.sum(dim=1)) + m2


def _mse_direct(c: Tensor, centre2: Tensor, amax2: Tensor, qmax: int, chunk_elems: int = 1 << 21) -> Tensor:
    out = []
    rows = max(1, chunk_elems // centre2.numel())
    for start in range(0, amax2.numel(), rows):  # chunks bound memory; every candidate in a chunk at once
        scale = (amax2[start : start + rows] / qmax)[:, None]
        q = torch.round(centre2[None, :] / scale).clamp(0, qmax) * scale
        out.append(((q - centre2[None, :]) ** 2 * c[None, :]).sum(dim=1))
    return torch.cat(out)


def amax_entropy(
    counts: Tensor,
    bin_width: float,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
) -> Tensor:
    """TensorRT's KL-divergence threshold (last minimum), vectorised over the candidates.

    ``bins[0] = bins[1]``; for each ``i`` in ``range(start_bin, len(counts) + 1, stride)`` P is ``bins[:i]`` with
    the outliers added to bin ``i - 1`` and Q is ``bins[:i]`` merged into ``2^(b - 1 + unsigned)`` levels (bin
    ``k`` to level ``floor(k L / i)``), empty bins staying empty. KL(P || Q) splits into per-bin terms (prefix sums
    of ``b log b``) and per-level terms (prefix sums of counts and non-empty bins), plus a correction for bin
    ``i - 1``, so the search costs ``candidates x levels``. A candidate whose last kept bin is empty while outliers
    remain has infinite divergence (as in the reference). Returns ``i* w``, the right edge of the last kept bin.

    >>> counts = torch.tensor([9, 4, 3, 2, 1, 0, 0, 1])
    >>> amax_entropy(counts, 1.0, num_bits=2, start_bin=2)  # 2 levels; keeping 5 bins wins
    tensor(5.)
    """
    b = _as_counts(counts).clone()
    b[0] = b[1]
    n = b.numel()
    cand = _candidates(start_bin, n + 1, stride, n)
    cand = cand[cand >= 1]
    validate_num_bits(num_bits)
    levels = 1 << (num_bits - 1 + int(unsigned))
    zero = torch.zeros(1, dtype=torch.float64)
    total = float(b.sum())
    if total == 0:
        return torch.tensor(float(cand[-1]) * float(bin_width), dtype=torch.float32)
    blogb = torch.special.xlogy(b, b)
    csum = torch.cat([zero, torch.cumsum(b, 0)])
    nonempty = torch.cat([zero, torch.cumsum((b > 0).to(torch.float64), 0)])
    a_sum = torch.cat([zero, torch.cumsum(blogb, 0)])

    j = torch.arange(levels + 1, dtype=torch.float64)
    # level j holds bins [ceil(j i / L), ceil((j + 1) i / L)); ceil(m / L) = trunc((m + L - 1) / L), exact in float64
    bounds = torch.outer(cand.to(torch.float64), j).add_(levels - 1).div_(levels).long()
    rows = (cand.numel(), n + 1)
    at_c, at_z = csum.expand(rows).gather(1, bounds), nonempty.expand(rows).gather(1, bounds)
    s_lvl, c_lvl = at_c[:, 1:] - at_c[:, :-1], at_z[:, 1:] - at_z[:, :-1]
    # s = 0 exactly when c = 0; the clamps only turn 0 log 0 into 0
    lvl_term = s_lvl * torch.log((s_lvl / c_lvl.clamp_min(1)).clamp_min(1e-300))

    kept = csum[cand]  # C_i
    log_kept = torch.log(kept.clamp_min(1e-300))
    regular = (a_sum[cand] - kept * math.log(total) - lvl_term.sum(dim=1) + kept * log_kept) / total

    last = cand - 1
    b_last = b[last]
    lvl_last = torch.div(last * levels, cand, rounding_mode="floor")
    r = torch.arange(cand.numel())
    q_last = s_lvl[r, lvl_last] / c_lvl[r, lvl_last].clamp_min(1) / kept.clamp_min(1e-300)
    p_old = b_last / total
    p_new = (b_last + (total - kept)) / total
    safe_q = q_last.clamp_min(1e-300)
    corr = p_new * torch.log(p_new.clamp_min(1e-300) / safe_q) - p_old * torch.log(p_old.clamp_min(1e-300) / safe_q)
    kl = regular + torch.where(b_last > 0, corr, torch.zeros_like(corr))
    impossible = ((b_last == 0) & (total - kept > 0)) | (kept == 0)
    kl = torch.where(impossible, torch.full_like(kl, math.inf), kl)
    if bool(torch.isinf(kl).all()):
        return torch.tensor(float(cand[-1]) * float(bin_width), dtype=torch.float32)
    i = int(_ties(kl, 1e-12)[-1])  # last minimum
    return torch.tensor(float(cand[i]) * float(bin_width), dtype=torch.float32)
