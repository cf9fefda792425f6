"""MagnitudePruning: unstructured (fine-grained), vector and kernel pruning, by threshold or target sparsity shared
among layers by ERK, uniformly or globally, and Dynamic Network Surgery splicing."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_compress.pruning.callback_base import PruningCallback
from lightning_compress.pruning.criteria import (
    check_sparsity,
    check_splicing_decay,
    global_magnitude_masks,
    magnitude_mask,
    splicing_mask,
    splicing_probability,
    splicing_thresholds,
    threshold_mask,
)
from lightning_compress.pruning.distributions import erk_sparsities
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.pruning.structured import check_p, kernel_mask, vector_mask
from lightning_compress.pruning.transformer_layers import check_exclude_matches, transformer_aware_layers

METHODS = ("magnitude", "threshold", "splicing")
GRANULARITIES = ("element", "vector", "kernel")
SCOPES = ("layer", "global", "erk")


class MagnitudePruning(PruningCallback):
    """Prune the smallest weights of the chosen layers, and keep them pruned through training.

    Methods:

    - ``"magnitude"``: the smallest ``|w|``, ``round(s * n)`` of a layer's ``n`` weights for its share ``s``.
      ``scope`` says how ``sparsity`` is shared: ``"erk"`` (the default) gives each layer the Erdős-Rényi-Kernel share
      (Evci et al., ICML 2020; :func:`~.distributions.erk_sparsities`): small layers such as a first or depthwise
      convolution keep more, large ones give up more, the chosen layers together reach ``sparsity``, and no layer
      is emptied; ``"layer"`` prunes every layer by ``sparsity`` (Zhu & Gupta 2017); ``"global"`` ranks all chosen
      layers' weights together (Lightning's ``ModelPruning`` default; it can empty a layer whose weights are small,
      e.g. MobileNetV3's and EfficientNet-B0's at initialisation). ``granularity`` ``"vector"`` (a row inside a
      kernel) or ``"kernel"`` (one ``k x k`` kernel) ranks those units by Lp norm instead. Pruned weights stay zero
      after every optimizer step.
    - ``"threshold"``: prune ``|w| < threshold`` (fixed); ``sparsity`` is then only reported.
    - ``"splicing"``: Dynamic Network Surgery (Guo et al., NeurIPS 2016). The mask is
      ``h(w) = 0 if |w| < a, previous if a <= |w| < b, 1 if |w| >= b`` on the *unmasked* weights; every weight,
      pruned or not, receives the gradient of the masked product, so pruned weights return when they grow past ``b``.
      ``a, b`` are fixed or, with ``a=b=None``, ``0.9 / 1.1 * max(mu + c sigma, 0)`` of ``|w|`` per layer as in the
      official code; masks are updated after a step with probability ``(1 + gamma * step) ** -power``. The unmasked
      values live in this callback's checkpoint state (one extra copy per layer); the model holds the masked ones.

    BatchNorm layers and biases are never pruned; the final classifier (last layer in execution order) is skipped
    unless ``prune_classifier``; embeddings (:func:`~.transformer_layers.is_embedding`: tied to an ``nn.Embedding`` or
    named ``*embed*``) unless ``prune_embeddings``. The fused Q/K/V weight of each ``nn.MultiheadAttention`` is pruned
    as ``<name>.in_proj`` (its ``out_proj`` is a Linear). An ``exclude`` pattern matching no module is an error.

    Args:
        sparsity: target fraction of weights pruned, in [0, 1).
        method: ``"magnitude"``, ``"threshold"`` or ``"splicing"``.
        granularity: ``"element"``, ``"vector"`` or ``"kernel"`` (magnitude method).
        scope: ``"erk"``, ``"layer"`` or ``"global"`` (``"global"`` needs element granularity). The default
            ``"erk"`` met "within 1 point of dense" for 80% sparsity on the shapes workload where ``"layer"`` lost up
            to 1.4 points on average (README "Pruning defaults on the shapes workload").
        threshold: ``|w|`` below which weights are pruned (threshold method).
        p: norm for vector and kernel scores (1 or 2).
        a: lower splicing threshold (with ``b``), or ``None`` for the statistics rule.
        b: upper splicing threshold.
        c: the statistics rule's ``mu + c * sigma``.
        gamma: splicing update probability decay.
        power: splicing update probability exponent.
        seed: seeds the splicing update draws (the same on every rank, reproducible on resume).
        schedule: progress towards ``sparsity`` (magnitude method). Default: AGP (Zhu & Gupta 2017) from epoch 0 to
            ``recovery_epochs`` before the end of the fit; then the masks are fixed and the remaining epochs recover.
        layers: names or regexes of layers to prune.
        types: layer types considered.
        exclude: names or regexes to skip.
        prune_classifier: also prune the last layer.
        log_histograms: per-layer sparsity histogram in TensorBoard.
        recovery_epochs: epochs trained with the final masks at the end of the fit (magnitude method; ``None``: a
            third of ``max_epochs``, rounded up); with a ``schedule`` given, the masks are fixed when it ends, and a
            warning says when it leaves fewer recovery epochs.
        prune_embeddings: also prune embedding layers.

    Raises:
        ValueError: for a sparsity outside [0, 1), an unknown method, granularity or scope, ``p`` not in {1, 2},
            a negative threshold, ``a >= b``, only one of ``a`` and ``b``, a negative or non-finite ``gamma`` or
            ``power``, a schedule with the threshold method, or ``recovery_epochs`` that is not an integer >= 0
            or comes with another method than magnitude.

    Example (YAML)::

        - class_path: lightning_compress.MagnitudePruning
          init_args:
            sparsity: 0.8
            scope: global
            schedule: {class_path: lightning_compress.pruning.schedules.AGP, init_args: {start: 0, end: 8}}
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        method: str = "magnitude",
        granularity: str = "element",
        scope: str = "erk",
        threshold: float | None = None,
        p: int = 2,
        a: float | None = None,
        b: float | None = None,
        c: float = 0.0,
        gamma: float = 1e-4,
        power: float = 1.0,
        seed: int = 0,
        schedule: Schedule | None = None,
        layers: str | list[str] | None = None,
        types: list[str] | None = None,
        exclude: str | list[str] | None = None,
        prune_classifier: bool = False,
        log_histograms: bool = True,
        recovery_epochs: int | None = None,
        prune_embeddings: bool = False,
    ) -> None:
        check_sparsity(sparsity)
        if method != "magnitude" and recovery_epochs is not None:
            raise ValueError(f"recovery_epochs paces the magnitude method's schedule; method={method!r} has none, "
                             f"got recovery_epochs={recovery_epochs!r}.")
        for name, value, allowed in (("method", method, METHODS), ("granularity", granularity, GRANULARITIES),
                                     ("scope", scope, SCOPES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        check_p(p)
        if method == "threshold" and (threshold is None or not threshold >= 0):
            raise ValueError(f"method='threshold' needs a threshold >= 0, got threshold={threshold!r}.")
        if method == "threshold" and schedule is not None:
            raise ValueError(f"method='threshold' prunes |w| < threshold from the start; a schedule does not apply "
                             f"(it paces sparsity for method='magnitude'), got schedule={schedule!r}.")
        check_splicing_decay(gamma, power)
        if (a is None) != (b is None):
            raise ValueError(f"Give both splicing thresholds a and b, or neither; got a={a!r}, b={b!r}.")
        if a is not None and b is not None and not 0 <= a < b:
            raise ValueError(f"Splicing needs 0 <= a < b, got a={a!r}, b={b!r}.")
        if granularity != "element" and scope == "global":
            raise ValueError(f"scope='global' ranks single weights; use granularity='element', got {granularity!r}.")
        if method != "magnitude" and granularity != "element":
            raise ValueError(f"granularity={granularity!r} needs method='magnitude', got method={method!r}.")
        self.recovers = method == "magnitude"  # threshold and splicing prune from the start
        super().__init__(sparsity, schedule, layers, types or ["Conv1d", "Conv2d", "Linear"], exclude,
                         prune_classifier, log_histograms, recovery_epochs)
        self.method, self.granularity, self.scope = method, granularity, scope
        self.threshold, self.p = threshold, p
        self.a, self.b, self.c, self.gamma, self.power, self.seed = a, b, c, gamma, power, seed
        self.dense: dict[str, torch.Tensor] = {}  # splicing: the unmasked weights
        self.thresholds: dict[str, tuple[float, float]] = {}
        self.revived = 0
        self.prune_embeddings = prune_embeddings

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the layers (base class), then apply the transformer rules of :mod:`~.transformer_layers`."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        check_exclude_matches(self._target, self.exclude, type(self).__name__)
        self._modules = transformer_aware_layers(self._target, self._modules, self.layers, self.exclude,
                                                 self.prune_embeddings)
        if not self._modules:
            raise ValueError(f"{type(self).__name__} found nothing to prune in {type(self._target).__name__} but "
                             "embeddings; set prune_embeddings=True to prune them.")

    def validate_layers(self, modules: dict[str, Any]) -> None:
        if self.granularity in ("vector", "kernel"):
            flat = [name for name, module in modules.items() if module.weight.dim() < 3]
            if flat:
                raise ValueError(f"granularity={self.granularity!r} needs convolution weights; {flat} have none.")

    # -- masks ------------------------------------------------------------------------------------------------
    def compute_masks(self, modules: dict[str, Any], sparsity: float, position: int) -> dict[str, torch.Tensor]:
        weights = {name: module.weight.detach() for name, module in modules.items()}
        if self.method == "threshold":
            return {name: threshold_mask(w, self.threshold or 0.0) for name, w in weights.items()}
        if self.method == "splicing":
            return self._splicing_masks()
        if self.scope == "global":
            return global_magnitude_masks(weights, sparsity)  # type: ignore[return-value]
        shares = (erk_sparsities({name: w.shape for name, w in weights.items()}, sparsity) if self.scope == "erk"
                  else dict.fromkeys(weights, sparsity))
        mask_fn = {"element": magnitude_mask, "vector": lambda w, s: vector_mask(w, s, self.p),
                   "kernel": lambda w, s: kernel_mask(w, s, self.p)}[self.granularity]
        return {name: mask_fn(w, shares[name]) for name, w in weights.items()}

    def target_at(self, position: int) -> float:
        return 0.0 if self.method != "magnitude" else super().target_at(position)

    # -- splicing ---------------------------------------------------------------------------------------------
    def _splicing_masks(self) -> dict[str, torch.Tensor]:
        if not self.dense:
            self.dense = {name: m.weight.detach().clone() for name, m in self._modules.items()}
        masks = {}
        for name, dense in self.dense.items():
            if self.a is not None and self.b is not None:
                a, b = self.a, self.b
            else:
                a, b = self.thresholds.get(name) or splicing_thresholds(dense, self.c)
            self.thresholds[name] = (a, b)
            previous = self.masks.get(name)
            masks[name] = splicing_mask(dense, a, b, previous.to(dense.device) if previous is not None else None)
            if previous is not None:
                self.revived += int((masks[name].cpu() & ~previous).sum())
        return masks

    def after_step(self, trainer: pl.Trainer) -> None:
        if self.method != "splicing" or not self.masks:
            self.enforce()
            return
        with torch.no_grad():
            for name, module in self._modules.items():
                # Pruned entries held 0 before the step, so the parameter now holds exactly their update.
                mask = self.masks[name].to(module.weight.device)
                dense = self.dense[name].to(module.weight.device)
                self.dense[name] = torch.where(mask, module.weight, dense + module.weight)
        draw = torch.rand((), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step))
        if float(draw) < splicing_probability(trainer.global_step, self.gamma, self.power):
            masks = self._splicing_masks()
            self.masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        with torch.no_grad():
            for name, module in self._modules.items():
                module.weight.copy_(self.dense[name] * self.masks[name].to(module.weight.device))

    # -- logging and state ------------------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, float]:
        metrics = super().epoch_metrics()
        if self.method == "splicing":
            metrics["prune/revived"] = float(self.revived)
            self.revived = 0
        for name, (a, b) in self.thresholds.items():
            metrics[f"prune/threshold_a/{name}"] = a
            metrics[f"prune/threshold_b/{name}"] = b
        if self.method == "threshold":
            metrics.update({f"prune/threshold/{name}": float(self.threshold or 0.0) for name in self._modules})
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(dense={k: v.detach().cpu().clone() for k, v in self.dense.items()},
                     thresholds=dict(self.thresholds), revived=self.revived)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.dense = dict(state_dict.get("dense", {}))
        self.thresholds = {k: tuple(v) for k, v in state_dict.get("thresholds", {}).items()}
        self.revived = state_dict.get("revived", 0)
