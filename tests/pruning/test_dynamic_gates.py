"""Feature Boosting and Suppression (Gao et al. 2019): the gate, its gradient, sparse execution and its cost."""

import pytest
import torch
from torch import nn

from lightning_compress.demo import PlainCNN, ResidualCNN
from lightning_compress.measure import count_macs
from lightning_compress.pruning import dynamic
from lightning_compress.pruning.dynamic import (
    FeatureBoostingGates,
    keep_count,
    sparse_gated_conv,
    winner_take_all,
)


def convs(model, types=(nn.Conv1d, nn.Conv2d)):
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def randomize_batchnorm(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)


@pytest.fixture
def sparse_calls(monkeypatch):
    """The convolutions sparse execution ran through ``sparse_gated_conv``, in order, each with whether it read only
    the kept input channels (``in_index``): without it, "sparse equals dense" would also hold for a no-op."""
    calls = []
    original = dynamic.sparse_gated_conv

    def spy(conv, x, index, values, scale, shift, in_index=None, grouped=False):
        calls.append((conv, in_index is not None))
        return original(conv, x, index, values, scale, shift, in_index, grouped)

    monkeypatch.setattr(dynamic, "sparse_gated_conv", spy)
    return calls


def test_keep_count_and_winner_take_all():
    assert [keep_count(r, 8) for r in (1.0, 0.75, 0.5, 0.25, 0.01)] == [8, 6, 4, 2, 1]
    saliency = torch.tensor([[0.1, 3.0, 2.0, 0.5], [4.0, 0.0, 1.0, 2.0]], requires_grad=True)
    gate, index = winner_take_all(saliency, 2)
    assert torch.equal(gate, torch.tensor([[0.0, 3.0, 2.0, 0.0], [4.0, 0.0, 0.0, 2.0]]))
    assert sorted(index[0].tolist()) == [1, 2] and sorted(index[1].tolist()) == [0, 3]
    gate.sum().backward()  # the selection is a constant mask: the gradient is the mask
    assert torch.equal(saliency.grad, (gate > 0).float())
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"keep_ratio must lie in \(0, 1\]"):
            keep_count(bad, 4)


def hand_layer():
    """A 1x1 conv computing (x0, x1, x0 + x1, x0 - x1); saliency relu(m0, m1, -m0, -m1) of the channel means."""
    conv = nn.Conv2d(2, 4, 1, bias=False)
    net = nn.Sequential(conv)
    gates = FeatureBoostingGates({"0": conv}, keep_ratio=0.5, gate_after="conv").attach(net)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, -1]]).view(4, 2, 1, 1))
        fc = gates.predictors["0"].fc
        fc.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
        fc.bias.zero_()
    x = torch.tensor([[2.0, 1.0], [-1.0, -3.0]]).view(2, 2, 1, 1).expand(2, 2, 3, 3).contiguous()
    return net, gates, x


def test_gate_output_by_hand(sparse_calls):
    net, gates, x = hand_layer()
    out = net(x)
    # sample 0: conv (2, 1, 3, 1), saliency (2, 1, 0, 0): keep 0 and 1, boosted by 2 and 1
    # sample 1: conv (-1, -3, -4, 2), saliency (0, 0, 1, 3): keep 2 and 3, boosted by 1 and 3
    expected = torch.tensor([[4.0, 1.0, 0.0, 0.0], [0.0, 0.0, -4.0, 6.0]]).view(2, 4, 1, 1).expand(2, 4, 3, 3)
    torch.testing.assert_close(out, expected)
    assert sparse_calls == []  # dense execution
    net.eval()
    with gates.sparse_execution(x):
        torch.testing.assert_close(net(x), expected)
    assert sparse_calls == [(net[0], False)]


def test_gradient_reaches_the_predictor():
    net, gates, x = hand_layer()
    net(x).sum().backward()
    grad = gates.predictors["0"].fc.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # only the rows of kept channels get gradient: sample 0 keeps channels 0, 1; sample 1 keeps 2, 3
    assert torch.all(grad.abs().sum(dim=1) > 0)


def make(name):
    torch.manual_seed(0)
    if name == "plain":
        model = PlainCNN(width=8)
    elif name == "residual":
        model = ResidualCNN(width=8)
    else:
        model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
                              nn.Conv1d(8, 8, 3, padding=1, bias=True), nn.ReLU(), nn.Conv1d(8, 6, 1))
    randomize_batchnorm(model)
    return model, (torch.randn(6, 3, 16) if name == "conv1d" else torch.randn(6, 1, 8, 8))


