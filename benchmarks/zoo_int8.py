"""int8 export of briefly trained torchvision classifiers: does ``export_int8`` follow the fake-quantized model?

Per model (``weights=None``, 10 classes): trained from scratch on the shapes workload
(``ShapesDataModule(seed=0, samples_per_class=200)``: 1000 training images, upsampled to 3 x 32 x 32 as in
tests/zoo/test_zoo_int8.py) at batch 64 with the recipe of ``RECIPES`` (Adam; AdamW with warm-up and cosine decay for
Swin-T and ViT-B/16, the latter built for 32 x 32 inputs; random weights make a quantized network's logits chaotic
under rounding, so agreement would measure nothing), then its batch
norm statistics recomputed over the training images with the final weights (MobileNetV3 and EfficientNet keep a
momentum of 0.01, too slow for ~150 steps: without this they stay at chance in eval mode). Then
``quantize_model(model, "static", calibration, reduce_range=True, residual_quantizers=True)`` (also without
``residual_quantizers`` with ``--without-residual``; calibration: the first 256 training images; ViT-B/16, which
``export_int8`` exports by its dynamic path for ``nn.MultiheadAttention``, with ``mode="dynamic"``) and, for every
quantized engine torch offers here, ``export_int8(fake_quantized, calibration, engine=..., check_inputs=test)`` on
the first ``--check-images`` of the 600 test images. Columns:

- float / fake-quant acc: top-1 accuracy on the test images (chance: 0.10);
- agreement / rel. error: ``int8.verification`` (share of the checked images, the 256 calibration and the test
  ones, whose int8 top-1 equals the fake-quantized model's; ``||int8 - fake logits|| / ||fake logits||``);
- floor (input): the fake-quantized model's agreement with itself when each input pixel is multiplied by
  ``1 + 1e-6 * N(0, 1)`` (mean over 3 draws); floor (layers): the same with every quantized layer's output
  (each Conv / Linear) multiplied by ``1 + 1e-6 * N(0, 1)`` through forward hooks. Predictions that flip under such
  noise are ties at the resolution of float rounding: no int8 kernel can be expected to reproduce them, so
  agreement is meaningful only down to this floor;
- kernel near-tie / wrong: ``int8.verification["kernel"]`` (every int8 Conv / Linear's output codes on the first 4
  calibration images recomputed with integer arithmetic: codes that differ within float rounding of a tie /
  otherwise);
- torch.ao agreement / rel. error: torch.ao's own pipeline on the same trained model and engine, the anchor:
  ``prepare_qat_fx`` with the engine's default QAT qconfig mapping, its observers run over the same calibration
  images in eval mode and then frozen (its fake-quantized model), against ``convert_fx`` of it (its int8 model).

The notes after the table also give how often the int8 models of two engines agree with each other on the checked
test images: exact kernels that round ties differently part there as much as from the fake-quantized model.

torchvision comes from the isolated install of tests/zoo/zoo_support.py (``$LIGHTNING_COMPRESS_ZOO``):

    export LIGHTNING_COMPRESS_ZOO=$PWD/.cache/zoo/torchvision
    nice -n 10 python benchmarks/zoo_int8.py --models resnet18
    nice -n 10 python benchmarks/zoo_int8.py --models swin_t,vit_b_16 --check-images 200
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import math
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))
from zoo_support import torchvision

from lightning_compress.demo import ShapesDataModule
from lightning_compress.export import export_int8
from lightning_compress.export.engines import exact_engines, host_summary, quantized_engine
from lightning_compress.export.int8 import resolve_method
from lightning_compress.export.verify import output_agreement
from lightning_compress.quantization import quantize_model

MODELS = ("resnet18,resnet50,mobilenet_v3_small,efficientnet_b0,regnet_y_400mf,shufflenet_v2_x1_0,convnext_tiny,"
          "swin_t,vit_b_16")


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: ``epochs`` over the 1000 images at batch 64 with Adam at ``lr``, or, for the
    transformers, AdamW (weight decay 0.05) with a linear warm-up over the first ``warmup_epochs`` and a cosine
    decay to zero (Adam at 2e-3 barely trains Swin-T: median top-1 probability 0.23 after 10 epochs)."""

    epochs: int
    lr: float
    adamw: bool = False
    warmup_epochs: int = 0


#: EfficientNet-B0 and RegNetY-400MF were barely trained at 10 / 8 epochs (1 thread: float acc 0.41 / 0.41, median
#: top-1 probability 0.54 / 0.68, and EfficientNet's fake-quantized model near chance, 0.14); at 30 epochs 0.54 /
#: 0.51, 0.81 / 0.94, fake-quantized EfficientNet 0.41 (134 s / 57 s of training). Others: ``--epochs`` at 2e-3.
RECIPES: dict[str, Recipe] = {"resnet18": Recipe(5, 2e-3), "resnet50": Recipe(8, 1e-3),
                              "mobilenet_v3_small": Recipe(15, 2e-3), "efficientnet_b0": Recipe(30, 2e-3),
                              "regnet_y_400mf": Recipe(30, 2e-3), "shufflenet_v2_x1_0": Recipe(10, 2e-3),
                              "convnext_tiny": Recipe(8, 2e-4), "swin_t": Recipe(10, 5e-4, True, 2),
                              "vit_b_16": Recipe(10, 3e-4, True, 2)}
