"""Speed of Feature Boosting and Suppression's sparse execution against dense convolution and static pruning.

    python benchmarks/dynamic_pruning.py            # a few minutes on 2 shared cores
    python benchmarks/dynamic_pruning.py --quick    # fewer repetitions

Table 1, one gated layer (3x3 conv + BatchNorm, keep ratio 0.5, the previous layer also gated at 0.5 so half the
input channels are skipped): dense convolution + BatchNorm, dense masked computation (what training runs), and
sparse execution (per-sample loop, and one grouped convolution).
Table 2, whole networks with every FBS gate in sparse execution at each keep ratio, next to static filter pruning
(compacted) at the same multiply-adds. Multiply-adds per input are counted; latency is the median, 1 thread,
measured round-robin so machine drift affects every entry alike. Accuracy is in examples/dynamic_prune_digits.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, machine, markdown_table

from lightning_compress.demo import PlainCNN, ResidualCNN
from lightning_compress.graph.layers import select_layers
from lightning_compress.measure import count_macs
from lightning_compress.pruning import compact
from lightning_compress.pruning.dynamic import (
    FeatureBoostingGates,
    _folded_affine,
    keep_count,
    sparse_gated_conv,
    winner_take_all,
)
from lightning_compress.pruning.groups import prune_filter_groups


def layer_functions(channels: int, size: int, batch: int) -> tuple[dict[str, Callable[[], object]], float]:
    """The four executions of one gated layer at keep ratio 0.5, and their multiply-adds as a fraction of dense."""
    conv, norm = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval(), nn.BatchNorm2d(channels).eval()
    scale, shift = _folded_affine(conv, norm)
    k = keep_count(0.5, channels)
    generator = torch.Generator().manual_seed(0)
    in_index = torch.rand(batch, channels, generator=generator).topk(k, dim=1).indices  # the previous gate's
    kept_inputs = torch.zeros(batch, channels).scatter_(1, in_index, 1.0).view(batch, channels, 1, 1)
    x = torch.randn(batch, channels, size, size, generator=generator) * kept_inputs
    saliency = torch.rand(batch, channels, generator=generator)
    gate, index = winner_take_all(saliency, k)
    values = saliency.gather(1, index)
    functions: dict[str, Callable[[], object]] = {
        "dense": lambda: norm(conv(x)),
        "dense x mask": lambda: norm(conv(x)) * gate.view(batch, channels, 1, 1),
        "sparse (loop)": lambda: sparse_gated_conv(conv, x, index, values, scale, shift, in_index),
        "sparse (grouped)": lambda: sparse_gated_conv(conv, x, index, values, scale, shift, in_index, True),
    }
    return functions, k * k / channels**2


def layer_rows(repeats: int) -> list[tuple]:
    rows = []
    for channels, size in ((128, 8), (256, 8), (256, 16)):
        for batch in (1, 64):
            functions, macs = layer_functions(channels, size, batch)
            with torch.inference_mode():
                times = interleaved_medians(functions, repeats)
            rows.append((f"{channels}->{channels}, {size}x{size}", batch, f"{macs:.3f}",
                         *(f"{times[n] * 1e3:.2f}" for n in functions),
                         f"{times['dense'] / times['sparse (loop)']:.2f}x"))
    return rows


MODELS: dict[str, tuple[Callable[[], nn.Module], str | None, int]] = {
    "PlainCNN(width=64), 8x8": (lambda: PlainCNN(width=64), None, 8),
    "PlainCNN(width=64), 32x32": (lambda: PlainCNN(width=64, image_size=32), None, 32),
    "ResidualCNN(width=16), 8x8": (lambda: ResidualCNN(width=16), r".*\.conv[12]", 8),
}


def static_model(make: Callable[[], nn.Module], target: int, example: torch.Tensor) -> nn.Module:
    """Filter-pruned and compacted ``make()`` whose multiply-adds are closest to ``target`` (bisection)."""
    def build(rate: float) -> nn.Module:
        torch.manual_seed(0)
        model = make()
        prune_filter_groups(model, example, rate)
        return compact(model.eval(), example)

    low, high = 0.0, 0.9
    for _ in range(7):
        middle = (low + high) / 2
        low, high = (middle, high) if count_macs(build(middle), example)[0] > target else (low, middle)
    return min((build(low), build(high)), key=lambda m: abs(count_macs(m, example)[0] - target))


def model_rows(keep_ratios: tuple[float, ...], repeats: int) -> list[tuple]:
    rows = []
    for name, (make, layers, size) in MODELS.items():
        example = torch.randn(8, 1, size, size, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        dense = make().eval()
        dense_macs = count_macs(dense, example)[0]
        models: dict[str, tuple[nn.Module, int]] = {"dense": (dense, dense_macs)}
        for keep in keep_ratios:
            torch.manual_seed(0)
            gated = make()
            gates = FeatureBoostingGates(select_layers(gated, layers, types=["Conv2d"]), keep).attach(gated)
            macs = gates.executed_macs(example)
            gates.sparse(True, example)
            models[f"FBS keep {keep}"] = (gated.eval(), macs)
            if keep < 1.0:
                small = static_model(make, macs, example)
                models[f"static, MACs of keep {keep}"] = (small, count_macs(small, example)[0])
        medians = {}
        for batch in (64, 1):
            inputs = torch.randn(batch, 1, size, size)
            calls = {key: (lambda m=model, x=inputs: m(x)) for key, (model, _) in models.items()}
            with torch.inference_mode():
                medians[batch] = interleaved_medians(calls, repeats)
        for key, (_, macs) in models.items():
            speedups = [medians[b]["dense"] / medians[b][key] for b in (64, 1)]
            rows.append((name, key, f"{macs:,}", f"{macs / dense_macs:.3f}", f"{medians[64][key] * 1e3:.2f}",
                         f"{medians[1][key] * 1e3:.3f}", f"{speedups[0]:.2f}x / {speedups[1]:.2f}x"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and keep ratios")
    quick = parser.parse_args(argv).quick
    torch.set_num_threads(1)
    print(f"FBS sparse execution, 1 thread, median ms ({machine()})\n")
    print(markdown_table(["layer", "batch", "MACs (x dense)", "dense", "dense x mask", "sparse (loop)",
                          "sparse (grouped)", "speedup (loop)"], layer_rows(5 if quick else 30)))
    print()
    keep_ratios = (0.5,) if quick else (1.0, 0.75, 0.5, 0.25)
    print(markdown_table(["model", "execution", "MACs per input", "MACs (x dense)", "batch 64 ms", "batch 1 ms",
                          "speedup b64 / b1"], model_rows(keep_ratios, 5 if quick else 30)))


if __name__ == "__main__":
    main()
