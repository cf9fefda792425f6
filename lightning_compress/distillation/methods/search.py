"""Teacher-guided student search: the accuracy / multiply-adds Pareto front of distilled students.

Liu et al. ("Search to Distill: Pearls are Everywhere but not the Eyes", CVPR 2020) observed that the best
student architecture depends on the teacher, and ranked candidates by their accuracy *under distillation* (with a
reinforcement-learning controller over a large space). Trofimov et al. ("Multi-fidelity Neural Architecture Search
with Knowledge Distillation", 2021) showed that short distilled trainings are a useful cheap fidelity for ranking
candidates. This module keeps both ideas and none of the controller: it is an exhaustive **grid search** over a
small space (e.g. ``ResidualCNN`` width x depth). Each candidate is built, trained briefly with distillation from
the teacher, scored on the validation split and its multiply-adds per sample counted
(:func:`~lightning_compress.measure.count_macs`); the result is the set of candidates no other one beats on both
accuracy and multiply-adds (:func:`pareto_front`). Grid cost grows with the product of the value counts, and a
brief training ranks candidates only roughly: retrain the chosen one fully.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress.distillation.module import DistillationModule
from lightning_compress.measure import count_macs, count_parameters

__all__ = ["Candidate", "SearchResult", "distill_and_score", "grid", "pareto_front", "search_students"]

SPLITS = ("val", "test")
_QUIET_TRAINER: dict[str, Any] = {
    "max_epochs": 2, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
    "enable_model_summary": False, "num_sanity_val_steps": 0, "accelerator": "cpu", "devices": 1,
}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(accuracy, macs)`` points that no other point dominates, by increasing multiply-adds.

    A point dominates another when its accuracy is at least as high and its multiply-adds at most as many, and it
    is strictly better in one of the two. Equal points do not dominate each other (both stay on the front).

    Args:
        points: ``(accuracy, macs)`` pairs; higher accuracy and fewer multiply-adds are better.

    Raises:
        ValueError: for a pair of another length, a NaN accuracy, or negative / NaN multiply-adds.

    >>> pareto_front([(0.90, 100), (0.95, 300), (0.93, 400), (0.80, 50), (0.85, 100)])
    [3, 0, 1]
    """
    checked: list[tuple[float, float]] = []
    for index, point in enumerate(points):
        if len(point) != 2:
            raise ValueError(f"points[{index}] must be an (accuracy, macs) pair, got {point!r}.")
        accuracy, macs = float(point[0]), float(point[1])
        if math.isnan(accuracy):
            raise ValueError(f"points[{index}] has a NaN accuracy: {point!r}.")
        if not macs >= 0:
            raise ValueError(f"points[{index}] must have non-negative multiply-adds, got {point!r}.")
        checked.append((accuracy, macs))

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    front = [i for i, p in enumerate(checked) if not any(dominates(q, p) for q in checked)]
    return sorted(front, key=lambda i: (checked[i][1], -checked[i][0], i))


