"""How MagnitudePruning shares its sparsity among layers: the ERK default against hand-computed shares, and why it
is the default (a global ranking can empty a layer; ERK never does)."""

import itertools

import pytest
import torch
from torch import nn

from lightning_compress import MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.pruning.criteria import global_magnitude_masks
from lightning_compress.pruning.distributions import erk_sparsities

PLAIN_CNN_16 = {"block1.conv": (16, 1, 3, 3), "block2.conv": (32, 16, 3, 3), "block3.conv": (32, 32, 3, 3)}
# Large and small, convolutions, a depthwise convolution and a wide linear layer (MobileNetV3-small's head).
MIXED = {"stem": (16, 3, 3, 3), "depthwise": (96, 1, 5, 5), "pointwise": (576, 96, 1, 1), "head": (1024, 576),
         "block": (128, 128, 3, 3)}


def test_erk_shares_of_plain_cnn_match_the_hand_computation():
    # Scores sum(shape)/prod(shape): 23/144, 54/4608, 70/9216; the kept budget is 0.2 * 13968 = 2793.6.
    # First scale 2793.6 / (23 + 54 + 70) = 19.0 makes block1's density 3.03 > 1: block1 stays dense.
    # Then scale (2793.6 - 144) / (54 + 70) = 21.368: densities 21.368 * 54 / 4608 and 21.368 * 70 / 9216.
    shares = erk_sparsities(PLAIN_CNN_16, 0.8)
    scale = (0.2 * 13968 - 144) / 124
    assert shares == pytest.approx({"block1.conv": 0.0, "block2.conv": 1 - scale * 54 / 4608,
                                    "block3.conv": 1 - scale * 70 / 9216})
    assert shares["block2.conv"] == pytest.approx(0.74960, abs=1e-5)
    assert shares["block3.conv"] == pytest.approx(0.83770, abs=1e-5)


def test_erk_shares_of_linear_layers_follow_erdos_renyi():
    # (n_in + n_out) / (n_in n_out): 150 / 5000 and 60 / 500; the small layer stays dense, the other keeps
    # (2750 - 500) / 5000 = 0.45 of its weights.
    assert erk_sparsities({"a": (100, 50), "b": (10, 50)}, 0.5) == pytest.approx({"a": 0.55, "b": 0.0})


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95, 0.99])
def test_erk_keeps_the_budget_and_empties_no_layer(sparsity):
    shares = erk_sparsities(MIXED, sparsity)
    sizes = {name: torch.Size(shape).numel() for name, shape in MIXED.items()}
    kept = sum((1 - shares[name]) * size for name, size in sizes.items())
    assert kept == pytest.approx((1 - sparsity) * sum(sizes.values()))
    assert all(0.0 <= share < 1.0 for share in shares.values())


def test_erk_shares_grow_with_the_target_so_masks_only_grow_along_a_schedule():
    ramp = [erk_sparsities(MIXED, s) for s in (0.1, 0.3, 0.5, 0.7, 0.9)]
    for before, after in itertools.pairwise(ramp):
        assert all(after[name] >= before[name] for name in MIXED)
    assert ramp[-1]["depthwise"] < 0.9 < ramp[-1]["head"]  # small layers keep more, large ones give up more


@pytest.mark.parametrize(("shapes", "sparsity", "match"), [({}, 0.5, "at least one weight shape"),
                                                           (PLAIN_CNN_16, 1.0, "sparsity")])
def test_erk_rejects_bad_input(shapes, sparsity, match):
    with pytest.raises(ValueError, match=match):
        erk_sparsities(shapes, sparsity)


def test_magnitude_pruning_shares_its_sparsity_by_erk_by_default(trainer_factory):
    callback = MagnitudePruning(sparsity=0.8)
    backbone = PlainCNN(width=16)
    trainer = trainer_factory(callbacks=[callback], max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(ClassifierModule(backbone, lr=3e-3), DigitsDataModule(batch_size=32))
    assert callback.scope == "erk"
    for name, share in erk_sparsities(PLAIN_CNN_16, 0.8).items():
        weight = backbone.get_submodule(name).weight
        assert int((weight == 0).sum()) == round(share * weight.numel()), name
    assert callback.global_sparsity() == pytest.approx(0.8, abs=1e-3)
    assert int((backbone.block1.conv.weight == 0).sum()) == 0  # the 144-weight first convolution stays dense
    assert int((backbone.classifier.weight == 0).sum()) == 0


def test_a_global_ranking_can_empty_a_layer_erk_does_not():
    """A layer whose weights are smaller than the others' (a head initialised with a small normal, as MobileNetV3's
    classifier is) loses every weight to a global ranking at 80%; ERK keeps a share of every layer."""
    torch.manual_seed(0)
    layers = {"conv": nn.Conv2d(256, 256, 3), "head": nn.Linear(576, 1024)}
    nn.init.normal_(layers["head"].weight, 0, 0.001)
    weights = {name: layer.weight.detach() for name, layer in layers.items()}
    assert not global_magnitude_masks(weights, 0.8)["head"].any()
    shares = erk_sparsities({name: w.shape for name, w in weights.items()}, 0.8)
    assert 0.5 < shares["head"] < shares["conv"] < 1.0
