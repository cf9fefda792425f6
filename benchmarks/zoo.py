"""Real architectures: structured pruning at 40% and int8 of torchvision and Hugging Face vision classifiers, beside
Torch-Pruning and torch.ao.

Per model (random weights, batch norm statistics and classifier randomised, 10 classes, 3 x size x size inputs):

- ours: the dependency groups (``prune_filter_groups`` + exact ``compact``, the selection ``FilterPruning`` makes),
  counting channels as Torch-Pruning does (``rounding="up"``: ``n - floor(0.6 n)`` of ``n``; ``--rounding nearest``
  for the library's default, whose parameter reduction is printed in the second column either way;
  ``--layernorm-statistics kept``: pruned LayerNorms normalise over the kept channels, as Torch-Pruning's do);
  Torch-Pruning: ``MagnitudePruner`` (L2, ``pruning_ratio=0.4``, last layer ignored). x fewer parameters, x fewer
  MACs, x faster at batch 1 and 16 (1 thread; dense, ours and Torch-Pruning alternated, median of rounds), and our
  compaction's relative output difference;
- int8: ``quantize_model(..., "static", reduce_range=True, residual_quantizers=True)`` + ``export_int8`` (ours)
  and torch.ao FX (``prepare_fx`` / ``convert_fx``, the engine's default qconfig) of the dense model, both
  calibrated on the same batch: x faster than fp32 at batch 16 under the same engine, and our int8 model's
  agreement with its fake-quantized model (``-`` where a path fails, with the reason below the table).

torchvision, torch-pruning and transformers are bench extras (torchvision from an isolated install, see
tests/zoo/zoo_support.py; Hugging Face models are built from small configs, nothing is downloaded).

    nice -n 10 python benchmarks/zoo.py --models resnet18,hf_vit --size 64
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))
from zoo_support import classifier, hf_classifier, randomize

from lightning_compress.export import export_int8
from lightning_compress.export.engines import choose_engine, quantized_engine
from lightning_compress.export.int8 import fx_device_cache_released
from lightning_compress.graph import compact
from lightning_compress.measure import count_macs, count_parameters
from lightning_compress.pruning.groups import prune_filter_groups
from lightning_compress.quantization import quantize_model

TORCHVISION = "resnet18,resnet50,efficientnet_b0,mobilenet_v3_small,regnet_x_400mf,regnet_y_400mf,shufflenet_v2_x1_0,"\
              "convnext_tiny,swin_t,vit_b_16"
HUGGING_FACE = "hf_resnet,hf_convnext,hf_mobilenet_v2,hf_efficientnet,hf_regnet,hf_swin,hf_vit"
SIZES = {"vit_b_16": 224}  # its position embeddings fix the input size
NO_TORCH_PRUNING = {"swin_t": "not run (> 20 GB here)", "vit_b_16": "not run (> 20 GB here)"}


def alternated_ratios(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """The dense model's median time over each other model's, all run in turn ``rounds`` times."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(x)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    medians = {name: sorted(t)[rounds // 2] for name, t in times.items()}
    return {name: medians["dense"] / value for name, value in medians.items()}


def ours(model: nn.Module, x: torch.Tensor, rounding: str, statistics: str = "all") -> tuple[nn.Module, float]:
    pruned = copy.deepcopy(model)
    prune_filter_groups(pruned, x[:2], 0.4, rounding=rounding, layernorm_statistics=statistics)
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


def torch_ao_fx(model: nn.Module, x: torch.Tensor, engine: str) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with quantized_engine(engine), fx_device_cache_released():  # torch.ao's cache would keep every copy alive
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine), (x,))
        with torch.no_grad():
            prepared(x)
        return convert_fx(prepared)


def ours_int8(model: nn.Module, x: torch.Tensor, engine: str) -> nn.Module:
    """Static int8 with residual quantizers; a model torch.fx cannot trace goes without them (transformers export
    through ``method="auto"``'s dynamic int8 ``Linear`` layers)."""
    try:
        fake = quantize_model(model, "static", x, reduce_range=True, residual_quantizers=True)
    except ValueError:
        fake = quantize_model(model, "static", x, reduce_range=True)
    return export_int8(fake, x, engine=engine, min_agreement=None)


def int8_row(model: nn.Module, x: torch.Tensor, rounds: int, notes: list[str], name: str) -> list[str]:
    """[ours x faster, agreement, torch.ao FX x faster] at batch 16 (``-`` where a path fails)."""
    engine = choose_engine(127)  # 7-bit inputs: exact under x86 on every x86 CPU
    paths: dict[str, Callable[[], nn.Module]] = {
        "ours": lambda: ours_int8(model, x, engine),
        "torch.ao": lambda: torch_ao_fx(model, x, engine)}
    built: dict[str, nn.Module] = {"dense": model}
    for label, build in paths.items():
        try:
            built[label] = build()
        except Exception as error:  # FX cannot trace every model (data-dependent control flow)
            notes.append(f"{name}, {label} int8: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    with quantized_engine(engine):
        ratios = alternated_ratios(built, x, rounds)
    agreement = getattr(built.get("ours"), "verification", {}).get("agreement")
    return [f"{ratios['ours']:.2f}" if "ours" in built else "-", f"{agreement:.3f}" if agreement is not None else "-",
            f"{ratios['torch.ao']:.2f}" if "torch.ao" in built else "-"]


def build(name: str) -> nn.Module:
    model = hf_classifier(name) if name.startswith("hf_") else classifier(name)
    randomize(model)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=f"{TORCHVISION},{HUGGING_FACE}")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 columns")
    parser.add_argument("--rounding", default="up", choices=["up", "nearest", "down"],
                        help="channel count rounding of ours (up: Torch-Pruning's count)")
    parser.add_argument("--layernorm-statistics", default="all", choices=["all", "kept"],
                        help="what a pruned LayerNorm normalises by (kept: the kept channels, as Torch-Pruning)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    other = "nearest" if args.rounding != "nearest" else "up"
    header = ["model", "ours params x", f"params x ({other})", "MACs x", "latency x b1", "b16", "output diff",
              "TP params x", "MACs x", "latency x b1", "b16", "int8 ours x (b16)", "agreement", "int8 torch.ao FX x"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    notes: list[str] = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build(name)
        size = SIZES.get(name, args.size)
        x = torch.randn(16, 3, size, size)
        params, macs = count_parameters(model), count_macs(model, x)[0]
        small, difference = ours(model, x, args.rounding, args.layernorm_statistics)
        alternative = params / count_parameters(ours(model, x, other)[0])
        theirs = NO_TORCH_PRUNING.get(name) or torch_pruning(model, x)
        models = {"dense": model, "ours": small} | ({} if isinstance(theirs, str) else {"tp": theirs})
        fast = {batch: alternated_ratios(models, x[:batch], args.rounds) for batch in (1, 16)}
        row = [f"{params / count_parameters(small):.2f}", f"{alternative:.2f}", f"{macs / count_macs(small, x)[0]:.2f}",
               f"{fast[1]['ours']:.2f}", f"{fast[16]['ours']:.2f}", f"{difference:.1e}"]
        if isinstance(theirs, str):
            row += [theirs, "-", "-", "-"]
        else:
            row += [f"{params / count_parameters(theirs):.2f}", f"{macs / count_macs(theirs, x)[0]:.2f}",
                    f"{fast[1]['tp']:.2f}", f"{fast[16]['tp']:.2f}"]
        row += ["-", "-", "-"] if args.no_int8 else int8_row(model, x, args.rounds, notes, name)
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