#: constructor arguments beyond ``num_classes``: ViT-B/16's position embeddings fix its input size (2 x 2 patches)
MODEL_ARGUMENTS: dict[str, dict[str, int]] = {"vit_b_16": {"image_size": 32}}
NOISE = 1e-6


def images(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=32).repeat(1, 3, 1, 1)  # the shapes workload as 3x32x32 images


def cpu_line() -> str:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    words = set(flags.split())
    found = [f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2") if f in words]
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("Model name")), "?")
    return f"CPU: {name}; flags: {', '.join(found) or 'none of avx2/avx512_vnni'}; {host_summary()}"


def train(name: str, data: tuple[torch.Tensor, torch.Tensor], recipe: Recipe) -> nn.Module:
    vision = torchvision()
    assert vision is not None, "torchvision does not import (set LIGHTNING_COMPRESS_ZOO)"
    torch.manual_seed(0)
    model = vision.models.get_model(name, weights=None, num_classes=10, **MODEL_ARGUMENTS.get(name, {}))
    x, y = data
    steps_per_epoch = -(-len(x) // 64)
    if recipe.adamw:
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.05)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    schedule = warmup_cosine(optimizer, recipe.warmup_epochs * steps_per_epoch, recipe.epochs * steps_per_epoch) \
        if recipe.adamw else None
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    # population statistics of the final weights (MobileNetV3 / EfficientNet keep momentum 0.01: too slow here)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        for start in range(0, len(x), 64):
            model(x[start:start + 64])
    return model.eval()


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def accuracy_and_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy and the median top-1 softmax probability."""
    logits = model(x)
    return float((logits.argmax(1) == y).float().mean()), float(logits.softmax(1).amax(1).median())


@torch.no_grad()
def torch_ao_agreement(model: nn.Module, calibration: torch.Tensor, x: torch.Tensor, engine: str) -> str:
    """torch.ao's fake-quantized model (QAT preparation, calibrated, observers frozen) against its int8 model:
    ``"agreement / relative error"`` on ``x``."""
    from torch.ao.quantization import disable_observer, get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    with quantized_engine(engine), contextlib.redirect_stderr(io.StringIO()):
        prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping(engine),
                                  example_inputs=(calibration[:1],)).eval()
        for start in range(0, len(calibration), 64):  # observers update in eval mode; batch norm stays fixed
            prepared(calibration[start:start + 64])
        prepared.apply(disable_observer)
        converted = convert_fx(copy.deepcopy(prepared))
        fake = torch.cat([prepared(chunk) for chunk in x.split(64)])
        int8 = torch.cat([converted(chunk) for chunk in x.split(64)])  # qnnpack: ~1 GB of workspace per 64 images
    check = output_agreement(fake, int8)
    return f"{check['agreement']:.3f} / {check['relative_error']:.4f}"


@torch.no_grad()
def noise_floor(model: nn.Module, x: torch.Tensor, layers: bool, draws: int = 3) -> float:
    """Mean agreement of ``model``'s top-1 with itself under ``1 + NOISE * N(0, 1)`` multiplicative noise on the
    input (``layers=False``) or on every Conv / Linear output (``layers=True``)."""
    reference = model(x).argmax(1)
    generator = torch.Generator().manual_seed(1)

    def perturb(t: torch.Tensor) -> torch.Tensor:
        return t * (1 + NOISE * torch.randn(t.shape, generator=generator))

    hooks = [m.register_forward_hook(lambda _m, _i, out: perturb(out)) for m in model.modules()
             if layers and isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        agreements = [float((model(x if layers else perturb(x)).argmax(1) == reference).float().mean())
                      for _ in range(draws)]
    finally:
        for hook in hooks:
            hook.remove()
    return sum(agreements) / draws


def rows_for(name: str, args: argparse.Namespace, train_data: tuple[torch.Tensor, torch.Tensor],
             test: tuple[torch.Tensor, torch.Tensor], notes: list[str]) -> list[list[str]]:
    recipe = RECIPES.get(name, Recipe(args.epochs, 2e-3))
    recipe = replace(recipe, epochs=args.epochs or recipe.epochs)
    start = time.perf_counter()
    model = train(name, train_data, recipe)
    seconds = time.perf_counter() - start
    x, y = test[0][:args.check_images], test[1][:args.check_images]
    calibration = train_data[0][:256]
    float_acc, confidence = accuracy_and_confidence(model, x, y)
    notes.append(f"{name}: {recipe.epochs} epochs at lr {recipe.lr:g}"
                 f"{' (AdamW, warm-up, cosine)' if recipe.adamw else ''} in {seconds:.0f} s; median top-1 probability "
                 f"{confidence:.2f}")
    print(notes[-1], file=sys.stderr, flush=True)  # progress
    rows: list[list[str]] = []
    anchors: dict[str, str] = {}
    predictions: dict[tuple[bool, str], torch.Tensor] = {}
    for residual in (True, False)[:2 if args.both else 1]:
        label = f"{name} | {float_acc:.3f} | {'yes' if residual else 'no'}"
        # transformers (nn.MultiheadAttention) export by the dynamic path: compare with the matching fake model
        mode = "dynamic" if resolve_method(model, "auto") == "dynamic" else "static"
        if mode == "dynamic":
            label = f"{name} | {float_acc:.3f} | - (dynamic)"
        try:
            fake = quantize_model(model, mode, calibration if mode == "static" else None, reduce_range=True,
                                  residual_quantizers=residual and mode == "static")
        except Exception as error:  # e.g. torch.fx cannot trace the model for the residual quantizers
            notes.append(f"{name}, residual={residual}: quantize_model {type(error).__name__}: "
                         f"{str(error).splitlines()[0][:160]}")
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", "-"])
            continue
        fake_acc = accuracy_and_confidence(fake, x, y)[0]
        floors = f"{noise_floor(fake, x, False):.3f} | {noise_floor(fake, x, True):.3f}"
        for engine in args.engines:
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints the traceback of a failed run
                    int8 = export_int8(fake, calibration, engine=engine, check_inputs=x, min_agreement=None)
                with torch.no_grad():
                    predictions[(residual, engine)] = torch.cat([int8(chunk).argmax(1) for chunk in x.split(64)])
                check = int8.verification
                kernel = check.get("kernel", {})
                codes = f"{kernel['near_tie']} / {kernel['wrong']}" if kernel else "-"
                if mode == "static" and engine not in anchors:  # the same for both residual settings
                    try:
                        anchors[engine] = torch_ao_agreement(model, calibration, x, engine)
                    except Exception as error:  # torch.ao's own FX tracing or conversion
                        anchors[engine] = f"fails ({type(error).__name__})"
                anchor = anchors.get(engine, "-")
                rows.append([label, f"{fake_acc:.3f}", engine, f"{check['agreement']:.3f}",
                             f"{check['relative_error']:.4f}", floors, codes, anchor])
            except Exception as error:  # FX tracing, an engine refused on this CPU
                notes.append(f"{name}, residual={residual}, {engine}: export_int8 {type(error).__name__}: "
                             f"{str(error).splitlines()[0][:160]}")
                rows.append([label, f"{fake_acc:.3f}", engine, "-", "-", floors, "-", "-"])
    notes.extend(engines_among_themselves(name, predictions))
    return rows


def engines_among_themselves(name: str, predictions: dict[tuple[bool, str], torch.Tensor]) -> list[str]:
    """How often two engines' int8 models of the same fake-quantized model predict the same class on the test
    images: the agreement that exact kernels reach with each other when the network amplifies rounding ties."""
    notes = []
    for residual in (True, False):
        engines = [engine for (flag, engine) in predictions if flag == residual]
        pairs = [f"{a}/{b} {float((predictions[(residual, a)] == predictions[(residual, b)]).float().mean()):.3f}"
                 for i, a in enumerate(engines) for b in engines[i + 1:]]
        if pairs:
            notes.append(f"{name}, residual={residual}: int8 engines agree with each other on {', '.join(pairs)}")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS, help="comma-separated torchvision model names")
    parser.add_argument("--epochs", type=int, default=0, help="training epochs (0: each model's recipe)")
    parser.add_argument("--engines", default="", help="comma-separated quantized engines (default: every engine "
                        "this host computes 7-bit activations exactly with)")
    parser.add_argument("--check-images", type=int, default=600, help="test images to check on (of 600)")
    parser.add_argument("--without-residual", dest="both", action="store_true",
                        help="also quantize without residual quantizers")
    args = parser.parse_args()
    args.engines = args.engines.split(",") if args.engines else exact_engines(127)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(cpu_line(), flush=True)
    data = ShapesDataModule(seed=0, samples_per_class=200)
    data.setup()
    train_x, train_y = data.train_set.tensors
    test_x, test_y = data.test_set.tensors
    train_data, test = (images(train_x), train_y), (images(test_x), test_y)
    header = ["model", "float acc", "residual quantizers", "fake-quant acc", "engine", "agreement",
              "rel. logit error", "floor (input)", "floor (layers)", "kernel near-tie / wrong",
              "torch.ao agreement / rel. error"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    notes: list[str] = []
    for name in args.models.split(","):
        try:
            for row in rows_for(name, args, train_data, test, notes):
                print("| " + " | ".join(row) + " |", flush=True)
        except Exception as error:
            notes.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
