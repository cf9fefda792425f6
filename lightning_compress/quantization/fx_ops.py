"""The ops torch.ao's FX graph mode treats alike, as the residual points and the int8 export match them on a
``torch.fx`` graph: which keep their input's quantization, which round again, which it requantizes."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["is_inference_identity", "is_op", "keeps_grid", "module_of"]

RELU_MODULES = (nn.ReLU,)
RELU_CALLS = (torch.relu, torch.relu_, F.relu, "relu", "relu_")
ADD_CALLS = (operator.add, operator.iadd, torch.add, "add", "add_", "__add__")
#: products of two tensors: torch.ao's ``quantized::mul`` (a squeeze-excitation gate times its input)
MUL_CALLS = (operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__")
#: modules and calls that keep the grid of their input exactly (torch.ao shares their input's quantization)
#: dropouts: the identity at inference, on quantized codes too
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
EXACT_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity,
                 *DROPOUT_MODULES, nn.ReLU, nn.ReLU6, nn.Hardtanh)
EXACT_CALLS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
               F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.dropout, torch.relu,
               F.relu, F.relu6, F.hardtanh,
               "flatten", "reshape", "view", "squeeze", "unsqueeze", "transpose", "permute", "contiguous", "relu")
#: modules whose forward runs their children in turn: a quantizer attached to one would run as a layer too
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: functions that ``torch.fx`` keeps as calls (torchvision wraps its stochastic depth) and that return their input
#: when called with ``training=False``; torch.ao does not know them and would requantize their output
INFERENCE_IDENTITIES = {"stochastic_depth": 3}  # name -> position of the ``training`` argument
#: concatenations: torch.ao quantizes every input at the output's grid (one observer shared by all)
CAT_CALLS = (torch.cat, torch.concat, "cat")
#: ones that share it but round again (an average of codes)
ROUNDING_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
ROUNDING_CALLS = (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.mean, "mean")
#: resampling, which torch.ao computes on its input's grid too
RESAMPLING_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
RESAMPLING_CALLS = (F.interpolate, "interpolate")
#: poolings whose average a ``"pool"`` quantizer computes on the codes of its input's grid
POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
#: ops whose output torch.ao quantizes with fixed ``(scale, zero_point)`` (quint8), e.g. squeeze-excitation gates
FIXED = {nn.Sigmoid: (1 / 256, 0), nn.Hardsigmoid: (1 / 256, 0), nn.Tanh: (2 / 256, 128),
         torch.sigmoid: (1 / 256, 0), F.sigmoid: (1 / 256, 0), F.hardsigmoid: (1 / 256, 0), "sigmoid": (1 / 256, 0),
         torch.tanh: (2 / 256, 128), F.tanh: (2 / 256, 128), "tanh": (2 / 256, 128)}
#: activations whose output the int8 graph stores in 8 bits again (its own observer, or the next op's)
#: normalizations torch.ao computes on 8-bit inputs and outputs (``quantized::layer_norm``, ...)
NORM_MODULES = (nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
NORM_CALLS = (F.layer_norm, F.group_norm, F.instance_norm)
ACTIVATION_MODULES = (nn.Hardswish, nn.SiLU, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Mish, *NORM_MODULES)
ACTIVATION_CALLS = (F.hardswish, F.silu, F.gelu, F.elu, F.leaky_relu, F.mish, *NORM_CALLS)


def module_of(root: nn.Module, node: Any) -> nn.Module | None:
    """The module a ``call_module`` node calls (else ``None``)."""
    return root.get_submodule(node.target) if getattr(node, "op", None) == "call_module" else None


def is_op(node: Any, root: nn.Module, modules: tuple[type, ...], calls: tuple[Any, ...]) -> bool:
    """Whether ``node`` calls a module of one of the types ``modules``, or a function / method in ``calls``."""
    op = getattr(node, "op", None)
    if op == "call_module":
        return isinstance(module_of(root, node), modules)
    return op in ("call_function", "call_method") and node.target in calls


def is_inference_identity(node: Any) -> bool:
    """Whether ``node`` calls an eval-mode stochastic depth (Huang et al. 2016), e.g. torchvision's
    ``stochastic_depth(x, p, mode, training=False)`` in EfficientNet and ConvNeXt: the identity at inference."""
    position = INFERENCE_IDENTITIES.get(getattr(getattr(node, "target", None), "__name__", ""))
    if getattr(node, "op", None) != "call_function" or position is None:
        return False
    training = node.kwargs.get("training", node.args[position] if len(node.args) > position else True)
    return training is False


def keeps_grid(node: Any, root: nn.Module) -> bool:
    """Whether ``node`` passes its first input's quantized values on unchanged (a move, a max, a dropout, a ReLU of
    a zero-point-0 tensor, an eval-mode stochastic depth)."""
    return is_op(node, root, EXACT_MODULES, EXACT_CALLS) or is_inference_identity(node)
