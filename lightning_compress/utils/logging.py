"""Logging through every logger of a Trainer, and rich data through TensorBoard when it is present.

``pl_module.log`` is the right call inside batch and epoch hooks; these helpers serve the hooks where it raises
(``on_fit_end``, ``on_train_end``, ``setup``) and the data it cannot carry (histograms, images, text).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


def _to_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def log_scalars(trainer: Trainer, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Send scalars to every logger of ``trainer`` with ``log_metrics`` (rank zero only)."""
    if not trainer.is_global_zero or not metrics:
        return
    step = trainer.global_step if step is None else step
    values = {key: _to_float(value) for key, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def tensorboard_writers(trainer: Trainer) -> Iterator[Any]:
    """Yield the ``SummaryWriter`` of every TensorBoard logger of ``trainer`` (rank zero only)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            yield logger.experiment


def log_histogram(trainer: Trainer, tag: str, values: torch.Tensor, step: int | None = None) -> None:
    """Write a histogram of ``values`` to TensorBoard, if a TensorBoard logger is attached."""
    step = trainer.global_step if step is None else step
    for writer in tensorboard_writers(trainer):
        writer.add_histogram(tag, values.detach().float().cpu(), global_step=step)


def log_image(trainer: Trainer, tag: str, image: torch.Tensor, step: int | None = None) -> None:
    """Write an image (``(H, W)`` or ``(C, H, W)`` in [0, 1]) to TensorBoard, if present."""
    step = trainer.global_step if step is None else step
    image = image.detach().float().cpu()
    if image.dim() == 2:
        image = image.unsqueeze(0)
    for writer in tensorboard_writers(trainer):
        writer.add_image(tag, image, global_step=step, dataformats="CHW")


def log_text(trainer: Trainer, tag: str, text: str, step: int | None = None) -> None:
    """Write Markdown text to TensorBoard, if present."""
    step = trainer.global_step if step is None else step
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, text, global_step=step)


def run_directory(trainer: Trainer) -> str:
    """The run's directory as ``trainer.log_dir`` gives it, without its broadcast (safe on one rank alone).

    ``trainer.log_dir`` is a collective call under DDP: code that runs on global rank zero only (writing a report
    at fit end) would wait forever for the other ranks.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return directory or trainer.default_root_dir
