"""int8 Linear layers for transformers without FX tracing: module-by-module swap to dynamically quantized Linear.

FX graph mode (:func:`~lightning_compress.export.int8.export_int8`) cannot trace Hugging Face models (data-dependent
slicing, ``ModelOutput``) nor reach ``nn.MultiheadAttention``'s packed projections. This path walks the modules
instead: every ``nn.Linear`` and Hugging Face ``Conv1D`` (its transposed weight turned round) becomes a
``torch.ao.nn.quantized.dynamic.Linear`` (int8 weights per output channel, activations quantized per call from
their range: Jacob et al. 2018 arithmetic, as ``torch.ao.quantization.quantize_dynamic``), and every
``nn.MultiheadAttention`` first becomes a :class:`~lightning_compress.graph.heads_compact.CompactMultiheadAttention`
with all its heads (separate Q/K/V/O ``Linear`` layers, the same outputs), so attention projections run in int8 too.

Weight scales are the layer's calibrated or learned weight ``amax / 127`` where a quantizer of ours exists (QAT,
PTQ), the per-channel absolute maximum otherwise. The dynamic kernels quantize activations to 7 bits
(``reduce_range``) on ``x86`` / ``fbgemm``, which those kernels compute exactly on every x86 CPU, VNNI or not
(:mod:`~lightning_compress.export.engines`), so ``"auto"`` picks ``x86`` there.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.export.engines import SAFE_ACTIVATION_CODE, choose_engine, host_summary, quantized_engine
from lightning_compress.export.int8 import Int8Model, deterministic_off
from lightning_compress.export.verify import check_agreement
from lightning_compress.graph.heads import find_unit_groups
from lightning_compress.graph.heads_compact import mha_with_heads
from lightning_compress.quantization.quantizers import quantized_layers, remove_quantizers

__all__ = ["dynamic_int8_layers", "export_int8_dynamic", "is_transformer", "load_int8_dynamic",
           "quantize_linears_dynamic", "save_int8_dynamic"]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` holds attention FX graph mode cannot export: ``nn.MultiheadAttention``, Hugging Face
    ``Conv1D``, or an attention layout of :func:`~lightning_compress.graph.heads.find_unit_groups`."""
    if any(isinstance(m, nn.MultiheadAttention) or _is_conv1d(m) for m in model.modules()):
        return True
    return bool(find_unit_groups(model, ffn=False)[0])


