"""Reading TensorBoard event files back, for tests and for checking what a run wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _accumulators(logdir: str | Path) -> list[Any]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    directories = sorted({path.parent for path in Path(logdir).rglob("events.out.tfevents.*")})
    accumulators = []
    for directory in directories:
        # The defaults keep only a sample of each series; 0 keeps everything.
        accumulator = EventAccumulator(
            str(directory), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
        )
        accumulator.Reload()
        accumulators.append(accumulator)
    return accumulators


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``logdir`` as ``{tag: [(step, value), ...]}``, sorted by step."""
    series: dict[str, list[tuple[int, float]]] = {}
    for accumulator in _accumulators(logdir):
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


def read_tags(logdir: str | Path) -> dict[str, set[str]]:
    """Tags by kind (``scalars``, ``histograms``, ``images``, ``tensors``) written under ``logdir``."""
    tags: dict[str, set[str]] = {"scalars": set(), "histograms": set(), "images": set(), "tensors": set()}
    for accumulator in _accumulators(logdir):
        for kind in tags:
            tags[kind].update(accumulator.Tags().get(kind, []))
    return tags


def read_text(logdir: str | Path, tag: str) -> list[str]:
    """Text summaries written with ``add_text`` under ``tag`` (TensorBoard stores them as tensors)."""
    texts: list[str] = []
    for accumulator in _accumulators(logdir):
        name = f"{tag}/text_summary"
        if name in accumulator.Tags().get("tensors", []):
            for event in accumulator.Tensors(name):
                texts.extend(value.decode() for value in event.tensor_proto.string_val)
    return texts
