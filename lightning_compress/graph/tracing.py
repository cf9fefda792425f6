"""Record the operations of one forward pass, with the real tensors, for the channel dependency analysis.

Two front ends give the same list of :class:`Call` records (in execution order):

- ``torch.fx``: ``symbolic_trace`` with torch.nn layers (and subclasses of the supported layers) as leaves, then
  an :class:`torch.fx.Interpreter` run on the example inputs, so every node carries its concrete tensors;
- hooks (fallback when symbolic tracing fails, e.g. on data-dependent control flow): forward hooks on the leaf
  modules plus a ``TorchFunctionMode`` that records functions and tensor methods called outside leaf modules.

Tensors are identified by object identity (the records keep them alive, so identities are not reused).
The model runs in eval mode under ``torch.no_grad()``; its training flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Call", "Trace", "called_through_weights", "is_leaf", "op_name", "trace", "unexecuted_layers"]

_LEAF_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
_INPLACE_OPERATORS = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "truediv", "idiv": "div"}


def is_leaf(module: nn.Module) -> bool:
    """Leaf modules are recorded as one call: torch.nn layers (not containers) and subclasses of conv/linear/BN and,
    without children, of LayerNorm (``LayerNorm2d``: the dependency analysis checks what they compute)."""
    if isinstance(module, _LEAF_TYPES) or (isinstance(module, nn.LayerNorm) and not any(module.children())):
        return True
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return type(module).__module__.startswith("torch.nn") and not isinstance(module, containers)


def op_name(target: Any) -> str:
    """Normalized name of a function, tensor method or module class: ``operator.iadd``, ``Tensor.__add__`` -> add."""
    if isinstance(target, nn.Module):
        return type(target).__name__
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    name = name.strip("_")
    name = _INPLACE_OPERATORS.get(name, name)
    if name.startswith("r") and name[1:] in ("add", "mul"):
        name = name[1:]
    return name


@dataclass
class Call:
    """One recorded operation: a leaf module (``module`` set, ``name`` its qualified name) or a function."""

    name: str
    op: str
    target: Any
    args: tuple
    kwargs: dict
    output: Any
    module: nn.Module | None = None

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Run the same operation on other arguments (tensor methods called on the first argument)."""
        if self.module is not None:
            return self.module(*args, **kwargs)
        if isinstance(self.target, str):
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


@dataclass
class Trace:
    """The calls of one forward pass, the flattened input and output tensors, and the front end used."""

    calls: list[Call]
    inputs: list[Tensor]
    outputs: list[Tensor]
    method: str
    fx_error: str | None = None


