"""Regression tests of reviewed pruning bugs: FBS sparse execution folding a BatchNorm that is not the convolution
output's only reader (or that normalises two branches), and FilterPruning compacting channels read by a layer that
forward() never runs (an auxiliary head of training_step)."""

import copy
import warnings
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.graph.batchnorm import batchnorm_after, batchnorm_links
from lightning_compress.graph.tracing import trace, unexecuted_layers
from lightning_compress.pruning import dynamic
from lightning_compress.pruning.dynamic import FeatureBoostingGates
from lightning_compress.pruning.schedules import AGP


# -- 1. FBS sparse execution equals dense execution --------------------------------------------------------------
class TwoUse(nn.Module):
    """conv -> bn, and conv -> skip (pre-activation style): the conv output has two readers."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return (F.relu(self.bn(y)) + y).mean((2, 3))


class SharedBN(nn.Module):
    """One BatchNorm applied to two branches."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return (self.bn(self.c1(x)) + self.bn(self.c2(x))).mean((2, 3))


class DenseThenSparse(nn.Module):
    """conv1's output is also returned (dense in sparse execution); conv2 reads only conv1's kept channels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv1(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(y))))).mean((2, 3)) + y.mean((2, 3))


def _dense_and_sparse(net, layers, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 6, 6)
    modules = dict(net.named_modules())
    gates = FeatureBoostingGates({name: modules[name] for name in layers}, keep_ratio=0.5).attach(net)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x)  # non-trivial running statistics
    net.eval()
    names = {module: name for name, module in net.named_modules()}
    with torch.no_grad(), mock.patch.object(dynamic, "sparse_gated_conv", wraps=dynamic.sparse_gated_conv) as spy:
        dense = net(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with gates.sparse_execution():
                sparse = net(x)
        again = net(x)
    # the layers that ran the sparse kernel, each with whether it read only its source's kept channels
    ran = [(names[call.args[0]], call.args[6] is not None) for call in spy.call_args_list]
    return gates, dense, sparse, again, caught, ran


def test_sparse_execution_matches_dense_when_the_conv_output_has_another_reader():
    gates, dense, sparse, again, caught, ran = _dense_and_sparse(TwoUse(), ["conv"])
    assert (dense - sparse).abs().max() < 1e-6
    assert torch.equal(dense, again)
    assert ran == []  # the only gated layer is run densely
    assert gates.positions == {"conv": "bn"}  # the gate still follows the BatchNorm, as in training
    assert gates.dense_layers == ["conv"]
    assert any("['conv'] densely" in str(w.message) for w in caught)


@pytest.mark.parametrize("layers", [["c1"], ["c1", "c2"]])
def test_sparse_execution_matches_dense_with_a_batchnorm_shared_by_two_branches(layers):
    gates, dense, sparse, again, _, ran = _dense_and_sparse(SharedBN(), layers)
    assert (dense - sparse).abs().max() < 1e-6
    assert ran == [(name, False) for name in layers]  # the sparse kernel ran, not a dense fallback
    assert torch.equal(dense, again)
    assert gates.positions == {name: name for name in layers}  # the shared BatchNorm is neither conv's own
    assert gates.dense_layers == []


def test_sparse_execution_reads_the_kept_channels_of_a_dense_layer():
    gates, dense, sparse, _, _, ran = _dense_and_sparse(DenseThenSparse(), ["conv1", "conv2"])
    assert (dense - sparse).abs().max() < 1e-6
    assert ran == [("conv2", True)]  # conv2 sparse, reading only conv1's kept channels
    assert gates.dense_layers == ["conv1"]
    assert gates.sources == {"conv1": None, "conv2": "conv1"}


def test_batchnorm_links_require_an_unshared_batchnorm_and_report_other_readers():
    x = torch.randn(2, 3, 6, 6)
    assert batchnorm_links(TwoUse(), x, ["conv"]) == {"conv": ("bn", False)}
    assert batchnorm_links(SharedBN(), x, ["c1", "c2"]) == {}
    assert batchnorm_links(DenseThenSparse(), x, ["conv1", "conv2"]) == {"conv1": ("bn1", False),
                                                                         "conv2": ("bn2", True)}
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # the conv output is not returned
    assert batchnorm_links(plain, x, ["0"]) == {"0": ("1", True)}


class SharedBNModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.c1(x)) + self.bn(self.c2(x))).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_filter_pruning_does_not_zero_a_shared_batchnorm_for_one_branch(trainer_factory, monkeypatch):
    """Without dependency groups (untraceable model) each layer is pruned alone; a BatchNorm normalising two
    branches belongs to neither: zeroing its channel for one branch's pruned filter would silence the other's."""
    import lightning_compress.graph.dependency as dependency

    def untraceable(*args, **kwargs):
        raise RuntimeError("untraceable")

    monkeypatch.setattr(dependency, "build_graph", untraceable)
    module, callback = SharedBNModule(), FilterPruning(0.5, mode="hard", layers=["c1", "c2"])
    with pytest.warns(UserWarning, match="could not trace"):
        trainer_factory(max_epochs=1, callbacks=[callback], limit_val_batches=0).fit(module, _loader())
    assert all(not group.batchnorms for group in callback.groups)
    dead1, dead2 = (conv.weight.flatten(1).eq(0).all(1) for conv in (module.c1, module.c2))
    assert bool((dead1 ^ dead2).any())  # some channel is pruned in one branch and live in the other
    live = ~dead1 | ~dead2
    assert bool(module.bn.weight[live].ne(0).all())  # no channel of a live filter is silenced
    assert batchnorm_after(module, torch.randn(2, 1, 8, 8), ["c1", "c2"]) == {}


# -- 2. FilterPruning and layers that forward() never runs --------------------------------------------------------
class AuxHead(pl.LightningModule):
    """An auxiliary classifier on conv1's features, used in training_step but not in forward()."""

    def __init__(self, aux_in_forward=False):
        super().__init__()
        self.aux_in_forward = aux_in_forward
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 64, 10)
        self.aux = nn.Linear(8 * 64, 10)

    def features(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def forward(self, x):
        h = self.features(x)
        out = self.fc(F.relu(self.conv2(h)).flatten(1))
        return (out, self.aux(h.flatten(1))) if self.aux_in_forward else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.aux_in_forward:
            out, aux = self(x)
        else:
            out, aux = self(x), self.aux(self.features(x).flatten(1))
        return F.cross_entropy(out, y) + 0.3 * F.cross_entropy(aux, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    return DataLoader(data, batch_size=16)


COMPACTING = {
    "compact_every_epoch": lambda **kw: FilterPruning(0.5, mode="hard", compact_every_epoch=True, **kw),
    "compact_at_schedule_end": lambda **kw: FilterPruning(0.5, schedule=AGP(start=0, end=1),
                                                          compact_at_schedule_end=True, **kw),
    "compact_on_fit_end": lambda **kw: FilterPruning(0.5, compact_on_fit_end=True, **kw),
}


@pytest.mark.parametrize("option", sorted(COMPACTING))
def test_compaction_refuses_a_layer_forward_never_runs_before_any_step(trainer_factory, option):
    module = AuxHead()
    before = copy.deepcopy(module.state_dict())
    trainer = trainer_factory(max_epochs=3, callbacks=[COMPACTING[option]()], limit_val_batches=0)
    with pytest.raises(ValueError, match=r"forward\(\) never runs the layers \['aux'\].*exclude="):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("option", sorted(COMPACTING))
def test_compaction_trains_through_when_the_aux_head_and_its_input_are_excluded(trainer_factory, option):
    module = AuxHead()
    callback = COMPACTING[option](exclude=["aux", "conv1"])
    trainer_factory(max_epochs=3, callbacks=[callback], limit_val_batches=0).fit(module, _loader())
    target = callback._target if option == "compact_on_fit_end" else module
    assert target.conv2.out_channels == 8 and target.fc.in_features == 8 * 64
    module.training_step(next(iter(_loader())), 0)


def test_compaction_slices_an_aux_head_that_forward_runs(trainer_factory):
    module = AuxHead(aux_in_forward=True)
    callback = FilterPruning(0.5, mode="hard", compact_every_epoch=True)
    trainer_factory(max_epochs=2, callbacks=[callback], limit_val_batches=0).fit(module, _loader())
    assert module.conv1.out_channels == 4 and module.aux.in_features == 4 * 64
    module.training_step(next(iter(_loader())), 0)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_without_compaction_a_layer_forward_never_runs_is_left_unpruned_with_a_warning(trainer_factory, mode):
    module = AuxHead()
    callback = FilterPruning(0.5, mode=mode)
    with pytest.warns(UserWarning, match=r"unpruned: .*'aux': 'forward\(\) never runs it"):
        trainer_factory(max_epochs=2, callbacks=[callback], limit_val_batches=0).fit(module, _loader())
    assert "aux" not in callback._modules
    assert bool(module.aux.weight.ne(0).all())
    module.training_step(next(iter(_loader())), 0)


def test_magnitude_pruning_prunes_a_layer_forward_never_runs(trainer_factory):
    """Unstructured masks need no trace: the auxiliary head is pruned like the others and keeps its shape."""
    module = AuxHead()
    pruning = MagnitudePruning(0.5, scope="layer")
    trainer_factory(max_epochs=1, callbacks=[pruning], limit_val_batches=0).fit(module, _loader())
    assert float(module.aux.weight.eq(0).float().mean()) == pytest.approx(0.5)
    module.training_step(next(iter(_loader())), 0)


def test_unexecuted_layers_sees_functional_use_shared_weights_and_training_only_branches():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 4, 3), nn.Linear(4, 2)
            self.tied, self.train_only, self.unused = nn.Linear(4, 2), nn.Linear(2, 2), nn.BatchNorm1d(2)
            self.tied.weight = self.head.weight
            self.proj = nn.Linear(4, 4)  # used through its weight only
            self.act = nn.ReLU()  # no parameters: never reported

        def forward(self, x):
            h = F.linear(self.conv(x).mean((2, 3)), self.proj.weight)
            out = self.head(h)
            return self.train_only(out) if self.training else out

    net = Net()
    assert unexecuted_layers(net, trace(net, torch.randn(2, 1, 5, 5))) == ["train_only", "unused"]
