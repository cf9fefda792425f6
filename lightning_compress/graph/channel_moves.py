"""Operations that move channels without computing on them (view, reshape, permute, transpose, flatten, chunk,
split, channel slices): where do a tensor's channels land in each output? Pure torch.

The operation is replayed on an integer code tensor of the input's shape holding ``batch * C + channel`` at every
position (the channel taken jointly over the input's channel dimensions). In each output, the dimensions along which
the code varies (batch aside) carry the channels, in C order, and the code at each of their positions says which
input channel sits there. A channel shuffle (``view`` to groups, ``transpose``, ``view`` back) thus becomes a
permutation, a flatten a repetition of each channel over its block of features; an operation that mixes channels
into the batch dimension is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_compress.graph.tracing import Call, tensors_in

__all__ = ["MOVES", "channel_codes", "moved_channels"]

#: Operations that only move or select elements (normalized names, see ``tracing.op_name``).
MOVES = {
    "view", "reshape", "flatten", "Flatten", "unflatten", "Unflatten", "squeeze", "unsqueeze", "permute", "transpose",
    "swapaxes", "movedim", "contiguous", "chunk", "split", "tensor_split", "narrow", "getitem", "expand_as",
}  # fmt: skip


def channel_codes(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """An int64 tensor shaped like ``x``: ``batch * C + channel``, the channel indexed jointly over ``dims``."""
    sizes = [x.shape[d] for d in dims]
    channels = math.prod(sizes)
    view = [1] * x.dim()
    for d, size in zip(dims, sizes, strict=True):
        view[d] = size
    code = torch.arange(channels, dtype=torch.int64).view(sizes)
    code = code.reshape(view) if dims == tuple(sorted(dims)) else _placed(code, dims, view)
    batch = torch.arange(x.shape[0], dtype=torch.int64).view(-1, *[1] * (x.dim() - 1)) * channels
    return (code + batch).expand(x.shape).contiguous()


def _placed(code: Tensor, dims: tuple[int, ...], view: list[int]) -> Tensor:
    order = sorted(range(len(dims)), key=lambda i: dims[i])
    return code.permute(order).reshape(view)


def moved_channels(call: Call, x: Tensor, dims: tuple[int, ...]) -> list[tuple[tuple[int, ...], list[int]]] | str:
    """For each tensor output of ``call`` (which moves the channels of its argument ``x``, laid along ``dims``), its
    channel dimensions and, in C order over them, the input channel at each position; or a reason it is refused."""
    codes = channel_codes(x, dims)
    channels = math.prod(x.shape[d] for d in dims)

    def substitute(value: Any) -> Any:
        if value is x:
            return codes
        if isinstance(value, (list, tuple)):
            return type(value)(substitute(v) for v in value)
        return value

    try:
        result = call.apply(*substitute(call.args), **substitute(call.kwargs))
    except Exception as error:  # e.g. an argument pattern that the replay cannot follow
        return f"{call.op} could not be replayed on channel codes ({type(error).__name__})"
    outputs = tensors_in(result)
    if len(outputs) != len(tensors_in(call.output)):
        return f"{call.op} gives other outputs on channel codes"
    layouts = []
    for out in outputs:
        if out.dim() < 2 or out.shape[0] != x.shape[0]:
            return f"{call.op} {tuple(x.shape)} -> {tuple(out.shape)} moves channels into the batch dimension"
        batch = torch.arange(x.shape[0]).view(-1, *[1] * (out.dim() - 1))
        if not bool((out // channels == batch).all()):
            return f"{call.op} {tuple(x.shape)} -> {tuple(out.shape)} mixes batch and channels"
        channel = out % channels
        varying = tuple(d for d in range(1, out.dim()) if bool((channel != channel.narrow(d, 0, 1)).any()))
        if not varying:
            return f"{call.op} {tuple(x.shape)} -> {tuple(out.shape)} keeps at most one channel"
        picked = channel[0]
        for d in reversed(range(1, out.dim())):
            if d not in varying:
                picked = picked.narrow(d - 1, 0, 1)
        layouts.append((varying, picked.reshape(-1).tolist()))
    return layouts
