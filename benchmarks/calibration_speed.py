"""Speed of the vectorised MSE / entropy (KL) amax searches against straightforward per-candidate loops.

Same histogram (2048 bins of |x|) for every row; prints a Markdown table with the time per search, the speed-up
and the amax of both, which must be the same bin. Two loops: torch ops per candidate (as the NVIDIA reference
computes MSE) and NumPy per candidate (bincount inside each candidate, a stronger baseline than the reference's
pure-Python KL loop, which runs 1.2-2.7 s). One thread, so the numbers do not depend on the machine's load of
other processes' threads as much.

    python benchmarks/calibration_speed.py [--repeats 20] [--bins 2048]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from lightning_compress.quantization.calibrators import HistogramCalibrator, amax_entropy, amax_mse


def loop_mse_torch(counts: torch.Tensor, width: float, num_bits: int = 8, start_bin: int = 128) -> float:
    c = counts.double()
    centres = (torch.arange(c.numel(), dtype=torch.float64) + 0.5) * width
    qmax = (1 << (num_bits - 1)) - 1
    errors = []
    for i in range(start_bin, c.numel()):
        scale = centres[i] / qmax
        q = torch.clamp(torch.round(centres / scale), 0, qmax) * scale
        errors.append(float(((q - centres) ** 2 * c).sum()))
    return float(centres[start_bin + int(np.argmin(errors))])


def loop_entropy_torch(counts: torch.Tensor, width: float, num_bits: int = 8, start_bin: int = 128) -> float:
    bins = counts.double().clone()
    bins[0] = bins[1]
    levels = 1 << (num_bits - 1)
    divergences = []
    for i in range(start_bin, bins.numel() + 1):
        kept = bins[:i]
        level = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        full = kept > 0
        mass = torch.bincount(level[full], weights=kept[full], minlength=levels)
        members = torch.bincount(level[full], minlength=levels).double()
        q = torch.where(full, mass[level] / members[level].clamp_min(1), torch.zeros_like(kept))
        p = kept.clone()
        p[-1] += bins[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        terms = torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))
        divergences.append(float(terms.sum()))
    d = np.nan_to_num(np.array(divergences), nan=np.inf)
    return (start_bin + len(d) - 1 - int(np.argmin(d[::-1]))) * width


def loop_mse_numpy(counts: torch.Tensor, width: float, num_bits: int = 8, start_bin: int = 128) -> float:
    c = counts.numpy().astype(np.float64)
    centres = (np.arange(len(c)) + 0.5) * width
    qmax = (1 << (num_bits - 1)) - 1
    errors = []
    for i in range(start_bin, len(c)):
        scale = centres[i] / qmax
        errors.append(((np.clip(np.round(centres / scale), 0, qmax) * scale - centres) ** 2 * c).sum())
    return float(centres[start_bin + int(np.argmin(errors))])


def loop_entropy_numpy(counts: torch.Tensor, width: float, num_bits: int = 8, start_bin: int = 128) -> float:
    bins = counts.numpy().astype(np.int64).copy()
    bins[0] = bins[1]
    levels = 1 << (num_bits - 1)
    divergences = []
    for i in range(start_bin, len(bins) + 1):
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
        divergences.append(np.inf if np.isnan(kl) else kl)
    d = np.array(divergences)
    return (start_bin + len(d) - 1 - int(np.argmin(d[::-1]))) * width


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of the vectorised search (median)")
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed runs of each loop (median)")
    parser.add_argument("--bins", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = {
        "gaussian": torch.randn(1_000_000, generator=g),
        "relu-laplace": torch.relu(
            torch.empty(1_000_000).exponential_(generator=g) * torch.randn(1_000_000, generator=g).sign()
        ),
    }
    searches = {
        "mse": (amax_mse, loop_mse_torch, loop_mse_numpy),
        "entropy": (amax_entropy, loop_entropy_torch, loop_entropy_numpy),
    }
    print(f"torch {torch.__version__}, 1 thread, {args.bins} bins, int8 signed, start_bin 128, stride 1\n")
    columns = ["method", "data", "vectorised ms", "loop torch ms", "speed-up", "loop numpy ms", "speed-up"]
    print("| " + " | ".join([*columns, "amax vectorised", "amax loops (torch / numpy)"]) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, x in data.items():
        cal = HistogramCalibrator(args.bins)
        cal.collect(x)
        counts, width = cal.counts, cal.bin_width
        for method, (fast, slow_torch, slow_numpy) in searches.items():
            t_fast, a_fast = _time(partial(fast, counts, width), args.repeats)
            t_torch, a_torch = _time(partial(slow_torch, counts, width), args.loop_repeats)
            t_numpy, a_numpy = _time(partial(slow_numpy, counts, width), args.loop_repeats)
            a_fast = float(a_fast)  # type: ignore[arg-type]
            loops = f"{a_torch:.5f} / {a_numpy:.5f}"
            print(
                f"| {method} | {name} | {t_fast * 1e3:.2f} | {t_torch * 1e3:.1f} | {t_torch / t_fast:.0f}x "
                f"| {t_numpy * 1e3:.1f} | {t_numpy / t_fast:.0f}x | {a_fast:.5f} | {loops} |"
            )


if __name__ == "__main__":
    main()