def grid(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the values in ``space`` (``{argument: values}``), in the order of the values.

    Raises:
        ValueError: for an empty space or an argument without values.

    >>> grid({"width": [4, 8], "depth": [1]})
    [{'width': 4, 'depth': 1}, {'width': 8, 'depth': 1}]
    """
    if not space:
        raise ValueError("space must name at least one argument, e.g. {'width': [4, 8, 16]}.")
    for name, values in space.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"space[{name!r}] must be a non-empty list of values, got {values!r}.")
    names = list(space)
    return [dict(zip(names, combination, strict=True)) for combination in itertools.product(*space.values())]


@dataclass
class Candidate:
    """One searched student: its constructor arguments, score and cost."""

    config: dict[str, Any]
    accuracy: float
    macs: int
    parameters: int
    on_front: bool = False


@dataclass
class SearchResult:
    """Every candidate (grid order) and the Pareto front (by increasing multiply-adds)."""

    candidates: list[Candidate]
    front: list[Candidate] = field(default_factory=list)
    split: str = "val"

    def table(self, front_only: bool = True) -> str:
        """A Markdown table of the front (or of every candidate, front members marked)."""
        rows = sorted(self.front if front_only else self.candidates, key=lambda c: (c.macs, -c.accuracy))
        names = list(rows[0].config) if rows else []
        head = [*names, f"{self.split} accuracy", "multiply-adds", "parameters"] + ([] if front_only else ["front"])
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for c in rows:
            cells = [str(c.config[n]) for n in names] + [f"{c.accuracy:.4f}", f"{c.macs:,}", f"{c.parameters:,}"]
            lines.append("| " + " | ".join(cells + ([] if front_only else ["yes" if c.on_front else ""])) + " |")
        return "\n".join(lines)


def _example_input(datamodule: pl.LightningDataModule) -> Any:
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return batch[0][:1] if isinstance(batch, (list, tuple)) else batch[:1]


def distill_and_score(
    student: nn.Module,
    teacher: nn.Module,
    datamodule: pl.LightningDataModule,
    *,
    split: str = "val",
    distill_kwargs: Mapping[str, Any] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> float:
    """The default brief training of :func:`search_students`: ``DistillationModule(student, teacher,
    **distill_kwargs)`` fitted by a quiet ``Trainer(**trainer_kwargs)`` (2 epochs, no logger or checkpoints unless
    overridden), then the ``<split>/acc`` of ``trainer.validate`` or ``trainer.test``."""
    module = DistillationModule(student, teacher, **dict(distill_kwargs or {}))
    trainer = pl.Trainer(**{**_QUIET_TRAINER, **dict(trainer_kwargs or {})})
    trainer.fit(module, datamodule)
    evaluate = trainer.validate if split == "val" else trainer.test
    return float(evaluate(module, datamodule, verbose=False)[0][f"{split}/acc"])


def search_students(
    teacher: nn.Module,
    build: Callable[..., nn.Module],
    space: Mapping[str, Sequence[Any]],
    datamodule: pl.LightningDataModule,
    *,
    distill_kwargs: Mapping[str, Any] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    split: str = "val",
    example_input: Any = None,
    seed: int | None = 0,
    score: Callable[[nn.Module, nn.Module], float] | None = None,
) -> SearchResult:
    """Grid search over students ``build(**config)`` for ``config`` in :func:`grid` ``(space)``: train each briefly
    with distillation from ``teacher``, measure its accuracy and multiply-adds, return the Pareto front.

    A grid search, not a learned controller (see the module docstring: Liu et al. 2020; Trofimov et al. 2021).
    Score on the validation split (the default) so that the test split stays untouched by the choice.

    Args:
        teacher: the trained teacher (frozen by ``DistillationModule``; not changed).
        build: builds a fresh student from one configuration, e.g. ``ResidualCNN`` (``build(width=8, depth=2)``).
        space: ``{argument of build: values}``, e.g. ``{"width": [4, 8, 16], "depth": [1, 2]}``.
        datamodule: the training data (and the ``split`` to score on).
        distill_kwargs: ``DistillationModule`` arguments (``soft_weight``, ``temperature``, ``lr``, ...).
        trainer_kwargs: ``Trainer`` arguments overriding the quiet defaults (``max_epochs=2``, no logger, no
            checkpoints), e.g. ``{"max_epochs": 5, "limit_train_batches": 10}``.
        split: ``"val"`` or ``"test"``: where accuracy is measured.
        example_input: one input batch for :func:`~lightning_compress.measure.count_macs` (default the first
            sample of the first training batch).
        seed: ``lightning.seed_everything(seed)`` before building each candidate (same initialisation stream and
            data order for every candidate); ``None`` does not seed.
        score: replaces the default training (:func:`distill_and_score` with the arguments above):
            ``score(student, teacher) -> accuracy``, e.g. a longer schedule or another distillation module.

    Returns:
        A :class:`SearchResult`: every :class:`Candidate` (``config``, ``accuracy``, ``macs``, ``parameters``,
        ``on_front``) and the front by increasing multiply-adds; ``result.table()`` formats it.

    Raises:
        ValueError: for an empty space or an argument without values, an unknown ``split``, a ``build`` that
            rejects a configuration (naming it), and the errors of ``DistillationModule`` (e.g. a student with
            another number of classes).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    configs = grid(space)
    if example_input is None:
        example_input = _example_input(datamodule)
    if score is None:
        def score(student: nn.Module, teacher: nn.Module) -> float:
            return distill_and_score(student, teacher, datamodule, split=split, distill_kwargs=distill_kwargs,
                                     trainer_kwargs=trainer_kwargs)
    candidates = []
    for config in configs:
        if seed is not None:
            pl.seed_everything(seed, verbose=False)
        try:
            student = build(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"build rejected the configuration {config}: {err}") from err
        macs = count_macs(student, example_input)[0]  # before training: the architecture's cost
        accuracy = float(score(student, teacher))
        candidates.append(Candidate(dict(config), accuracy, int(macs), count_parameters(student)))
    front_indices = pareto_front([(c.accuracy, c.macs) for c in candidates])
    for index in front_indices:
        candidates[index].on_front = True
    return SearchResult(candidates, [candidates[i] for i in front_indices], split)
