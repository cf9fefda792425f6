"""Tables and small helpers of the channel analysis: which operations carry channels, BatchNorm as an affine map.

Operation names are normalized by :func:`lightning_compress.graph.tracing.op_name`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.graph.tracing import Call

__all__ = [
    "CONCATS",
    "ELEMENTWISE",
    "REDUCTIONS",
    "RESHAPES",
    "bn_affine",
    "has_padding",
    "has_state",
    "indexes_positions_only",
    "keeps_batch_and_channels",
    "nan_values",
    "unpadded",
]

#: Elementwise functions, tensor methods and modules: channel-preserving; constants are replayed through them.
ELEMENTWISE = {
    "add", "sub", "rsub", "mul", "div", "truediv", "rtruediv", "true_divide", "neg", "abs", "exp", "square", "sqrt",
    "pow", "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid",
    "elu", "selu", "celu", "softplus", "mish", "clamp", "clip", "clamp_min", "clamp_max", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "contiguous", "clone", "detach", "float",
    "ReLU", "ReLU6", "LeakyReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "Hardtanh", "Hardswish", "Hardsigmoid", "ELU",
    "SELU", "CELU", "Softplus", "Mish", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "Identity",
    "stochastic_depth", "StochasticDepth", "drop_path", "DropPath",  # per-sample scalings: zero stays zero
}  # fmt: skip
#: Reshapes that keep the batch dimension (a flatten spreads each channel over a block of features).
RESHAPES = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "Flatten"}
#: Reductions, channel-preserving when they leave the batch and channel dimensions alone.
REDUCTIONS = {"mean", "sum", "amax", "amin"}
#: Concatenations: along channels they append, along other dimensions they tie channels.
CONCATS = {"cat", "concat", "concatenate"}


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` per channel (float64, on the CPU)."""
    assert bn.running_mean is not None and bn.running_var is not None
    mean, var = bn.running_mean.detach().cpu().double(), bn.running_var.detach().cpu().double()
    gamma = bn.weight.detach().cpu().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().cpu().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def has_state(module: nn.Module) -> bool:
    """Whether a module has parameters or buffers (then its channels tie every place it is called from); a
    stateless module (a ReLU or pooling reused across a residual block) is followed call by call."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def nan_values(x: Tensor) -> Tensor:
    """A ``(C,)`` float64 vector of ``nan`` (not constant) for a tensor with ``C`` channels."""
    return torch.full((x.shape[1] if x.dim() >= 2 else 0,), torch.nan, dtype=torch.float64)


def has_padding(padding: Any) -> bool:
    """Whether a padding (an int or a tuple) is non-zero anywhere."""
    values = padding if isinstance(padding, Iterable) and not isinstance(padding, str) else [padding]
    return any(p != 0 for p in values)


def keeps_batch_and_channels(call: Call, ndim: int) -> bool:
    """Whether a reduction (``mean``, ``sum``, ...) leaves the batch and channel dimensions alone."""
    dims = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", call.kwargs.get("axis"))
    if dims is None or isinstance(dims, Tensor):
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return all(d % ndim > 1 for d in dims)


def indexes_positions_only(index: Any) -> bool:
    """``x[:, :, ...]``: the batch and channel dimensions are taken whole (``None`` and slices after them)."""
    full = slice(None)
    return isinstance(index, tuple) and len(index) >= 2 and index[0] == full and index[1] == full


def unpadded(conv: nn.modules.conv._ConvNd) -> bool:
    """Whether a convolution has no padding (a constant input channel then folds exactly into its bias)."""
    return (isinstance(conv.padding, tuple) and not has_padding(conv.padding)) or conv.padding == "valid"
