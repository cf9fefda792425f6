"""Two CPU processes (fork-based DDP): identical masks on every rank, a pruned model back in the main process."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_compress import FilterPruning, MagnitudePruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.pruning.schedules import AGP


class SaveRankState(pl.Callback):
    def __init__(self, directory, pruning):
        self.directory, self.pruning = directory, pruning

    def on_train_end(self, trainer, pl_module):
        torch.save({"masks": self.pruning.masks, "weights": pl_module.backbone.state_dict()},
                   self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda: MagnitudePruning(sparsity=0.8, schedule=AGP(start=0, end=2)),
    lambda: FilterPruning(sparsity=0.5, mode="soft"),
], ids=["magnitude", "soft-filter"])
def test_masks_identical_across_ranks_and_model_returned_pruned(tmp_path, make):
    pruning = make()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_notebook", max_epochs=3, limit_train_batches=4,
                         limit_val_batches=2, callbacks=[pruning, SaveRankState(tmp_path, pruning)], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    module = ClassifierModule(PlainCNN(width=8), lr=3e-3)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys() and ranks[0]["masks"]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
    for key, value in ranks[0]["weights"].items():
        torch.testing.assert_close(value, ranks[1]["weights"][key])
    weight = module.backbone.block2.conv.weight.detach()
    expected = ranks[0]["weights"]["block2.conv.weight"]
    torch.testing.assert_close(weight, expected)
    assert float((weight == 0).float().mean()) >= 0.5 - 1e-6
