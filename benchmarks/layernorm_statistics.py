"""LayerNorm statistics of a pruned ConvNeXt: ``"all"`` (exact, the default) against ``"kept"`` (Torch-Pruning's).

A small ConvNeXt (torchvision's block: 7x7 depthwise, channels-last LayerNorm, MLP x4 with GELU, layer scale 1e-6;
LayerNorm2d stem and downsampling, widths 32/64, two blocks per stage) on the shapes workload (16x16, 10 classes,
``ShapesDataModule(seed)``), per seed:

- dense: trained ``--epochs`` (AdamW lr 2e-3, weight decay 0.05, cosine, batch 64);
- one-shot: the dense network with 40% of every free group's channels zeroed (``prune_filter_groups``) under each
  convention, compacted, no training (what changing the statistics costs by itself);
- FilterPruning: the dense network fine-tuned ``--finetune-epochs`` (AdamW lr 1e-3, cosine) with
  ``FilterPruning(sparsity=0.4, layernorm_statistics=...)`` (hard, the default schedule), compacted at fit end;
- Torch-Pruning (when installed): ``MagnitudePruner`` (L2, ``pruning_ratio=0.4``, classifier ignored, Torch-Pruning's
  rounding, so a little more is removed) on the dense network, then the same fine-tuning;
- compact from scratch: ``pruned_architecture(dense, 0.4)`` trained ``epochs + finetune_epochs`` like the dense one.

Columns: test accuracy (%), mean over seeds with the worst seed; parameters x; batch 64 latency x against the dense
network (1 thread, the compacted networks and the dense one alternated, median of 15 rounds; last seed).

    nice -n 10 python benchmarks/layernorm_statistics.py --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress import FilterPruning
from lightning_compress.demo import ClassifierModule, ShapesDataModule
from lightning_compress.demo.experiments import fit_and_test, quiet_single_thread, seeded
from lightning_compress.graph import compact
from lightning_compress.measure import count_parameters
from lightning_compress.pruning import pruned_architecture
from lightning_compress.pruning.groups import prune_filter_groups

RATE = 0.4


class LayerNorm2d(nn.LayerNorm):
    """torchvision's: a LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """torchvision's CNBlock without stochastic depth."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.scale = nn.Parameter(torch.full((width, 1, 1), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return x + self.scale * y.permute(0, 3, 1, 2)


class SmallConvNeXt(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64), depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 2, stride=2), LayerNorm2d(widths[0], eps=1e-6)]
        for i, width in enumerate(widths):
            if i:
                layers += [LayerNorm2d(widths[i - 1], eps=1e-6), nn.Conv2d(widths[i - 1], width, 2, stride=2)]
            layers += [Block(width) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm, self.head = nn.LayerNorm(widths[-1], eps=1e-6), nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean((2, 3))))


def module(network: nn.Module, lr: float) -> ClassifierModule:
    return ClassifierModule(network, optimizer="adamw", lr=lr, weight_decay=0.05, lr_scheduler="cosine")


def test_accuracy(network: nn.Module, data: ShapesDataModule) -> float:
    network = network.eval()
    x, y = data.test_set.tensors
    with torch.no_grad():
        return float((network(x).argmax(1) == y).float().mean())


def torch_pruning(network: nn.Module, example: torch.Tensor) -> nn.Module | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    pruned = copy.deepcopy(network).eval()
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=RATE, ignored_layers=[pruned.head])
    pruner.step()
    return pruned


def latency_ratios(networks: dict[str, nn.Module], x: torch.Tensor, rounds: int = 15) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in networks}
    with torch.no_grad():
        for _ in range(rounds + 1):
            for name, network in networks.items():
                start = time.perf_counter()
                network.eval()(x)
                times[name].append(time.perf_counter() - start)
    medians = {name: sorted(t[1:])[rounds // 2] for name, t in times.items()}
    return {name: medians["dense"] / value for name, value in medians.items()}


def run_seed(seed: int, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, nn.Module]]:
    data = ShapesDataModule(batch_size=64, seed=seed)
    data.setup()
    example = data.train_set.tensors[0][:8]
    dense = seeded(seed, SmallConvNeXt)
    initial = copy.deepcopy(dense)
    fit_and_test(module(dense, 2e-3), seed, args.epochs, datamodule=data)
    accuracy: dict[str, float] = {"dense": test_accuracy(dense, data)}
    networks: dict[str, nn.Module] = {"dense": dense}
    for statistics in ("all", "kept"):
        shot = copy.deepcopy(dense).eval()
        prune_filter_groups(shot, example, RATE, layernorm_statistics=statistics)
        accuracy[f"one-shot, {statistics}"] = test_accuracy(compact(shot, example), data)
        tuned = module(copy.deepcopy(dense), 1e-3)
        pruning = FilterPruning(sparsity=RATE, compact_on_fit_end=True, layernorm_statistics=statistics)
        pl.seed_everything(seed, verbose=False)
        fit_and_test(tuned, seed, args.finetune_epochs, datamodule=data, callbacks=[pruning])
        accuracy[f"FilterPruning, {statistics}"] = test_accuracy(tuned.backbone, data)
        networks[f"FilterPruning, {statistics}"] = tuned.backbone
    theirs = torch_pruning(dense, example)
    if theirs is not None:
        accuracy["Torch-Pruning, one-shot"] = test_accuracy(theirs, data)
        tuned = module(theirs, 1e-3)
        pl.seed_everything(seed, verbose=False)
        fit_and_test(tuned, seed, args.finetune_epochs, datamodule=data)
        accuracy["Torch-Pruning, fine-tuned"] = test_accuracy(tuned.backbone, data)
        networks["Torch-Pruning, fine-tuned"] = tuned.backbone
    scratch = pruned_architecture(initial, RATE, example, seed)
    fit_and_test(module(scratch, 2e-3), seed, args.epochs + args.finetune_epochs, datamodule=data)
    accuracy["compact from scratch"] = test_accuracy(scratch, data)
    networks["compact from scratch"] = scratch
    print(f"seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in accuracy.items()), flush=True)
    return accuracy, networks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=8)
    args = parser.parse_args()
    start = time.perf_counter()
    results: dict[str, list[float]] = {}
    networks: dict[str, Any] = {}
    with quiet_single_thread():
        for seed in range(args.seeds):
            accuracy, networks = run_seed(seed, args)
            for name, value in accuracy.items():
                results.setdefault(name, []).append(value)
        x = torch.randn(64, 1, 16, 16)
        speed = latency_ratios(networks, x)
    dense_params = count_parameters(networks["dense"])
    print(f"\n{args.seeds} seeds, {args.epochs} + {args.finetune_epochs} epochs, "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| network | test acc % (mean) | worst seed | params x | latency x (b64) |\n|---|---:|---:|---:|---:|")
    for name, values in results.items():
        network = networks.get(name)
        params = f"{dense_params / count_parameters(network):.2f}" if network is not None else "-"
        latency = f"{speed[name]:.2f}" if name in speed else "-"
        print(f"| {name} | {100 * sum(values) / len(values):.1f} | {100 * min(values):.1f} | {params} | {latency} |")


if __name__ == "__main__":
    main()
