"""The pieces of Feature Boosting and Suppression (Gao et al., ICLR 2019), pure torch: how many channels a gate keeps,
winner-take-all, the saliency predictor, and a gated convolution computed sparsely (only each sample's kept filters,
BatchNorm folded into a scale and shift). :mod:`~lightning_compress.pruning.dynamic` installs them on a network."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ChannelSaliency", "GatedConv", "keep_count", "sparse_gated_conv", "winner_take_all"]

GatedConv = nn.Conv1d | nn.Conv2d


def keep_count(keep_ratio: float, channels: int) -> int:
    """Channels kept per sample: ``ceil(keep_ratio * channels)``, at least 1.

    >>> keep_count(0.5, 5), keep_count(0.25, 64), keep_count(1e-9, 3)
    (3, 16, 1)
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio!r}.")
    return max(1, min(channels, math.ceil(keep_ratio * channels - 1e-9)))


def winner_take_all(saliency: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``wta_k``: keep the ``k`` largest saliencies of each row, zero the rest (Gao et al. 2019, eq. 4).

    The selection is not differentiated; the kept values are, so gradients reach the predictor.

    Returns:
        ``(gate, index)``: the gate ``(B, C)`` and the kept channels ``(B, k)`` of each sample.

    >>> winner_take_all(torch.tensor([[0.1, 3.0, 2.0, 0.5]]), 2)[0]
    tensor([[0., 3., 2., 0.]])
    """
    index = saliency.topk(k, dim=1).indices
    mask = torch.zeros_like(saliency).scatter_(1, index, 1.0)
    return saliency * mask, index


class ChannelSaliency(nn.Module):
    """The FBS saliency predictor of one layer: global average pool of its input, a linear map, ReLU.

    The bias starts at 1 so that every saliency starts near 1 (the gated network starts as the dense network with
    a per-sample top-k mask) and in the ReLU's active range.

    >>> ChannelSaliency(3, 5)(torch.zeros(2, 3, 4, 4)).shape
    torch.Size([2, 5])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)
        nn.init.ones_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(x.flatten(2).mean(dim=2)))


def _expand(index: Tensor, ndim: int, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Index ``(B, n)`` viewed as ``(B, n, 1, ...)`` and expanded over trailing ``shape``."""
    return index.view(*index.shape, *([1] * ndim)).expand(*index.shape, *shape)


def sparse_gated_conv(conv: GatedConv, x: Tensor, index: Tensor, values: Tensor, scale: Tensor, shift: Tensor,
                      in_index: Tensor | None = None, grouped: bool = False) -> Tensor:
    """One gated convolution computing only the kept filters of each sample (and only its kept input channels).

    Equals ``(scale * conv(x) + shift) * wta`` densely (BatchNorm folded into ``scale``/``shift``, conv bias in
    ``shift``) where ``x`` is zero outside ``in_index``. Each sample runs a smaller dense convolution over its
    own kept filters and input channels (or, ``grouped``, all samples run as one grouped convolution); the result
    is scattered into zeros.

    Args:
        conv: an ungrouped ``nn.Conv1d`` or ``nn.Conv2d``.
        x: its input ``(B, C_in, *spatial)``.
        index: kept output channels ``(B, k)``.
        values: their saliencies ``(B, k)``.
        scale: per output channel multiplier ``(C_out,)``.
        shift: per output channel offset ``(C_out,)``.
        in_index: the only input channels that may be non-zero ``(B, k_in)``, or ``None`` for all.
        grouped: run the batch as one grouped convolution (``groups=B``) over filters gathered for all samples at
            once, instead of a loop of per-sample convolutions, each over its own selected filters (the default:
            on CPU it is faster, as it gathers one sample's filters at a time, in cache).
    """
    batch, k = index.shape
    kernel, spatial = conv.weight.shape[2:], x.shape[2:]
    conv_fn: Callable[..., Tensor] = F.conv1d if len(spatial) == 1 else F.conv2d
    options: dict[str, Any] = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    rows = torch.arange(batch, device=index.device).unsqueeze(1)
    if grouped and batch > 1:
        if in_index is None:
            weight = conv.weight[index]  # (B, k, C_in, *kernel)
        else:
            weight = conv.weight[index.unsqueeze(2), in_index.unsqueeze(1)]  # (B, k, k_in, *kernel)
            x = x[rows, in_index]  # (B, k_in, *spatial)
        out = conv_fn(x.reshape(1, -1, *spatial), weight.reshape(batch * k, -1, *kernel), None, groups=batch,
                      **options)
        out = out.view(batch, k, *out.shape[2:])
    else:  # per sample, a smaller dense convolution over its own filters and input channels (cache-friendly)
        outs = []
        for b in range(batch):
            weight, x_b = conv.weight.index_select(0, index[b]), x[b : b + 1]
            if in_index is not None:
                weight, x_b = weight.index_select(1, in_index[b]), x_b.index_select(1, in_index[b])
            outs.append(conv_fn(x_b, weight, None, **options))
        out = outs[0] if batch == 1 else torch.cat(outs)
    shape = (batch, k, *([1] * (out.dim() - 2)))
    out = torch.addcmul((shift[index] * values).view(shape), out, (scale[index] * values).view(shape))
    result = out.new_zeros(batch, conv.out_channels, *out.shape[2:])
    if batch == 1:
        return result.index_copy_(1, index[0], out)
    result[rows, index] = out
    return result


def _folded_affine(conv: GatedConv, norm: _BatchNorm | None) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``norm(conv(x)) = scale * conv_without_bias(x) + shift`` (eval-mode BatchNorm)."""
    bias = conv.bias if conv.bias is not None else torch.zeros_like(conv.weight[:, 0].flatten(1)[:, 0])
    if norm is None:
        return torch.ones_like(bias), bias
    assert norm.running_var is not None and norm.running_mean is not None, "BatchNorm without running statistics"
    scale = norm.running_var.add(norm.eps).rsqrt()
    scale = scale * norm.weight if norm.weight is not None else scale
    shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0)
    return scale, shift + scale * bias
