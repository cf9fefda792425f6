"""Helpers for tests and checks: reading TensorBoard event files back, and small networks and data that exercise the
int8 export beyond the digits demo (a Conv1d network on noisy sines, a Linear -> BatchNorm1d -> ReLU head)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


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


class Conv1dNet(nn.Module):
    """1-D signals: three Conv1d-BatchNorm-ReLU blocks, flatten, Linear."""

    def __init__(self, channels: int = 16, length: int = 32, classes: int = 4) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = 1
        for _ in range(3):
            blocks += [nn.Conv1d(width, channels, 5, padding=2), nn.BatchNorm1d(channels), nn.ReLU()]
            width = channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels * length, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class LinearBatchNormHead(nn.Module):
    """Flatten -> Linear -> BatchNorm1d -> ReLU -> Linear (8x8 inputs)."""

    def __init__(self, in_features: int = 64, hidden: int = 48, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def noisy_sines(count: int, seed: int, length: int = 32, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(signals (count, 1, length), labels)``: a sine whose frequency is the class, random phase, Gaussian noise.

    >>> x, y = noisy_sines(8, 0)
    >>> tuple(x.shape), int(y.max()) < 4
    ((8, 1, 32), True)
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (count,), generator=generator)
    t = torch.arange(length).float()
    phase = torch.rand(count, 1, generator=generator) * 6.28
    x = torch.sin((labels[:, None] + 1) * 0.35 * t + phase) + 0.6 * torch.randn(count, length, generator=generator)
    return x[:, None], labels


def train_briefly(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: int,
                  lr: float = 3e-3) -> nn.Module:
    """A plain Adam loop with cross-entropy (train mode), then eval mode: weights worth exporting, in seconds."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for inputs, targets in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return model.eval()


def digits_trained(build: Callable[[], nn.Module], epochs: int,
                   seed: int = 0) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, nn.Module]:
    """The digits training batches (batch 64), the test images, and the model ``build()`` makes after
    ``torch.manual_seed(seed)``, trained on those batches by :func:`train_briefly` for ``epochs`` (eval mode)."""
    from lightning_compress.demo import DigitsDataModule

    data = DigitsDataModule(batch_size=64, seed=seed)
    data.setup()
    batches = list(data.train_dataloader())
    test = torch.cat([batch[0] for batch in data.test_dataloader()])
    torch.manual_seed(seed)
    return batches, test, train_briefly(build(), batches, epochs)
