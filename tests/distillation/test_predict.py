"""trainer.predict on every distillation module: the class predicted by ``forward`` (the deployed network at T=1),
for loaders of ``(inputs, labels)`` and of inputs alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import DistillationModule
from lightning_compress.distillation import MutualLearningModule, SelfDistillationModule


class FlatCNN(nn.Module):
    """Functional activations and a flatten into the classifier."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv2(F.relu(self.conv1(x)))), 1))


MODULES = {
    "distillation": lambda: DistillationModule(FlatCNN(4), FlatCNN(8)),
    "mutual": lambda: MutualLearningModule([FlatCNN(4), FlatCNN(6)], input_shape=[1, 8, 8]),
    "self": lambda: SelfDistillationModule(FlatCNN(4), ["conv1"], input_shape=[1, 8, 8]),
}


@pytest.mark.parametrize("labels", [True, False], ids=["inputs-labels", "inputs-only"])
@pytest.mark.parametrize("name", list(MODULES))
def test_predict_gives_the_class_of_forward(trainer_factory, name, labels):
    torch.manual_seed(0)
    module = MODULES[name]()
    inputs = torch.randn(12, 1, 8, 8)
    data = TensorDataset(inputs, torch.randint(0, 10, (12,))) if labels else TensorDataset(inputs)
    predictions = trainer_factory(logger=False).predict(module, DataLoader(data, batch_size=5))
    module.eval()
    with torch.no_grad():
        expected = module(inputs).argmax(dim=1)
    assert torch.equal(torch.cat(predictions), expected)


@pytest.mark.parametrize(("batch", "layout"), [
    ({"image": torch.zeros(2, 1, 8, 8), "mask": torch.zeros(2)}, r"a dict with keys \['image', 'mask'\] and none of "
                                                                r"the label keys"),
    ([torch.zeros(2, 1, 8, 8)], "a list of length 1"),
    (torch.zeros(2, 1, 8, 8), "a Tensor"),
])
def test_an_unknown_batch_layout_names_itself_and_the_override(batch, layout):
    module = MODULES["distillation"]()
    expected = (r"DistillationModule expects batches \(inputs, targets, \.\.\.\) or dicts with labels, "
                rf"got {layout}.*; override split_batch")
    with pytest.raises(TypeError, match=expected):
        module.split_batch(batch)
