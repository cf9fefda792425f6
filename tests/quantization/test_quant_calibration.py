"""Calibration methods on small histograms worked by hand, the calibrators, and agreement of the vectorised
searches with a straightforward per-candidate loop (TensorRT / NVIDIA pytorch-quantization conventions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.quantization.calibrators import (
    HistogramCalibrator,
    MaxCalibrator,
    amax_entropy,
    amax_mse,
    amax_percentile,
    compute_amax,
)

# ------------------------------------------------------------------ per-candidate reference loops (NVIDIA semantics)


def loop_kl_divergences(counts, num_bits=8, unsigned=False, start_bin=128, stride=1):
    """KL(P || Q) for each candidate i in range(start_bin, nbins + 1, stride), one candidate at a time."""
    bins = np.array(counts, dtype=np.int64).copy()
    bins[0] = bins[1]
    levels = 1 << (num_bits - 1 + int(unsigned))
    divergences = []
    for i in range(start_bin, len(bins) + 1, stride):
        level = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)) - 1
        full = bins[:i] > 0
        mass = np.bincount(level[full], weights=bins[:i][full], minlength=levels)
        members = np.bincount(level[full], minlength=levels)
        q = np.zeros(i)
        q[full] = mass[level[full]] / members[level[full]]
        p = bins[:i].astype(np.float64)
        p[-1] += bins[i:].sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            p, q = p / p.sum(), q / q.sum()
            kl = np.where(p > 0, p * np.log(p / q), 0.0).sum()
        # the reference gets NaN when every kept bin is empty (0 / 0) and np.argmin then PICKS it; we use inf
        divergences.append(np.inf if np.isnan(kl) else kl)
    return np.array(divergences)


def loop_entropy(counts, width, num_bits=8, unsigned=False, start_bin=128, stride=1):
    divergences = loop_kl_divergences(counts, num_bits, unsigned, start_bin, stride)
    last = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return (start_bin + last * stride) * width


def loop_mse_errors(counts, num_bits=8, unsigned=False, start_bin=128, stride=1):
    """Histogram-weighted squared error for each candidate centre i in range(start_bin, nbins, stride)."""
    counts = np.asarray(counts, dtype=np.float64)
    centres = np.arange(len(counts)) + 0.5
    qmax = (1 << (num_bits - (0 if unsigned else 1))) - 1
    errors = []
    for i in range(start_bin, len(counts), stride):
        scale = centres[i] / qmax
        errors.append(((np.clip(np.round(centres / scale), 0, qmax) * scale - centres) ** 2 * counts).sum())
    return np.array(errors)


def loop_mse(counts, width, num_bits=8, unsigned=False, start_bin=128, stride=1):
    errors = loop_mse_errors(counts, num_bits, unsigned, start_bin, stride)
    return (start_bin + int(np.argmin(errors)) * stride + 0.5) * width


def _histogram(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, float]:
    cal = HistogramCalibrator(bins)
    cal.collect(x)
    return cal.counts, cal.bin_width


# --------------------------------------------------------------------------------------------- by hand


def test_percentile_left_edge_of_crossing_bin():
    counts = torch.tensor([5, 3, 1, 1])  # CDF 0.5, 0.8, 0.9, 1.0
    assert float(amax_percentile(counts, 0.5, 90.0)) == 1.0  # crosses in bin 2 -> left edge 2 * 0.5
    assert float(amax_percentile(counts, 0.5, 85.0)) == 1.0
    assert float(amax_percentile(counts, 0.5, 95.0)) == 1.5
    assert float(amax_percentile(counts, 0.5, 100.0)) == 1.5  # left edge of the last bin, as the reference
    assert float(amax_percentile(counts, 0.5, 10.0)) == 0.0


def test_mse_by_hand_2_and_3_bits():
    counts = torch.tensor([0, 6, 0, 0, 0, 0, 0, 1])  # six values at centre 1.5, one at 7.5
    # 3 bits (levels 0, a/3, 2a/3, a): errors for a = 1.5 .. 7.5: 36, 25.17, 16.67, 9, 4.67, 3.67, 6 -> 6.5
    assert float(amax_mse(counts, 1.0, num_bits=3, start_bin=1)) == 6.5
    # 2 bits (levels 0, a): 36, 31, 29.5, 22.5, 17.5, 14.5, 13.5 -> 7.5
    assert float(amax_mse(counts, 1.0, num_bits=2, start_bin=1)) == 7.5
    # start_bin skips small candidates, bin width scales the answer
    assert float(amax_mse(counts, 0.25, num_bits=3, start_bin=6)) == 6.5 * 0.25
    # candidates stop before the last bin (range(start_bin, nbins)), stride 2: 1.5, 3.5, 5.5 -> 5.5 (4.67)
    assert float(amax_mse(counts, 1.0, num_bits=3, start_bin=1, stride=2)) == 5.5


def test_entropy_by_hand():
    # bins[0] = bins[1] -> [4, 4, 3, 2, 1, 0, 0, 1]; 2 bits signed -> 2 levels. KL for i = 2..8:
    # 0.1132, 0.0852, 0.0187, 0.0140, inf (empty last bin, outliers left), inf, 0.0300 -> i* = 5
    counts = torch.tensor([9, 4, 3, 2, 1, 0, 0, 1])
    assert float(amax_entropy(counts, 1.0, num_bits=2, start_bin=2)) == 5.0
    assert float(amax_entropy(counts, 0.5, num_bits=2, start_bin=2)) == 2.5  # right edge of the last kept bin
    assert loop_entropy(counts.numpy(), 1.0, num_bits=2, start_bin=2) == 5.0


def test_entropy_takes_last_of_equal_minima_and_first_bin_copy():
    # i = 4, 5, 6 all give Q == P (KL 0): the LAST one wins; bins[0] is replaced by bins[1]
    for counts in ([2, 2, 2, 2, 0, 0], [100, 2, 2, 2, 0, 0]):
        assert float(amax_entropy(torch.tensor(counts), 1.0, num_bits=2, start_bin=2)) == 6.0
        assert loop_entropy(counts, 1.0, num_bits=2, start_bin=2) == 6.0


def test_entropy_levels_unsigned_use_2_pow_b():
    # NVIDIA: 1 << (num_bits - 1 + unsigned): unsigned b bits merge into as many levels as signed b + 1 bits
    g = torch.Generator().manual_seed(3)
    differs = 0
    for _ in range(3):
        counts, width = _histogram(torch.randn(5000, generator=g), 512)
        unsigned2 = amax_entropy(counts, width, num_bits=2, unsigned=True, start_bin=64)
        assert unsigned2 == amax_entropy(counts, width, num_bits=3, unsigned=False, start_bin=64)
        assert float(unsigned2) == pytest.approx(loop_entropy(counts.numpy(), width, 2, True, 64))
        differs += int(unsigned2 != amax_entropy(counts, width, num_bits=2, unsigned=False, start_bin=64))
    assert differs == 3


@pytest.mark.parametrize("search", [amax_mse, amax_entropy])
def test_searches_are_invariant_to_huge_counts(search):
    counts, width = _histogram(torch.randn(5000, generator=torch.Generator().manual_seed(1)), 512)
    base = search(counts, width, num_bits=8)
    assert search(counts * (1 << 36), width, num_bits=8) == base


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("num_bits", "unsigned", "start_bin", "stride"),
    [(8, False, 128, 1), (4, False, 16, 1), (8, True, 128, 3), (6, True, 32, 1), (12, False, 128, 5)],
)
def test_vectorised_searches_equal_per_candidate_loop(seed, num_bits, unsigned, start_bin, stride):
    g = torch.Generator().manual_seed(seed)
    x = [
        torch.randn(4000, generator=g),
        torch.empty(4000).exponential_(generator=g) * torch.randn(4000, generator=g).sign(),  # Laplace
        torch.rand(4000, generator=g) ** 3,
        torch.cat([torch.randn(4000, generator=g), torch.tensor([25.0])]),
        torch.randint(0, 7, (4000,), generator=g).float(),  # many empty bins
        torch.relu(torch.randn(4000, generator=g)),
    ][seed]
    counts, width = _histogram(x, [256, 400, 512][seed % 3])
    kw = {"num_bits": num_bits, "unsigned": unsigned, "start_bin": start_bin, "stride": stride}
    assert float(amax_entropy(counts, width, **kw)) == pytest.approx(loop_entropy(counts.numpy(), width, **kw))
    assert float(amax_mse(counts, width, **kw)) == pytest.approx(loop_mse(counts.numpy(), width, **kw))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    counts=st.lists(st.integers(0, 50), min_size=4, max_size=40),
    num_bits=st.integers(2, 4),
    unsigned=st.booleans(),
    data=st.data(),
)
def test_searches_pick_the_loop_minimum_on_arbitrary_small_histograms(counts, num_bits, unsigned, data):
    # small integer histograms are full of exactly tied candidates: the chosen one must be a minimum of the loop's
    # values, and no candidate on the wrong side (later for KL's last minimum, earlier for MSE's first) may be
    # clearly better or equal
    n = len(counts)
    start_bin = data.draw(st.integers(1, n - 1))
    stride = data.draw(st.integers(1, 3))
    kw = {"num_bits": num_bits, "unsigned": unsigned, "start_bin": start_bin, "stride": stride}
    t = torch.tensor(counts)
    kl = loop_kl_divergences(counts, **kw)
    if np.isfinite(kl).any():
        pick = (int(amax_entropy(t, 1.0, **kw)) - start_bin) // stride
        best = kl.min()
        assert kl[pick] <= best + 1e-9 * abs(best) + 1e-12
        assert np.all(kl[pick + 1 :] > best + 1e-12)
    if sum(counts):
        err = loop_mse_errors(counts, **kw)
        pick = round((float(amax_mse(t, 1.0, **kw)) - 0.5 - start_bin) / stride)
        best, scale = err.min(), float(np.sum(np.asarray(counts) * (np.arange(n) + 0.5) ** 2))
        assert err[pick] <= best + 1e-12 * scale
        assert np.all(err[:pick] > best + 1e-12 * scale)


# ------------------------------------------------------------------------------------------ histogram


def test_histogram_first_range_and_growth_at_constant_width():
    cal = HistogramCalibrator(num_bins=4)
    cal.collect(torch.tensor([0.1, -0.6, 1.0, 2.0]))  # [0, 2] in 4 bins of 0.5; 2.0 in the last bin
    assert cal.counts.tolist() == [1, 1, 1, 1] and cal.bin_width == 0.5
    cal.collect(torch.tensor([2.9, -0.2]))  # 2.9 -> ceil(2.9 / 0.5) = 6 bins, same width
    assert cal.counts.tolist() == [2, 1, 1, 1, 0, 1] and cal.range_max == 3.0
    cal.collect(torch.tensor([1.2]))  # no growth
    assert cal.counts.tolist() == [2, 1, 2, 1, 0, 1] and cal.counts.dtype == torch.int64
    assert cal.max == pytest.approx(2.9)


def test_histogram_same_max_again_adds_no_bin_and_matches_histc():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 0.37
    cal = HistogramCalibrator()
    cal.collect(x)
    assert torch.equal(cal.counts, torch.histc(x.abs(), bins=2048, min=0, max=float(x.abs().max())).long())
    cal.collect(x)
    assert cal.counts.numel() == 2048 and int(cal.counts.sum()) == 20000


def test_histogram_counts_beyond_2_pow_24_are_exact():
    batch = torch.full(((1 << 22) + 1,), 0.25)
    batch[0] = 1.0
    cal = HistogramCalibrator(num_bins=4)
    for _ in range(5):
        cal.collect(batch)
    assert int(cal.counts[1]) == 5 * (1 << 22)  # 20971520 > 2^24
    assert cal.counts.tolist() == [0, 20971520, 0, 5]
    cal.collect(torch.tensor([0.3]))
    assert int(cal.counts[1]) == 20971521  # not representable in float32
    assert float(torch.tensor(20971521.0)) != 20971521  # which a float32 histogram would have lost


def test_calibrator_state_size_constant_over_passes():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 16, generator=g) for _ in range(4)]

    def state_bytes(passes: int) -> int:
        cal = HistogramCalibrator()
        for _ in range(passes):
            for b in batches:
                cal.collect(b)
        state = cal.state_dict()
        return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))

    assert state_bytes(10) == state_bytes(100) == 2048 * 8


def test_histogram_state_dict_round_trip_and_reset():
    cal = HistogramCalibrator(num_bins=256)
    cal.collect(torch.randn(1000, generator=torch.Generator().manual_seed(2)))
    restored = HistogramCalibrator(num_bins=8)
    restored.load_state_dict(cal.state_dict())
    for method in ("percentile", "mse", "entropy", "max"):
        assert restored.compute_amax(method, start_bin=32) == cal.compute_amax(method, start_bin=32)
    cal.reset()
    with pytest.raises(RuntimeError, match="no data"):
        cal.compute_amax("mse")


def test_distributed_protocol_equals_one_process():
    # two ranks: all-reduce each batch max as range_max, then sum counts == one process on the global batches
    g = torch.Generator().manual_seed(4)
    rank_batches = [[torch.randn(50, generator=g) * s for s in (1.0, 3.0, 2.0)] for _ in range(2)]
    ranks = [HistogramCalibrator(num_bins=128) for _ in range(2)]
    single = HistogramCalibrator(num_bins=128)
    for step in range(3):
        shared_max = max(float(rank_batches[r][step].abs().max()) for r in range(2))
        for r in range(2):
            ranks[r].collect(rank_batches[r][step], range_max=shared_max)
        single.collect(torch.cat([rank_batches[0][step], rank_batches[1][step]]))
    merged = ranks[0].merge_(ranks[1])
    assert torch.equal(merged.counts, single.counts) and merged.max == single.max
    for method in ("percentile", "mse", "entropy"):
        assert merged.compute_amax(method, start_bin=16) == single.compute_amax(method, start_bin=16)


def test_merge_of_different_widths_raises():
    a, b = HistogramCalibrator(num_bins=4), HistogramCalibrator(num_bins=4)
    a.collect(torch.tensor([1.0]))
    b.collect(torch.tensor([2.0]))
    with pytest.raises(ValueError, match=r"bin widths 0\.25 and 0\.5"):
        a.merge_(b)


def test_all_zero_data_gives_zero_amax_and_zeros_stay_in_bin_0():
    cal = HistogramCalibrator(num_bins=4)
    cal.collect(torch.zeros(10))
    for method in ("percentile", "mse", "entropy", "max"):
        assert float(cal.compute_amax(method)) == 0.0
    cal.collect(torch.tensor([0.0, 4.0]))
    assert cal.counts.tolist() == [11, 0, 0, 1] and cal.bin_width == 1.0
    for method in ("max", "percentile", "mse", "entropy"):
        assert float(compute_amax(torch.zeros(5), method)) == 0.0


# ------------------------------------------------------------------------------------------------ max


def test_max_calibrator_per_tensor_and_per_channel():
    cal = MaxCalibrator()
    cal.collect(torch.tensor([1.0, -3.0]))
    cal.collect(torch.tensor([2.0]))
    assert float(cal.compute_amax()) == 3.0
    per_channel = MaxCalibrator(axis=1)
    per_channel.collect(torch.tensor([[1.0, -5.0, 0.0], [-2.0, 1.0, 0.5]]))
    per_channel.collect(torch.tensor([[0.0, 0.0, 7.0]]))
    assert per_channel.compute_amax().tolist() == [2.0, 5.0, 7.0]
    other = MaxCalibrator(axis=1)
    other.collect(torch.tensor([[9.0, 0.0, 0.0]]))
    restored = MaxCalibrator(axis=1)
    restored.load_state_dict(per_channel.merge_(other).state_dict())
    assert restored.compute_amax().tolist() == [9.0, 5.0, 7.0]


# ------------------------------------------------------------------------------------------ one shot


def test_compute_amax_methods_on_one_tensor():
    x = torch.linspace(-1, 1, 201)
    assert float(compute_amax(x, "max")) == 1.0
    assert float(compute_amax(x, "percentile", num_bins=100, percentile=90.0)) == pytest.approx(0.9)
    assert torch.equal(compute_amax(x, "kl", start_bin=16), compute_amax(x, "entropy", start_bin=16))
    counts, width = _histogram(x, 2048)
    assert float(compute_amax(x, "mse")) == pytest.approx(loop_mse(counts.numpy(), width))
    w = torch.tensor([[0.5, -1.0], [2.0, 0.1]])
    assert compute_amax(w, "max", axis=0).tolist() == [1.0, 2.0]
    assert compute_amax(w, "max", axis=1).tolist() == [2.0, 1.0]
    per_channel = compute_amax(torch.randn(3, 500, generator=torch.Generator().manual_seed(0)), "mse", axis=0)
    assert per_channel.shape == (3,) and (per_channel > 0).all()


# ---------------------------------------------------------------------------------------- validation


def test_unknown_method_lists_allowed():
    with pytest.raises(ValueError, match=r"'minmax'.*'max', 'percentile', 'mse', 'entropy', 'kl'"):
        compute_amax(torch.ones(3), "minmax")


@pytest.mark.parametrize("percentile", [0, -1.0, 100.5, math.nan])
def test_percentile_outside_range(percentile):
    with pytest.raises(ValueError, match=rf"percentile={percentile!r} must be in \(0, 100\]"):
        compute_amax(torch.ones(3), "percentile", percentile=percentile)


@pytest.mark.parametrize("bits", [1, 17])
def test_bits_outside_range(bits):
    with pytest.raises(ValueError, match=f"num_bits={bits}"):
        compute_amax(torch.ones(3), "entropy", num_bits=bits)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_name_the_layer(bad):
    x = torch.tensor([1.0, bad])
    with pytest.raises(ValueError, match=r"layer 'features\.0'.*cannot calibrate"):
        compute_amax(x, "max", name="features.0")
    with pytest.raises(ValueError, match="layer 'fc'"):
        HistogramCalibrator(name="fc").collect(x)
    with pytest.raises(ValueError, match="calibration data contains"):
        MaxCalibrator().collect(x)


def test_unsigned_with_negative_data_quotes_min():
    with pytest.raises(ValueError, match=r"unsigned=True but layer 'relu1' has negative values \(min=-0.5\)"):
        compute_amax(torch.tensor([1.0, -0.5]), "mse", unsigned=True, name="relu1")
    with pytest.raises(ValueError, match="negative values"):
        MaxCalibrator(unsigned=True).collect(torch.tensor([-1.0]))


def test_start_bin_past_the_histogram():
    with pytest.raises(ValueError, match="start_bin=300"):
        compute_amax(torch.randn(100), "entropy", num_bins=256, start_bin=300)
    with pytest.raises(ValueError, match="stride=0"):
        amax_mse(torch.ones(8), 1.0, start_bin=1, stride=0)
    with pytest.raises(ValueError, match="num_bins=1"):
        HistogramCalibrator(num_bins=1)


def test_searches_accept_fractional_counts_and_reject_negative():
    # float histograms (e.g. a reference's float32 histc loaded from elsewhere) work; scaling does not matter
    counts = torch.tensor([9, 4, 3, 2, 1, 0, 0, 1])
    assert float(amax_entropy(counts * 0.01, 1.0, num_bits=2, start_bin=2)) == 5.0
    assert float(amax_mse(torch.tensor([0, 6, 0, 0, 0, 0, 0, 1]) * 0.1, 1.0, num_bits=3, start_bin=1)) == 6.5
    with pytest.raises(ValueError, match="non-negative"):
        amax_entropy(torch.tensor([1, -1, 2, 3]), 1.0, start_bin=1)


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_same_amax_as_an_independent_numpy_histogram_pipeline(method):
    # what a user of NVIDIA's calibrator (numpy path) computes: np.histogram over [0, max|x|], 2048 bins
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200_000, generator=g) * torch.rand(200_000, generator=g)
    a = x.abs().numpy()
    hist, edges = np.histogram(a, bins=2048, range=(0, a.max()))
    width = edges[1] - edges[0]
    if method == "percentile":
        expected = edges[np.searchsorted(np.cumsum(hist / hist.sum()), 0.9999)]
    elif method == "mse":
        expected = loop_mse(hist, width)
    else:
        expected = loop_entropy(hist, width)
    assert float(compute_amax(x, method)) == pytest.approx(expected, rel=0.005)
