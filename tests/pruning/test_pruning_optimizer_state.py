"""Compaction in place mid-training: optimizer state is sliced so the next step matches the uncompacted one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.graph.compact import compact
from lightning_compress.pruning.optimizer_state import slice_optimizer_state


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Linear(6 * 16, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2), 1)
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_next_step_after_inplace_compaction_matches_the_masked_model(optimizer_class) -> None:  # type: ignore[no-untyped-def]
    model = Net()
    kwargs = {"lr": 0.1, "momentum": 0.9} if optimizer_class is torch.optim.SGD else {"lr": 0.01}
    optimizer = optimizer_class(model.parameters(), **kwargs)
    x, target = torch.randn(8, 1, 10, 10), torch.randint(0, 3, (8,))
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    with torch.no_grad():  # hard-prune: filter 1 and 4, their BN channel, hidden unit 2
        model.conv.weight[[1, 4]] = 0
        model.bn.weight[[1, 4]] = 0
        model.bn.bias[[1, 4]] = 0
        model.fc1.weight[2] = 0
        model.fc1.bias[2] = 0
    reference, reference_optimizer = copy.deepcopy((model, optimizer))  # both copied together: params stay linked
    model.eval()
    conv = model.conv
    _, plan = compact(model, x, inplace=True, return_plan=True)
    assert model.conv is conv and conv.out_channels == 4 and model.fc1.in_features == 4 * 16
    assert model.fc1.out_features == 4 and model.fc2.in_features == 4
    slice_optimizer_state(optimizer, plan.replacements)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    for net, opt in ((model, optimizer), (reference, reference_optimizer)):
        net.train()
        opt.zero_grad()
        F.cross_entropy(net(x), target).backward()
        opt.step()
    keep = torch.tensor([0, 2, 3, 5])
    assert torch.allclose(model.conv.weight, reference.conv.weight[keep], atol=1e-6)
    assert torch.allclose(model.bn.weight, reference.bn.weight[keep], atol=1e-6)
    rows, columns = torch.tensor([0, 1, 3, 4]), torch.cat([torch.arange(16) + 16 * c for c in keep])
    assert torch.allclose(model.fc1.weight, reference.fc1.weight[rows][:, columns], atol=1e-6)
    assert torch.allclose(model.fc2.weight, reference.fc2.weight[:, rows], atol=1e-6)
