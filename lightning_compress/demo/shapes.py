"""A harder built-in workload: ten classes of small, noisy, cluttered geometric shapes, generated in memory.

The digits demo is too easy to show what compression costs (every method lands at 98-99.5%). Here a small CNN
reaches roughly 90% test accuracy, so a lost point shows. Everything is generated from the seed with NumPy: no file,
no download, the same images on every machine.

Classes (each drawn at a random position, size and rotation, with a random contrast, over a random background, with
thin clutter strokes and pixel noise): ``disk``, ``ring``, ``square``, ``square outline``, ``triangle``,
``triangle outline``, ``plus``, ``bar``, ``L``, ``T``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_compress.demo.data import SplitDataModule, _stratified_split, check_split_fractions

_SQRT3 = float(np.sqrt(3.0))


def _triangle(u: np.ndarray, v: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Inside an equilateral triangle with vertices at radius ``scale`` (apex up)."""
    return (v >= -0.5 * scale) & (_SQRT3 * np.abs(u) + v <= scale)


def _box(u: np.ndarray, v: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


#: Membership of canonical coordinates (the shape fills roughly the unit disk) in each class's shape.
SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disk": lambda u, v: u * u + v * v <= 0.8,
    "ring": lambda u, v: (u * u + v * v <= 0.9) & (u * u + v * v >= 0.3),
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.72,
    "square outline": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.8)
    & (np.maximum(np.abs(u), np.abs(v)) >= 0.42),
    "triangle": lambda u, v: _triangle(u, v, 1.0),
    "triangle outline": lambda u, v: _triangle(u, v, 1.05) & ~_triangle(u, v + 0.08, 0.45),
    "plus": lambda u, v: _box(u, v, -0.25, 0.25, -0.9, 0.9) | _box(u, v, -0.9, 0.9, -0.25, 0.25),
    "bar": lambda u, v: _box(u, v, -1.0, 1.0, -0.24, 0.24),
    "L": lambda u, v: _box(u, v, -0.8, -0.3, -0.9, 0.9) | _box(u, v, -0.8, 0.8, -0.9, -0.4),
    "T": lambda u, v: _box(u, v, -0.9, 0.9, 0.4, 0.9) | _box(u, v, -0.25, 0.25, -0.9, 0.9),
}
_NAMES = list(SHAPES)


def render_shapes(
    labels: np.ndarray, image_size: int, rng: np.random.Generator, noise: float, clutter: int
) -> np.ndarray:
    """Images ``(N, image_size, image_size)`` in roughly [0, 1] of the shapes ``labels`` index in :data:`SHAPES`.

    Each shape is rendered with 2x2 supersampling (anti-aliased edges) at a random radius of 30-45% of the image,
    a random rotation and a centre within 10% of the image's; ``clutter`` thin random strokes and Gaussian pixel
    noise of standard deviation ``noise`` are added over a random background level.
    """
    n, size = len(labels), image_size
    fine = 2 * size
    grid = (np.arange(fine, dtype=np.float32) + 0.5) / 2.0  # pixel units
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    radius = rng.uniform(0.3, 0.45, n).astype(np.float32) * size
    centre = (0.5 + rng.uniform(-0.1, 0.1, (n, 2)).astype(np.float32)) * size
    angle = rng.uniform(0.0, 2 * np.pi, n).astype(np.float32)
    contrast = rng.uniform(0.45, 1.0, n).astype(np.float32)
    background = rng.uniform(0.0, 0.3, n).astype(np.float32)
    images = np.empty((n, size, size), dtype=np.float32)
    for label in np.unique(labels):
        chosen = np.flatnonzero(labels == label)
        dx = xx[None] - centre[chosen, 0, None, None]
        dy = yy[None] - centre[chosen, 1, None, None]
        cos = np.cos(angle[chosen])[:, None, None] / radius[chosen, None, None]
        sin = np.sin(angle[chosen])[:, None, None] / radius[chosen, None, None]
        mask = SHAPES[_NAMES[label]](cos * dx + sin * dy, cos * dy - sin * dx).astype(np.float32)
        images[chosen] = mask.reshape(len(chosen), size, 2, size, 2).mean(axis=(2, 4))
    images = images * contrast[:, None, None] + background[:, None, None]
    images += _strokes(n, size, clutter, rng)
    images += rng.normal(0.0, noise, images.shape).astype(np.float32)
    return images