def dynamic_int8_layers(model: nn.Module, exclude: str | Sequence[str] | None = None) -> list[str]:
    """The layers :func:`quantize_linears_dynamic` turns into int8 (``Linear`` / ``Conv1D``; the projections of a
    ``nn.MultiheadAttention`` named ``<mha>.q_proj`` .. ``<mha>.o_proj``), minus ``exclude`` (names or regexes)."""
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            names += [f"{name}.{p}" if name else p for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        elif (isinstance(module, nn.Linear) and not isinstance(
                module, nn.modules.linear.NonDynamicallyQuantizableLinear)) or _is_conv1d(module):
            names.append(name)
    return [n for n in names if not any(n == p or re.fullmatch(p, n) for p in patterns)]


def _weight_amax(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None and quantizer.enabled and not quantizer.calibrating:
        amax = quantizer.current_amax(weight).detach().float().reshape(-1).cpu()
        return amax.expand(weight.shape[0]).clone() if amax.numel() == 1 else amax
    return weight.detach().abs().amax(dim=1).float().cpu()


def _int8_linear(module: Any) -> nn.Module:
    weight = module.weight.detach().float().cpu()
    if _is_conv1d(module):
        weight = weight.t().contiguous()
    amax = _weight_amax(module, weight).clamp_min(1e-8)
    scale = (amax / 127.0).double()
    clipped = torch.maximum(torch.minimum(weight, amax.view(-1, 1)), -amax.view(-1, 1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation")
        qweight = torch.quantize_per_channel(clipped, scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                             torch.qint8)
    bias = module.bias.detach().float().cpu() if module.bias is not None else None
    layer = torch.ao.nn.quantized.dynamic.Linear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
    layer.set_weight_bias(qweight, bias)
    return layer


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_linears_dynamic(model: nn.Module, exclude: str | Sequence[str] | None = None) -> list[str]:
    """Swap the layers of :func:`dynamic_int8_layers` for dynamically quantized int8 ``Linear`` in place (CPU,
    float32), under the current quantized engine (the packed weights are made for it). Our quantizers' weight
    scales are used, then the quantizers removed. Returns the names of the swapped layers."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            separate = mha_with_heads(module, torch.arange(module.num_heads))
            if name:
                _set(model, name, separate)
            else:
                raise ValueError("quantize_linears_dynamic cannot replace a model that is itself a "
                                 "nn.MultiheadAttention; wrap it in a module")
    for module in model.modules():
        if hasattr(module, "use_nested_tensor"):
            module.use_nested_tensor = False  # type: ignore[assignment]  # the fused path needs packed projections
    chosen = dynamic_int8_layers(model, exclude)
    swapped = {name: _int8_linear(model.get_submodule(name)) for name in chosen}
    remove_quantizers(model)  # the scales are read; other layers go back to float
    for name, layer in swapped.items():
        _set(model, name, layer)
    return list(swapped)


def _drop_run_hooks(model: nn.Module) -> None:
    """Remove from ``model`` (a copy) the forward hooks that are local functions: those of the training run
    (distillation taps; Hugging Face's output-capturing hooks, which transformers 5 reinstalls when outputs are
    asked for again). They would run on the int8 copy for nothing, and ``torch.save`` cannot pickle them."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if "<locals>" in getattr(hook, "__qualname__", ""):
                    del hooks[key]
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(module, extra, {}).pop(key, None)
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False  # type: ignore[assignment]  # transformers reinstalls


def export_int8_dynamic(model: nn.Module, example_inputs: Any, *, engine: str = "auto",
                        min_agreement: float | None = 0.99, check_inputs: Any = None,
                        exclude: str | Sequence[str] | None = None) -> Int8Model:
    """An int8 CPU copy of ``model`` whose ``Linear`` / ``Conv1D`` layers run int8 kernels with dynamically
    quantized activations, checked against ``model`` (the fake-quantized model when quantizers are attached, else
    the float one). No FX tracing: works on Hugging Face BERT / GPT-2 / ViT and ``nn.TransformerEncoder``.
    ``model`` is not modified.

    Args:
        model: the float or fake-quantized model.
        example_inputs: a batch (tensor or tuple of positional inputs) to check the result on.
        engine: ``"auto"`` (``x86`` on x86: exact with 7-bit dynamic activations) or a named engine.
        min_agreement: the smallest share of samples whose predicted class (argmax of the last dimension) must
            agree with ``model``'s; ``None`` skips the check.
        check_inputs: more batches to check on.
        exclude: names or regexes of layers kept in float (e.g. the classifier).

    Raises:
        ValueError: an unknown engine; nothing to quantize.
        Int8MismatchError: agreement below ``min_agreement``.

    >>> _ = torch.manual_seed(1)  # an untrained net has near-ties between classes on some seeds
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> int8 = export_int8_dynamic(net, torch.randn(32, 8))
    >>> type(int8.model[0]).__name__, int8.verification["agreement"] >= 0.99
    ('Linear', True)
    """
    chosen_engine = choose_engine(SAFE_ACTIVATION_CODE, engine)
    copied = copy.deepcopy(model).cpu().float().eval()
    _drop_run_hooks(copied)
    if not dynamic_int8_layers(copied, exclude):
        raise ValueError(f"export_int8_dynamic found no Linear or Conv1D layer to quantize in {type(model).__name__} "
                         f"(exclude={exclude!r})")
    with deterministic_off(), quantized_engine(chosen_engine):
        names = quantize_linears_dynamic(copied, exclude)
    int8 = Int8Model(copied, chosen_engine).eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    int8.verification = {"engine": chosen_engine, "method": "dynamic", "int8_layers": len(names),
                         "quantizers_used": len(quantized_layers(model)), **host_summary(),
                         **check_agreement(model, int8, args, check_inputs, min_agreement)}
    return int8


def save_int8_dynamic(model: Int8Model, path: str | Path) -> None:
    """Write a dynamic int8 model (``torch.save`` of the module; Hugging Face models do not script) and, beside it,
    ``<stem>.json`` with its engine and verification."""
    torch.save(model, str(path))
    metadata = {"engine": model.engine, "method": "dynamic", "torch": torch.__version__,
                "verification": model.verification}
    Path(path).with_suffix(".json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")


def load_int8_dynamic(path: str | Path) -> Int8Model:
    """Load a file of :func:`save_int8_dynamic` (a pickle: load only files you trust)."""
    model = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(model, Int8Model):
        raise ValueError(f"{str(path)!r} does not hold an Int8Model (got {type(model).__name__})")
    return model.eval()
