import numpy as np
import pytest
import torch

from lightning_compress.demo import ShapesDataModule
from lightning_compress.demo.shapes import SHAPES, render_shapes


def _small(**kwargs):
    datamodule = ShapesDataModule(samples_per_class=20, **kwargs)
    datamodule.setup()
    return datamodule


def test_splits_are_balanced_disjoint_and_shaped():
    datamodule = _small(batch_size=16)
    sets = (datamodule.train_set, datamodule.val_set, datamodule.test_set)
    assert [len(s) for s in sets] == [10 * 10, 10 * 4, 10 * 6]  # 50/20/30 of 20 per class
    for dataset, per_class in zip(sets, (10, 4, 6), strict=True):
        assert np.bincount(dataset.tensors[1].numpy(), minlength=10).tolist() == [per_class] * 10
    train, val, test = (set(idx.tolist()) for idx in datamodule.split_indices)
    assert not (train & val) and not (train & test) and not (val & test) and len(train | val | test) == 200
    inputs, targets = next(iter(datamodule.train_dataloader()))
    assert inputs.shape == (16, 1, 16, 16) and inputs.dtype == torch.float32 and targets.dtype == torch.int64
    assert datamodule.num_classes == len(datamodule.class_names) == 10


def test_images_are_fixed_by_the_seed_and_standardised():
    first, second, other = _small(seed=3), _small(seed=3), _small(seed=4)
    torch.testing.assert_close(first.train_set.tensors[0], second.train_set.tensors[0])
    assert not torch.equal(first.train_set.tensors[0], other.train_set.tensors[0])
    images = first.train_set.tensors[0]
    assert abs(images.mean().item()) < 1e-4 and images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_every_class_draws_its_own_shape():
    """Noise-free, clutter-free: at the same positions, sizes and angles, every pair of classes differs clearly."""
    drawn = [render_shapes(np.full(8, label), 16, np.random.default_rng(0), noise=0.0, clutter=0)
             for label in range(len(SHAPES))]
    assert all(images.min() >= 0.0 and images.max() <= 1.3 for images in drawn)
    for a in range(len(SHAPES)):
        for b in range(a):
            assert np.abs(drawn[a] - drawn[b]).sum(axis=(1, 2)).min() > 3.0, (list(SHAPES)[a], list(SHAPES)[b])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"samples_per_class": 0}, "samples_per_class"),
        ({"image_size": 4}, "image_size"),
        ({"noise": -0.1}, "noise"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, "below 1"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesDataModule(**kwargs)
