"""Tasks made from one data set by class, for lifelong learning: :class:`TaskSplitDataModule`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["TaskSplitDataModule"]


class _ClassSubset(Dataset):
    """The samples of ``dataset`` whose label is in ``classes``, relabelled ``classes[i] -> i``."""

    def __init__(self, dataset: Dataset, classes: Sequence[int]) -> None:
        self.dataset = dataset
        self.mapping = {int(c): i for i, c in enumerate(classes)}
        tensors = getattr(dataset, "tensors", None)
        labels = tensors[1].tolist() if tensors is not None else [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
        self.indices = [i for i, label in enumerate(labels) if int(label) in self.mapping]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        inputs, label = self.dataset[self.indices[index]][:2]
        return inputs, torch.tensor(self.mapping[int(label)])


class TaskSplitDataModule(pl.LightningDataModule):
    """One task of a class-split data set: the samples whose labels are in ``classes``, relabelled
    ``classes[i] -> i`` (so a task's labels start at 0, as a task head expects).

    The splits come from ``base`` (a data module exposing ``train_set``, ``val_set`` and ``test_set`` after
    ``setup``; default the digits, :class:`~lightning_compress.demo.DigitsDataModule`), so two tasks built with the
    same ``seed`` share one train/val/test split. With ``old_classes``, the validation and test loaders are
    ``[this task, old task]``: the layout :class:`LwFModule` scores on its new and old heads.

    Args:
        classes: the labels of this task, in head order.
        old_classes: labels of a previous task to evaluate as well (disjoint from ``classes``).
        batch_size: batch size of every loader (and of the default digits module).
        seed: seed of the default digits module (split and order) and of the training order.
        base: the data module to split (default ``DigitsDataModule(batch_size, seed)``).

    Raises:
        ValueError: for empty or repeated classes, overlapping ``classes`` and ``old_classes``, a non-positive
            batch size, and (in ``setup``) classes without any sample.

    >>> task = TaskSplitDataModule(classes=[5, 6, 7, 8, 9], old_classes=[0, 1, 2, 3, 4])
    >>> task.setup(); x, y = next(iter(task.train_dataloader())); int(y.max())
    4
    """

    def __init__(
        self,
        classes: Sequence[int],
        old_classes: Sequence[int] | None = None,
        batch_size: int = 64,
        seed: int = 0,
        base: pl.LightningDataModule | None = None,
    ) -> None:
        super().__init__()
        self.classes = self._check_classes(classes, "classes")
        self.old_classes = None if old_classes is None else self._check_classes(old_classes, "old_classes")
        if self.old_classes is not None and set(self.classes) & set(self.old_classes):
            raise ValueError(f"classes {self.classes} and old_classes {self.old_classes} must be disjoint; shared: "
                             f"{sorted(set(self.classes) & set(self.old_classes))}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size, self.seed = batch_size, seed
        if base is None:
            from lightning_compress.demo import DigitsDataModule

            base = DigitsDataModule(batch_size=batch_size, seed=seed)
        self.base = base
        self.num_classes = len(self.classes)

    @staticmethod
    def _check_classes(classes: Sequence[int], name: str) -> list[int]:
        values = [int(c) for c in classes]
        if not values or len(set(values)) != len(values):
            raise ValueError(f"{name} must be a non-empty list of distinct labels, got {list(classes)!r}.")
        return values

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        self.base.setup(stage or "fit")
        self.train_set, self.val_set, self.test_set = (
            _ClassSubset(getattr(self.base, name), self.classes) for name in ("train_set", "val_set", "test_set"))
        self.old_sets = None if self.old_classes is None else [
            _ClassSubset(getattr(self.base, name), self.old_classes) for name in ("val_set", "test_set")]
        for name, subset in (("train", self.train_set), ("old validation", (self.old_sets or [self.train_set])[0])):
            if len(subset) == 0:
                raise ValueError(f"No {name} sample has a label in {list(subset.mapping)}.")

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.old_sets is None:
            return self._loader(self.val_set)
        return [self._loader(self.val_set), self._loader(self.old_sets[0])]

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.old_sets is None:
            return self._loader(self.test_set)
        return [self._loader(self.test_set), self._loader(self.old_sets[1])]
