"""Callbacks that feed the network after training check, on the first training batch and before its step, that the
network runs on the input they will give it; a module whose forward takes the whole dict batch is told to define
``compression_target``, and works once it does."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_compress import CompressionReport, Int8Export, PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.quantization.quantizers import quantized_layers
from lightning_compress.utils.data import check_network_input


class DictDigits(Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 1, 8, 8, generator=generator)
        self.y = torch.randint(0, 10, (64,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[index], "label": self.y[index]}


class DictModule(LightningModule):
    """forward takes the whole batch, as in many multi-input pipelines."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
        self.steps = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["image"])

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return F.cross_entropy(self(batch), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch), batch["label"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class WithTarget(DictModule):
    @property
    def compression_target(self) -> nn.Module:
        return self.net


@pytest.mark.parametrize("callbacks", [
    lambda: [QuantizationAwareTraining(calibration_batches=1), Int8Export()],
    lambda: [PostTrainingQuantization(modes=["static"])],
    lambda: [CompressionReport()],
], ids=["int8-export", "ptq", "report"])
def test_a_forward_taking_the_whole_batch_fails_before_the_first_step(trainer_factory, callbacks):
    module = DictModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = trainer_factory(callbacks=callbacks(), max_epochs=1, logger=False)
    expected = (r"gives DictModule the input tensor of each batch \(shape \(16, 1, 8, 8\)\), from a dict with keys "
                r"\['image', 'label'\].*define a `compression_target`")
    with pytest.raises(ValueError, match=expected):
        trainer.fit(module, DataLoader(DictDigits(), batch_size=16))
    assert module.steps == 0
    assert all(torch.equal(value, before[key]) for key, value in module.state_dict().items() if key in before)


def test_with_a_compression_target_the_same_module_quantizes(trainer_factory):
    module, ptq = WithTarget(), PostTrainingQuantization(modes=["static"])
    loader = DataLoader(DictDigits(), batch_size=16)
    trainer_factory(callbacks=[ptq], max_epochs=1, logger=False).fit(module, loader, loader)
    assert module.steps == 4 and set(ptq.results) == {"fp32", "static"}
    quantized = ptq.models["static"]
    assert set(quantized_layers(quantized)) == {"0", "3"}  # the compression target's conv and linear
    with torch.no_grad():  # accuracy from the dict batches' images and labels, of the quantized copy
        quantized.eval()
        correct = sum(int((quantized(b["image"]).argmax(1) == b["label"]).sum()) for b in loader)
    assert ptq.results["static"] == correct / len(loader.dataset)


def test_a_batch_without_a_tensor_is_named():
    with pytest.raises(ValueError, match="Report cannot find the network's input in a batch of type str"):
        check_network_input(nn.Linear(2, 2), "text", "Report")


def test_probing_the_network_keeps_every_submodule_mode():
    """A BatchNorm the user froze stays frozen after a probe (``model.train(flag)`` would set every submodule)."""
    from lightning_compress.utils.data import probe_forward

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    model[1].eval()
    probe_forward(model, torch.randn(3, 4))
    check_network_input(model, (torch.randn(3, 4), torch.zeros(3)), "Probe")
    assert model.training and model[0].training and not model[1].training
