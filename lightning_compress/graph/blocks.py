"""Layer pruning: whole residual blocks that become the identity when their parameters are zero. Pure torch.

A block ``f(x) = act(x + branch(x))`` with an identity shortcut turns into ``act(x)`` when every parameter of the
branch (convolutions, and BatchNorm scale and shift) is zero, which is ``x`` itself when ``x`` comes out of a ReLU,
as in ResNets. Such a block can be removed from the network (replaced by ``nn.Identity``), the "layer" granularity
of structured pruning. Candidates are verified numerically on example inputs rather than trusted by their shape.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress.utils.data import probe_forward


def _capture_io(model: nn.Module, example_inputs: Any, names: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    modules = dict(model.named_modules())
    captured: dict[str, tuple[Any, Any]] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: Any, output: Any) -> None:
            captured.setdefault(name, (args, output))
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    probe_forward(model, example_inputs, handles)
    return captured


def zero_block(block: nn.Module) -> None:
    """Zero every parameter of ``block`` in place (its branch then outputs zero)."""
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.zero_()


def _becomes_identity(block: nn.Module, args: Any, tolerance: float = 1e-6) -> bool:
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return False
    zeroed = copy.deepcopy(block).eval()
    zero_block(zeroed)
    with torch.no_grad():
        output = zeroed(args[0])
    return isinstance(output, torch.Tensor) and output.shape == args[0].shape and bool(
        (output - args[0]).abs().max() <= tolerance)


def removable_blocks(model: nn.Module, example_inputs: Any, patterns: str | Sequence[str] | None = None
                     ) -> list[str]:
    """Names of the innermost submodules with parameters that turn into the identity when zeroed, on
    ``example_inputs``; ``patterns`` (names or regexes) restricts the candidates.

    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(4, 4, 3, padding=1)
    ...     def forward(self, x):
    ...         return torch.relu(x + self.conv(x))
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), Block(), Block())
    >>> removable_blocks(model, torch.randn(2, 1, 5, 5))
    ['2', '3']
    """
    wanted = [patterns] if isinstance(patterns, str) else list(patterns or [])
    candidates = [name for name, module in model.named_modules()
                  if name and list(module.children()) and any(True for _ in module.parameters())
                  and (not wanted or any(name == p or re.fullmatch(p, name) for p in wanted))]
    captured = _capture_io(model, example_inputs, candidates)
    modules = dict(model.named_modules())
    found = [name for name in candidates if name in captured and _becomes_identity(modules[name], captured[name][0])]
    # Keep the innermost: a container of removable blocks is represented by its blocks.
    return [name for name in found if not any(other.startswith(name + ".") for other in found)]


def block_scores(model: nn.Module, names: Sequence[str], p: int = 2) -> torch.Tensor:
    """Lp norm of all parameters of each block, divided by the number of parameters to the power 1/p (so that
    blocks of different widths compare by their typical weight magnitude)."""
    modules = dict(model.named_modules())
    scores = []
    for name in names:
        flat = torch.cat([q.detach().flatten().double() for q in modules[name].parameters()])
        scores.append(flat.abs().pow(p).mean().pow(1.0 / p))
    return torch.stack(scores) if scores else torch.zeros(0, dtype=torch.float64)


def remove_blocks(model: nn.Module, names: Sequence[str], inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace``) with the named blocks replaced by ``nn.Identity``."""
    result = model if inplace else copy.deepcopy(model)
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = result.get_submodule(parent_name) if parent_name else result
        setattr(parent, attribute, nn.Identity())
    return result