def tensors_in(value: Any) -> list[Tensor]:
    """Tensors inside nested tuples, lists and dicts, in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    return []


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.calls: list[Call] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n.op in ("call_module", "call_function", "call_method"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            module = self.fetch_attr(str(n.target)) if n.op == "call_module" else None
            op = op_name(module if module is not None else n.target)
            name = str(n.target) if module is not None else op
            self.calls.append(Call(name, op, n.target, tuple(args), dict(kwargs), result, module))
        return result


def _trace_fx(model: nn.Module, inputs: tuple) -> Trace:
    graph = _LeafTracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    recorder = _Recorder(gm)
    output = recorder.run(*inputs)
    return Trace(recorder.calls, tensors_in(inputs), tensors_in(output), "fx")


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, calls: list[Call], depth: list[int]) -> None:
        super().__init__()
        self.calls, self.depth = calls, depth

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth[0] == 0 and tensors_in(result):
            op = op_name(func)
            self.calls.append(Call(op, op, func, tuple(args), dict(kwargs), result))
        return result


def _trace_hooks(model: nn.Module, inputs: tuple) -> Trace:
    calls: list[Call] = []
    depth = [0]

    def pre_hook(module: nn.Module, args: tuple) -> None:
        depth[0] += 1

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            depth[0] -= 1
            if depth[0] == 0:
                calls.append(Call(name, op_name(module), module, tuple(args), {}, output, module))

        return hook

    handles = []
    for name, module in model.named_modules():
        if name and is_leaf(module):
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with _FunctionRecorder(calls, depth):
            output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return Trace(calls, tensors_in(inputs), tensors_in(output), "hooks")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's training flag on exit."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def trace(model: nn.Module, example_inputs: Any, method: str = "auto") -> Trace:
    """Record one eval-mode forward pass of ``model`` on ``example_inputs`` (a tensor or a tuple of them).

    Args:
        model: the network; not modified.
        example_inputs: what ``model`` is called with (use a batch of at least 2).
        method: ``"fx"``, ``"hooks"`` or ``"auto"`` (fx, falling back to hooks when symbolic tracing fails).

    Raises:
        ValueError: for an unknown ``method``.

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 1))
    >>> recorded = trace(model, torch.randn(2, 1, 3, 3))
    >>> recorded.method, [(call.name, call.op) for call in recorded.calls]
    ('fx', [('0', 'Conv2d'), ('1', 'ReLU'), ('2', 'Flatten'), ('3', 'Linear')])
    """
    if method not in ("auto", "fx", "hooks"):
        raise ValueError(f"method must be 'auto', 'fx' or 'hooks', got {method!r}.")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with eval_mode(model), torch.no_grad():
        if method in ("auto", "fx"):
            try:
                return _trace_fx(model, inputs)
            except Exception as error:  # symbolic tracing fails on data-dependent control flow and more
                if method == "fx":
                    raise
                fx_error = f"{type(error).__name__}: {error}"
        result = _trace_hooks(model, inputs)
    if method == "auto":
        result.fx_error = fx_error
    return result


def unexecuted_layers(model: nn.Module, recorded: Trace) -> list[str]:
    """Layers of ``model`` that the recorded forward never ran: modules with parameters of their own (or BatchNorm
    statistics) that were not called, are not inside a called module, and none of whose parameters an operation
    read. Typically called outside ``forward`` (an auxiliary head in ``training_step``) or only in training mode.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.aux = nn.Conv2d(1, 2, 3), nn.Linear(2, 1)
    ...     def forward(self, x):
    ...         return self.conv(x)
    >>> net = Net()
    >>> unexecuted_layers(net, trace(net, torch.randn(2, 1, 3, 3)))
    ['aux']
    """
    ran = {call.name for call in recorded.calls if call.module is not None}
    read = {id(x) for call in recorded.calls for x in tensors_in((call.args, call.kwargs))}
    modules = dict(model.named_modules())
    for name in ran & set(modules):
        read.update(id(p) for p in modules[name].parameters())  # parameters shared with a module that ran
    unexecuted = []
    for name, module in modules.items():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._NormBase):
            own += list(module.buffers(recurse=False))
        inside = any(name == r or name.startswith(f"{r}.") for r in ran)
        if name and own and not inside and not any(id(t) in read for t in own):
            unexecuted.append(name)
    return unexecuted


def called_through_weights(model: nn.Module, recorded: Trace) -> dict[str, str]:
    """Conv and linear layers whose ``forward`` the recorded pass never ran although their weight was used: read by
    a function (``F.linear(x, layer.weight)``, as in torchvision's Swin) or inside a leaf that reads its children's
    weights (``nn.MultiheadAttention``'s ``out_proj``). Maps each name to who reads it; quantized forwards and
    forward hooks never see such layers.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         return torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)
    >>> net = Net()
    >>> called_through_weights(net, trace(net, torch.randn(2, 2)))
    {'fc': 'linear'}
    """
    ran = {call.name for call in recorded.calls if call.module is not None}
    readers = {id(x): call.op for call in recorded.calls for x in tensors_in((call.args, call.kwargs))}
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or name in ran:
            continue
        inside = any(name.startswith(f"{r}.") and isinstance(model.get_submodule(r), nn.MultiheadAttention)
                     for r in ran)
        if id(module.weight) in readers:
            found[name] = readers[id(module.weight)]
        elif inside:
            found[name] = "MultiheadAttention"  # F.multi_head_attention_forward reads out_proj.weight
    return found