@pytest.mark.parametrize("name", ["plain", "residual", "conv1d"])
@pytest.mark.parametrize("keep_ratio", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("grouped", [False, True])
def test_sparse_execution_equals_the_dense_masked_computation(name, keep_ratio, grouped, sparse_calls):
    model, x = make(name)
    gates = FeatureBoostingGates(convs(model), keep_ratio).attach(model)
    gates.grouped = grouped
    model.eval()
    with torch.no_grad():
        dense = model(x)
        assert sparse_calls == []
        with gates.sparse_execution(x):
            sparse = model(x)
        ran_sparse = list(sparse_calls)
        again = model(x)
    assert (dense - sparse).abs().max() < 1e-5
    # every gated convolution ran the sparse kernel once, those with a source reading only its kept channels
    assert [conv for conv, _ in ran_sparse] == list(convs(model).values())
    assert [reads_kept for _, reads_kept in ran_sparse] == [gates.sources[n] is not None for n in gates.layer_names]
    assert any(reads_kept for _, reads_kept in ran_sparse)
    assert torch.equal(dense, again) and len(sparse_calls) == len(ran_sparse)  # dense execution restored


def test_sources_follow_zero_propagation():
    model, x = make("plain")
    gates = FeatureBoostingGates(convs(model), 0.5).attach(model)
    assert gates.prepare(x) == {"block1.conv": None, "block2.conv": "block1.conv", "block3.conv": "block2.conv"}
    assert gates.positions == {f"block{i}.conv": f"block{i}.bn" for i in (1, 2, 3)}
    model, x = make("residual")
    gates = FeatureBoostingGates(convs(model), 0.5).attach(model)
    sources = gates.prepare(x)
    assert sources["stage1.0.conv2"] == "stage1.0.conv1"  # conv1 -> bn1 -> gate -> relu -> conv2
    assert sources["stage2.0.conv1"] is None  # reads the residual sum, which the shortcut fills


def test_executed_macs_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
    x = torch.randn(4, 2, 5, 5)
    assert count_macs(net, x)[0] == 2 * 4 * 9 * 25 + 4 * 6 * 9 * 25
    gates = FeatureBoostingGates({"0": net[0], "3": net[3]}, keep_ratio=0.5).attach(net)
    # predictor 1: 2 x 4; conv 1: 2 kept filters x 2 inputs x 9 x 25;
    # predictor 2: 4 x 6; conv 2: 3 kept filters x 2 kept inputs (of 4) x 9 x 25
    assert gates.executed_macs(x) == 8 + 2 * 2 * 9 * 25 + 24 + 3 * 2 * 9 * 25
    assert count_macs(net, x)[0] == 7200 + 8 + 24  # dense execution: full convolutions plus predictors


def test_sparse_execution_refuses_training_mode_and_remove_restores_keys():
    model, x = make("plain")
    keys = set(model.state_dict())
    gates = FeatureBoostingGates(convs(model), 0.5).attach(model)
    assert set(model.state_dict()) - keys == {f"dynamic_gates.predictors.block{i}__conv.fc.{p}" for i in (1, 2, 3)
                                              for p in ("weight", "bias")}
    model.train()
    with gates.sparse_execution(x), pytest.raises(RuntimeError, match="eval mode"):
        model(x)
    gates.remove()
    assert set(model.state_dict()) == keys and not hasattr(model, "dynamic_gates")
    model(x)


def test_bad_arguments():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="cannot be gated"):
        FeatureBoostingGates({"c": conv}, 0.5)
    with pytest.raises(ValueError, match="gate_after must be one of"):
        FeatureBoostingGates({"c": nn.Conv2d(2, 2, 1)}, 0.5, gate_after="relu")
    with pytest.raises(ValueError, match="keep_ratio"):
        FeatureBoostingGates({"c": nn.Conv2d(2, 2, 1)}, 2.0)


def test_sparse_gated_conv_direct():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, stride=2)
    x = torch.randn(3, 6, 7, 7)
    x_masked = x.clone()
    in_index = torch.tensor([[0, 2, 5], [1, 2, 3], [4, 5, 0]])
    keep_in = torch.zeros(3, 6, dtype=torch.bool).scatter_(1, in_index, True)
    x_masked[~keep_in] = 0
    index, values = torch.tensor([[1, 4], [0, 2], [3, 4]]), torch.rand(3, 2)
    scale, shift = torch.rand(5) + 0.5, torch.randn(5)
    gate = torch.zeros(3, 5).scatter_(1, index, values)
    bias = conv.bias.detach()
    expected = (scale.view(1, -1, 1, 1) * (conv(x_masked) - bias.view(1, -1, 1, 1)) + (shift + 0).view(1, -1, 1, 1))
    expected = expected * gate.view(3, 5, 1, 1)
    with torch.no_grad():
        out = sparse_gated_conv(conv, x_masked, index, values, scale, shift, in_index)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_gate_on_the_conv_output_before_batchnorm(sparse_calls):
    model, x = make("plain")
    gates = FeatureBoostingGates(convs(model), 0.5, gate_after="conv").attach(model)
    model.eval()
    with torch.no_grad():
        dense = model(x)
        with gates.sparse_execution(x):
            sparse = model(x)
    assert [conv for conv, _ in sparse_calls] == list(convs(model).values())
    assert gates.positions == {name: name for name in gates.layer_names}
    # BatchNorm turns a suppressed channel into its shift: later layers must read every input channel
    assert set(gates.sources.values()) == {None}
    assert (dense - sparse).abs().max() < 1e-5


def test_a_deep_copy_runs_its_own_gates():
    import copy

    model, x = make("plain")
    gates = FeatureBoostingGates(convs(model), 0.5).attach(model)
    model.eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.dynamic_gates.predictors["block2__conv"].fc.bias.add_(0.5 * torch.arange(16.0))
        assert not torch.allclose(twin(x), model(x))
        sparse = twin.dynamic_gates.sparse(True, x) and twin(x)
        twin.dynamic_gates.sparse(False)
        assert (sparse - twin(x)).abs().max() < 1e-5
    assert gates.executing_sparse is False and twin.dynamic_gates is not gates


def test_sparse_execution_follows_changed_batchnorm_statistics():
    model, x = make("plain")
    gates = FeatureBoostingGates(convs(model), 0.5).attach(model)
    model.eval()
    with torch.no_grad(), gates.sparse_execution(x):
        model(x)
        randomize_batchnorm(model, seed=1)  # e.g. load_state_dict: in-place copies bump the version counters
        sparse = model(x)
    with torch.no_grad():
        assert (model(x) - sparse).abs().max() < 1e-5
