import numpy as np
import pytest
import torch

from lightning_compress.demo import DigitsDataModule, EpochSeededSampler


def _labels(dataset):
    return dataset.tensors[1].numpy()


def test_split_sizes_are_60_20_20_and_stratified(digits):
    sizes = [len(digits.train_set), len(digits.val_set), len(digits.test_set)]
    assert sum(sizes) == 1797
    assert sizes == pytest.approx([0.6 * 1797, 0.2 * 1797, 0.2 * 1797], abs=6)
    full = np.bincount(np.concatenate([_labels(d) for d in (digits.train_set, digits.val_set, digits.test_set)]))
    for dataset, fraction in ((digits.train_set, 0.6), (digits.val_set, 0.2), (digits.test_set, 0.2)):
        np.testing.assert_allclose(np.bincount(_labels(dataset), minlength=10), fraction * full, atol=1)


def test_splits_do_not_overlap_and_cover_everything(digits):
    train, val, test = (set(idx.tolist()) for idx in digits.split_indices)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 1797


def test_split_is_fixed_by_the_seed():
    first, second, other = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for datamodule in (first, second, other):
        datamodule.setup()
    for a, b in zip(first.split_indices, second.split_indices, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.split_indices[0], other.split_indices[0])
    torch.testing.assert_close(first.train_set.tensors[0], second.train_set.tensors[0])


def test_batches_have_image_shape(digits):
    inputs, targets = next(iter(digits.train_dataloader()))
    assert inputs.shape == (64, 1, 8, 8) and inputs.dtype == torch.float32
    assert targets.dtype == torch.int64 and targets.max() <= 9


@pytest.mark.parametrize(("normalization", "low", "high"), [("unit", 0.0, 1.0), ("none", 0.0, 16.0)])
def test_normalization_ranges(normalization, low, high):
    datamodule = DigitsDataModule(normalization=normalization)
    datamodule.setup()
    images = datamodule.train_set.tensors[0]
    assert images.min() == low and images.max() == high


def test_standard_normalization_uses_training_statistics(digits):
    images = digits.train_set.tensors[0]
    assert abs(images.mean().item()) < 1e-4 and images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_training_order_depends_on_epoch_only():
    sampler = EpochSeededSampler(50, seed=1)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    fresh = EpochSeededSampler(50, seed=1)
    fresh.set_epoch(1)
    assert epoch0 != epoch1 and list(fresh) == epoch1 and sorted(epoch1) == list(range(50))


def test_unshuffled_training_order_is_the_dataset_order():
    datamodule = DigitsDataModule(shuffle=False, batch_size=8)
    datamodule.setup()
    _, targets = next(iter(datamodule.train_dataloader()))
    torch.testing.assert_close(targets, datamodule.train_set.tensors[1][:8])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
        ({"normalization": "minmax"}, "'minmax'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)
