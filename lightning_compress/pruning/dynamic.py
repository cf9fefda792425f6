"""Runtime (input-dependent) channel pruning: Feature Boosting and Suppression. Pure torch.

Gao et al., "Dynamic Channel Pruning: Feature Boosting and Suppression", ICLR 2019. For a gated convolution with
input ``x`` a small predictor ``g(x) = relu(fc(avgpool(x)))`` gives a non-negative saliency per output channel; the
winner-take-all ``pi(x) = wta_k(g(x))`` keeps the ``k = ceil(keep_ratio * C)`` largest saliencies of each sample and
zeroes the rest. The layer's output becomes ``(gamma * norm(conv(x)) + beta) * pi(x)``: the gate multiplies the
BatchNorm output (or the convolution output where no BatchNorm follows), so kept channels are boosted by their
saliency and the others suppressed to exactly zero. The top-k selection is not differentiated; the saliency values
are, so the predictor trains by ordinary gradients, with the paper's sparsity regulariser
``lambda * sum_l ||g_l(x)||_1`` added to the loss.

:class:`FeatureBoostingGates` holds the predictors (as extra parameters of the model, under ``dynamic_gates.``) and
runs them through hooks, so the user's modules and state_dict keys stay as they are. Two executions:

- dense (training, and the default): the convolution runs in full and its (normalised) output is multiplied by the
  gate; this is the computation the paper trains;
- sparse (:meth:`FeatureBoostingGates.sparse`, eval mode): each gated convolution computes only the selected output
  filters of each sample, reading only the input channels that the previous gated layer kept when those are the
  only non-zero channels of its input (found once by a probe, see :meth:`FeatureBoostingGates.prepare`). Each
  sample runs one smaller dense convolution over its own kept filters and input channels (or, with
  ``grouped=True``, all samples run as one grouped convolution with ``groups=B``, which oneDNN executes slower);
  BatchNorm is folded into a per-channel scale and shift; the result is scattered back into a dense tensor for the
  layers in between (ReLU, pooling), whose cost is elementwise. A layer whose convolution output is read by more
  than its BatchNorm (a skip connection, or the output returned) cannot skip filters: it runs densely, gated as in
  training (listed in :attr:`FeatureBoostingGates.dense_layers`), so outputs equal dense execution.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_compress.pruning.dynamic_ops import (
    ChannelSaliency,
    GatedConv,
    _folded_affine,
    keep_count,
    sparse_gated_conv,
    winner_take_all,
)
from lightning_compress.utils.data import probe_forward

__all__ = ["GATES_ATTRIBUTE", "ChannelSaliency", "FeatureBoostingGates", "keep_count", "sparse_gated_conv",
           "winner_take_all"]

#: Attribute of the gated network under which the gates (and their state_dict keys) live.
GATES_ATTRIBUTE = "dynamic_gates"
GATE_POSITIONS = ("batchnorm", "conv")


def _key(name: str) -> str:
    return name.replace(".", "__")


def _identity(x: Tensor) -> Tensor:
    return x


class FeatureBoostingGates(nn.Module):
    """FBS gates on chosen convolutions of a network (Gao et al., ICLR 2019), installed by hooks.

    Args:
        layers: ``{qualified name: conv}`` of the network to gate (ungrouped ``Conv1d``/``Conv2d``, zero padding).
        keep_ratio: fraction of each layer's output channels kept per sample, in (0, 1].
        gate_after: ``"batchnorm"`` multiplies the output of the BatchNorm that directly consumes the convolution
            and normalises nothing else (found by tracing the first forward; the convolution itself where there is
            none, e.g. a BatchNorm shared by two branches), as in the paper; ``"conv"`` multiplies the convolution
            output.

    Raises:
        ValueError: for a bad ``keep_ratio`` or ``gate_after``, or a layer that is not an ungrouped, zero-padded
            ``Conv1d``/``Conv2d``.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
    >>> gates = FeatureBoostingGates({"0": net[0], "3": net[3]}, keep_ratio=0.5).attach(net)
    >>> _ = net.eval()
    >>> dense = net(torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)))
    >>> with gates.sparse_execution():
    ...     sparse = net(torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)))
    >>> gates.positions, gates.sources, bool((dense - sparse).abs().max() < 1e-5)
    ({'0': '1', '3': '3'}, {'0': None, '3': '0'}, True)
    """

    _model: nn.Module | None

    def __init__(self, layers: dict[str, nn.Module], keep_ratio: float, gate_after: str = "batchnorm") -> None:
        super().__init__()
        if gate_after not in GATE_POSITIONS:
            raise ValueError(f"gate_after must be one of {GATE_POSITIONS}, got {gate_after!r}.")
        convs: dict[str, GatedConv] = {}
        for name, conv in layers.items():
            if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or conv.groups != 1 or conv.padding_mode != "zeros":
                raise ValueError(f"Layer {name!r} cannot be gated: FBS gates ungrouped, zero-padded Conv1d/Conv2d "
                                 f"layers, got {conv}.")
            convs[name] = conv
        self.keep_ratio = keep_ratio
        self.gate_after = gate_after
        self.layer_names = list(layers)
        self.channels = {name: conv.out_channels for name, conv in convs.items()}
        self.k = {name: keep_count(keep_ratio, conv.out_channels) for name, conv in convs.items()}
        self.predictors = nn.ModuleDict({_key(n): ChannelSaliency(c.in_channels, c.out_channels)
                                         for n, c in convs.items()})
        self.positions: dict[str, str] = {}  # gated conv -> module whose output the gate multiplies
        self.dense_layers: list[str] = []  # gated after a BatchNorm that is not their output's only reader
        self.sources: dict[str, str | None] | None = None  # gated conv -> gated layer whose kept channels it reads
        self.executing_sparse = False
        self.grouped = False  # batching of sparse execution, see sparse_gated_conv
        self.collect_regularizer = False
        object.__setattr__(self, "_model", None)  # not a submodule: no cycle in named_modules
        self._handles: list[Any] = []
        self._gate: dict[str, Tensor] = {}
        self._index: dict[str, Tensor] = {}
        self._pending_l1: list[Tensor] = []
        self._probe: dict[str, Any] | None = None
        self._busy = self._overridden = self._warned_dense = False
        self._sparse_modules: dict[str, tuple[GatedConv, _BatchNorm | None]] = {}
        self._affine_cache: dict[str, tuple[tuple[int, ...], Tensor, Tensor]] = {}
        self.reset_statistics()

    def forward(self, x: Any) -> Any:
        """Pass-through, so that containers calling every child (``nn.Sequential``) are unaffected."""
        return x

    # -- installation -----------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> FeatureBoostingGates:
        """Register as ``model.dynamic_gates`` (extra state_dict keys) and install the hooks."""
        if hasattr(model, GATES_ATTRIBUTE):
            raise ValueError(f"{type(model).__name__} already has an attribute {GATES_ATTRIBUTE!r}.")
        modules = dict(model.named_modules())
        model.add_module(GATES_ATTRIBUTE, self)
        object.__setattr__(self, "_model", model)
        self._handles.append(model.register_forward_pre_hook(self._before_model))
        for name in self.layer_names:
            self._handles.append(modules[name].register_forward_pre_hook(partial(self._before_conv, name)))
        return self

    def remove(self) -> None:
        """Undo :meth:`attach`: dense execution, hooks removed, the model's own modules and keys only."""
        self.sparse(False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._model is not None and getattr(self._model, GATES_ATTRIBUTE, None) is self:
            delattr(self._model, GATES_ATTRIBUTE)
        object.__setattr__(self, "_model", None)
        self.positions, self.sources, self.dense_layers = {}, None, []

    def _modules_by_name(self) -> dict[str, nn.Module]:
        if self._model is None:
            raise RuntimeError("The gates are not attached to a model; call attach(model) first.")
        return dict(self._model.named_modules())

    def _place(self, args: tuple[Any, ...]) -> None:
        """Choose the module whose output each gate multiplies (traced BatchNorm, or the convolution), and the
        layers whose BatchNorm cannot be folded in sparse execution (not their convolution output's only reader)."""
        found: dict[str, tuple[str, bool]] = {}
        if self.gate_after == "batchnorm":
            from lightning_compress.graph.batchnorm import batchnorm_links

            self._busy = True
            try:
                found = batchnorm_links(self._model, args, self.layer_names)  # type: ignore[arg-type]
            finally:
                self._busy = False
        modules = self._modules_by_name()
        self.positions = {name: found[name][0] if name in found else name for name in self.layer_names}
        self.dense_layers = [name for name in self.layer_names if name in found and not found[name][1]]
        for name, position in self.positions.items():
            self._handles.append(modules[position].register_forward_hook(partial(self._after_position, name)))

    # -- dense (training) execution ---------------------------------------------------------------------------
    def _before_model(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        if self._busy:
            return
        self._gate.clear()
        self._index.clear()
        if not self.positions:
            self._place(args)
        if self.executing_sparse and not self._overridden:
            if self.sources is None:
                self.prepare(args)
            self._override()

    def _before_conv(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if name in self._sparse_modules or (self._busy and self._probe is None):
            return
        x = args[0]
        if self._probe is not None:  # random keep sets: which later inputs are zero exactly where these are off
            scores = torch.rand(x.shape[0], self.channels[name], generator=self._probe["generator"]).to(x.device)
            gate = (winner_take_all(scores, self.k[name])[0] > 0).to(x.dtype)
            self._probe["kept"][name], self._probe["inputs"][name] = gate.bool(), x
            self._probe["order"].append(name)
        else:
            saliency = self.predictors[_key(name)](x)
            gate, index = winner_take_all(saliency, self.k[name])
            if self._overridden:  # a dense layer in sparse execution: later layers may read only its kept channels
                self._index[name] = index
            if module.training and torch.is_grad_enabled():
                l1 = saliency.abs().sum(dim=1).mean()
                if self.collect_regularizer:
                    self._pending_l1.append(l1)
                stats = self._stats[name]
                stats[0] += float((gate.detach() > 0).float().mean())
                stats[1] += float(l1.detach())
                stats[2] += 1
        self._gate[name] = gate

    def _after_position(self, name: str, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        gate = self._gate.pop(name, None)
        if gate is None:
            return None
        return output * gate.view(*gate.shape, *([1] * (output.dim() - 2)))

    def regularization_loss(self) -> Tensor | None:
        """The paper's sparsity term ``sum_l mean_batch ||g_l(x)||_1`` over the training forwards since the last
        call (collected while ``collect_regularizer`` is set), or ``None``; clears it."""
        pending, self._pending_l1 = self._pending_l1, []
        return torch.stack(pending).sum() if pending else None

    def reset_statistics(self) -> None:
        self._stats = {name: [0.0, 0.0, 0] for name in self.layer_names}  # kept fraction, L1, forwards

    def statistics(self) -> dict[str, float]:
        """Averages over the training forwards since :meth:`reset_statistics`: ``keep_ratio`` (non-zero gates,
        weighted by channels), ``saliency_l1`` (summed over layers) and ``sparsity/<layer>``."""
        result: dict[str, float] = {}
        kept = channels = l1 = 0.0
        for name, (kept_sum, l1_sum, count) in self._stats.items():
            if count:
                size = self.channels[name]
                kept, channels, l1 = kept + kept_sum / count * size, channels + size, l1 + l1_sum / count
                result[f"sparsity/{name}"] = 1.0 - kept_sum / count
        if channels:
            result["keep_ratio"], result["saliency_l1"] = kept / channels, l1
        return result

    # -- sparse (inference) execution -------------------------------------------------------------------------
    def sparse(self, enabled: bool = True, example_inputs: Any = None) -> FeatureBoostingGates:
        """Switch the gated layers to sparse execution (eval mode only) or back to dense.

        Args:
            enabled: sparse (``True``) or dense execution.
            example_inputs: a batch to run :meth:`prepare` on now (otherwise the first sparse forward's batch).
        """
        if enabled and example_inputs is not None:
            self.prepare(example_inputs)
        if not enabled and self._overridden:
            self._restore()
        self.executing_sparse = enabled
        return self

    @contextmanager
    def sparse_execution(self, example_inputs: Any = None) -> Iterator[FeatureBoostingGates]:
        """Sparse execution inside the ``with`` block, the previous execution after it."""
        previous = self.executing_sparse
        self.sparse(True, example_inputs)
        try:
            yield self
        finally:
            self.sparse(previous)

    @torch.no_grad()
    def prepare(self, example_inputs: Any) -> dict[str, str | None]:
        """Find which gated layer's kept channels are the only non-zero input channels of each gated conv.

        A probe forward (eval mode) gates every layer with random per-sample keep sets; a conv reads only the
        channels kept by an earlier gated layer ``G`` if its input is exactly zero wherever ``G`` suppressed (true
        through ReLU and pooling, false across a residual addition). The latest such ``G`` becomes its source.
        Use a batch of several samples.
        """
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        model = self._model
        if model is None:
            raise RuntimeError("The gates are not attached to a model; call attach(model) first.")
        if not self.positions:
            self._place(args)
        overridden = self._overridden
        if overridden:
            self._restore()
        self._probe = {"kept": {}, "inputs": {}, "order": [], "generator": torch.Generator().manual_seed(0)}
        self._busy = True
        try:
            probe_forward(model, args)
        finally:
            probe, self._probe, self._busy = self._probe, None, False
            self._gate.clear()
            if overridden:
                self._override()
        sources: dict[str, str | None] = {}
        for position, name in enumerate(probe["order"]):
            peak = probe["inputs"][name].flatten(2).abs().amax(dim=2)  # (B, C_in)
            sources[name] = next((earlier for earlier in reversed(probe["order"][:position])
                                  if probe["kept"][earlier].shape == peak.shape
                                  and bool((peak[~probe["kept"][earlier]] == 0).all())), None)
        self.sources = {name: sources.get(name) for name in self.layer_names}
        return self.sources

    def _override(self) -> None:
        """Replace the forward of every gated conv (and its folded BatchNorm) by sparse execution, except the
        :attr:`dense_layers`, whose convolution output other operations read too: they stay dense, gated by hooks."""
        modules = self._modules_by_name()
        for name in self.layer_names:
            conv, position = modules[name], modules[self.positions[name]]
            assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
            if name in self.dense_layers:
                continue
            norm = None if position is conv else position
            if norm is not None and (not isinstance(norm, _BatchNorm) or norm.running_var is None):
                raise ValueError(f"Sparse execution folds the BatchNorm after {name!r}, which needs running "
                                 "statistics (track_running_stats=True).")
            conv.forward = partial(self._sparse_forward, name)  # type: ignore[method-assign]
            if norm is not None:
                norm.forward = _identity  # type: ignore[method-assign,assignment]
            self._sparse_modules[name] = (conv, norm)
        self._overridden = True
        if self.dense_layers and not self._warned_dense:
            self._warned_dense = True
            warnings.warn(f"Sparse execution runs the gated layers {self.dense_layers} densely: their convolution "
                          "output is read by more than the BatchNorm the gate follows, so no filter can be skipped.",
                          stacklevel=2)

    def _restore(self) -> None:
        for conv, norm in self._sparse_modules.values():
            for module in (conv, norm):
                if module is not None:
                    module.__dict__.pop("forward", None)
        self._sparse_modules.clear()
        self._overridden = False

    def _sparse_forward(self, name: str, x: Tensor) -> Tensor:
        conv, norm = self._sparse_modules[name]
        if conv.training:
            raise RuntimeError("Sparse execution runs in eval mode: call model.eval(), or gates.sparse(False) to "
                               "train.")
        values, index = self.predictors[_key(name)](x).topk(self.k[name], dim=1)
        source = (self.sources or {}).get(name)
        in_index = self._index.get(source) if source is not None else None
        scale, shift = self._affine(name, conv, norm)
        self._index[name] = index
        return sparse_gated_conv(conv, x, index, values, scale, shift, in_index, self.grouped)

    def _affine(self, name: str, conv: GatedConv, norm: _BatchNorm | None) -> tuple[Tensor, Tensor]:
        """The folded BatchNorm, recomputed whenever one of its tensors changed (their version counters)."""
        tensors = [t for t in (conv.bias, *((norm.weight, norm.bias, norm.running_mean, norm.running_var)
                                            if norm is not None else ())) if t is not None]
        versions = tuple(t._version for t in tensors)
        cached = self._affine_cache.get(name)
        if cached is None or cached[0] != versions:
            cached = self._affine_cache[name] = (versions, *_folded_affine(conv, norm))
        return cached[1], cached[2]

    def executed_macs(self, example_inputs: Any) -> int:
        """Multiply-adds per input that sparse execution runs (counted by ``torch.utils.flop_counter`` on the first
        sample; predictors included). Every sample executes the same count: ``k`` filters per gated layer."""
        from lightning_compress.measure import count_macs

        if self.sources is None:
            self.prepare(example_inputs)
        with self.sparse_execution():
            return count_macs(self._model, example_inputs)[0]  # type: ignore[arg-type]