def _strokes(n: int, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` thin anti-aliased line segments per image, of random length, direction and intensity."""
    out = np.zeros((n, size, size), dtype=np.float32)
    if count == 0:
        return out
    grid = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    start = rng.uniform(0.0, size, (n, count, 2)).astype(np.float32)
    direction = rng.uniform(0.0, 2 * np.pi, (n, count)).astype(np.float32)
    length = rng.uniform(0.15, 0.45, (n, count)).astype(np.float32) * size
    level = rng.uniform(0.3, 0.8, (n, count)).astype(np.float32)
    for k in range(count):
        ex, ey = np.cos(direction[:, k]), np.sin(direction[:, k])
        dx = xx[None] - start[:, k, 0, None, None]
        dy = yy[None] - start[:, k, 1, None, None]
        along = np.clip(dx * ex[:, None, None] + dy * ey[:, None, None], 0.0, length[:, k, None, None])
        distance = np.hypot(dx - along * ex[:, None, None], dy - along * ey[:, None, None])
        out += level[:, k, None, None] * np.clip(1.0 - distance / 0.8, 0.0, 1.0)
    return out



class ShapesDataModule(SplitDataModule):
    """Ten classes of noisy geometric shapes as ``(B, 1, image_size, image_size)`` float images and integer labels.

    A workload where compression can cost accuracy: ``PlainCNN(width=16, image_size=16)`` with Adam reaches about
    90% test accuracy (README, "Shapes workload"), well below the ceiling. Generated in memory from ``seed``.

    Args:
        batch_size: batch size of every loader.
        seed: fixes the images, the split and the training data order.
        samples_per_class: images per class over the three splits.
        image_size: side of the square images (pixels).
        noise: standard deviation of the Gaussian pixel noise (the shape's contrast is 0.45-1).
        clutter: thin random strokes drawn over every image.
        val_fraction: fraction of each class in the validation split.
        test_fraction: fraction of each class in the test split.
        shuffle: shuffle the training data (with an epoch-seeded order that resumes exactly).
        num_workers: DataLoader workers.

    Raises:
        ValueError: for a non-positive batch size or sample count, an image size below 8, a negative noise or
            clutter, or fractions outside (0, 1) or summing to 1 or more.
    """

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        samples_per_class: int = 600,
        image_size: int = 16,
        noise: float = 0.2,
        clutter: int = 1,
        val_fraction: float = 0.2,
        test_fraction: float = 0.3,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, count in (("batch_size", batch_size), ("samples_per_class", samples_per_class)):
            if count < 1:
                raise ValueError(f"{name} must be a positive integer, got {count!r}.")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size!r}.")
        if noise < 0 or clutter < 0:
            raise ValueError(f"noise and clutter must be non-negative, got noise={noise!r}, clutter={clutter!r}.")
        check_split_fractions(val_fraction, test_fraction)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.seed = seed
        self.samples_per_class = samples_per_class
        self.noise = noise
        self.clutter = clutter
        self.fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.num_classes = len(SHAPES)
        self.class_names = list(SHAPES)
        self.input_shape = (1, image_size, image_size)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        rng = np.random.default_rng([self.seed, 0x5A4E])
        labels = np.repeat(np.arange(self.num_classes), self.samples_per_class)
        labels = labels[rng.permutation(len(labels))]
        images = render_shapes(labels, self.input_shape[-1], rng, self.noise, self.clutter)
        self.split_indices = _stratified_split(labels, self.fractions, self.seed)
        train = images[self.split_indices[0]]
        images = (images - train.mean()) / train.std()
        tensors = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(tensors[0][idx], tensors[1][idx]) for idx in self.split_indices
        )
