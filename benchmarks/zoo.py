"""Real architectures: structured pruning at 40% of torchvision classifiers, beside Torch-Pruning.

Per model (random weights, 10 classes): our dependency groups (``prune_filter_groups`` + exact ``compact``, the
same selection ``FilterPruning`` makes) and Torch-Pruning's ``MagnitudePruner`` (L2, ``pruning_ratio=0.4``, last
layer ignored): x fewer parameters, x fewer MACs, x faster at batch 16 (1 thread, alternated with the dense
model), and our compaction's relative output difference. torchvision and torch-pruning are bench extras
(torchvision from an isolated install, see tests/zoo/zoo_support.py).

    nice -n 10 python benchmarks/zoo.py --models resnet18,regnet_x_400mf --size 64
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))
from zoo_support import classifier

from lightning_compress.graph import compact
from lightning_compress.measure import count_macs, count_parameters
from lightning_compress.pruning.groups import prune_filter_groups


def latency_ratio(dense: nn.Module, small: nn.Module, x: torch.Tensor, rounds: int = 5) -> float:
    """Dense time over small time, alternating the two models (median of ``rounds``)."""
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for model in (dense, small):
            model(x)
        for _ in range(rounds):
            for k, model in enumerate((dense, small)):
                start = time.perf_counter()
                model(x)
                times[k].append(time.perf_counter() - start)
    return sorted(times[0])[rounds // 2] / sorted(times[1])[rounds // 2]


def ours(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float]:
    pruned = copy.deepcopy(model)
    prune_filter_groups(pruned, x[:2], 0.4)
    small = compact(pruned, x[:2])
    assert isinstance(small, nn.Module)
    with torch.no_grad():
        reference, out = pruned(x[:2]), small(x[:2])
    return small, float((out - reference).norm() / reference.norm().clamp_min(1e-12))


def torch_pruning(model: nn.Module, x: torch.Tensor) -> nn.Module | str:
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    last = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    try:
        pruner = tp.pruner.MagnitudePruner(pruned, x[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.4, ignored_layers=[last])
        pruner.step()
        pruned(x[:1])
    except Exception as error:  # Torch-Pruning fails on some models (ShuffleNet)
        return f"fails ({type(error).__name__})"
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50,efficientnet_b0,mobilenet_v3_small,regnet_x_400mf,"
                                            "regnet_y_400mf,shufflenet_v2_x1_0,convnext_tiny,swin_t")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | ours params x | MACs x | latency x (b16) | output diff | TP params x | MACs x | latency x |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = classifier(name).eval()
        x = torch.randn(16, 3, args.size, args.size)
        params, macs = count_parameters(model), count_macs(model, x)[0]
        small, difference = ours(model, x)
        row = [f"{params / count_parameters(small):.2f}", f"{macs / count_macs(small, x)[0]:.2f}",
               f"{latency_ratio(model, small, x):.2f}", f"{difference:.1e}"]
        theirs = torch_pruning(model, x)
        if isinstance(theirs, str):
            row += [theirs, "-", "-"]
        else:
            row += [f"{params / count_parameters(theirs):.2f}", f"{macs / count_macs(theirs, x)[0]:.2f}",
                    f"{latency_ratio(model, theirs, x):.2f}"]
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
