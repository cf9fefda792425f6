"""The embedded real data set: scikit-learn's bundled handwritten digits (1797 8x8 images, no download)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

NORMALIZATIONS = ("standard", "unit", "none")


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation fixed by ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at the start of every epoch, so a run resumed from an end-of-epoch checkpoint
    sees exactly the data order of an uninterrupted run (a ``DataLoader(shuffle=True)`` does not).
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def _stratified_split(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a stratified train/val/test split: each class is split in the given fractions."""
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(fractions[1] * len(indices))
        n_test = round(fractions[2] * len(indices))
        n_train = len(indices) - n_val - n_test
        parts[0].append(indices[:n_train])
        parts[1].append(indices[n_train : n_train + n_val])
        parts[2].append(indices[n_train + n_val :])
    return tuple(np.sort(np.concatenate(part)) for part in parts)  # type: ignore[return-value]


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validation and test fractions each in (0, 1) and leaving a training split."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1), got {value!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction!r} + {test_fraction!r}.")


class SplitDataModule(pl.LightningDataModule):
    """The loaders of an in-memory data set split into ``train_set`` / ``val_set`` / ``test_set`` (set by ``setup``):
    the training order fixed by ``(seed, epoch)`` (:class:`EpochSeededSampler`), predict on the test split."""

    batch_size: int
    seed: int
    shuffle: bool
    num_workers: int
    train_set: TensorDataset
    val_set: TensorDataset
    test_set: TensorDataset

    def _loader(self, dataset: TensorDataset, sampler: Sampler[int] | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_set), self.seed) if self.shuffle else None
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


class DigitsDataModule(SplitDataModule):
    """Handwritten digits (8x8, 10 classes) as ``(B, 1, 8, 8)`` float images and integer labels.

    Args:
        batch_size: batch size of every loader.
        seed: fixes the split and the training data order.
        val_fraction: fraction of each class in the validation split.
        test_fraction: fraction of each class in the test split.
        normalization: ``"standard"`` (zero mean, unit variance with the training split's statistics),
            ``"unit"`` (pixel values / 16, in [0, 1]) or ``"none"`` (raw 0..16).
        shuffle: shuffle the training data (with an epoch-seeded order that resumes exactly).
        num_workers: DataLoader workers.

    Raises:
        ValueError: for a non-positive batch size, fractions outside (0, 1) or summing to 1 or more, or an unknown
            normalization.
    """

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        normalization: str = "standard",
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        check_split_fractions(val_fraction, test_fraction)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.seed = seed
        self.fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        self.normalization = normalization
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.num_classes = 10
        self.input_shape = (1, 8, 8)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images.astype(np.float32)
        labels = digits.target.astype(np.int64)
        self.split_indices = _stratified_split(labels, self.fractions, self.seed)
        images = self._normalize(images, images[self.split_indices[0]])
        tensors = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(tensors[0][idx], tensors[1][idx]) for idx in self.split_indices
        )

    def _normalize(self, images: np.ndarray, train_images: np.ndarray) -> np.ndarray:
        if self.normalization == "standard":
            return (images - train_images.mean()) / train_images.std()
        if self.normalization == "unit":
            return images / 16.0
        return images
