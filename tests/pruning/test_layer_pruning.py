"""LayerPruning: whole residual blocks removed, the masked and the compact model agree."""

import pytest
import torch

from lightning_compress import LayerPruning
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN, ResidualCNN
from lightning_compress.graph.blocks import block_scores, removable_blocks, remove_blocks, zero_block
from lightning_compress.testing import read_scalars


def test_removable_blocks_of_the_residual_cnn_are_the_identity_shortcut_blocks(tiny_input):
    model = ResidualCNN(width=4, depth=2)
    assert removable_blocks(model, tiny_input) == ["stage1.0", "stage1.1", "stage2.1", "stage3.1"]
    assert removable_blocks(model, tiny_input, r"stage1\..*") == ["stage1.0", "stage1.1"]
    assert removable_blocks(PlainCNN(width=4), tiny_input) == []


def test_a_zeroed_block_equals_its_removal(tiny_input):
    model = ResidualCNN(width=4, depth=2).eval()
    zero_block(model.stage2[1])
    torch.testing.assert_close(remove_blocks(model, ["stage2.1"])(tiny_input), model(tiny_input))


def test_block_scores_are_root_mean_powers():
    model = ResidualCNN(width=4, depth=2)
    with torch.no_grad():
        for parameter in model.stage1[0].parameters():
            parameter.fill_(2.0)
    assert block_scores(model, ["stage1.0"], p=2).item() == pytest.approx(2.0)
    assert block_scores(model, ["stage1.0"], p=1).item() == pytest.approx(2.0)


def test_layer_pruning_removes_blocks_and_compacts(trainer_factory, tmp_path, tiny_input):
    callback = LayerPruning(sparsity=0.5, compact_on_fit_end=True)
    trainer = trainer_factory(callbacks=[callback], max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    module = ClassifierModule(ResidualCNN(width=4, depth=2), lr=3e-3)
    masked = module.backbone
    trainer.fit(module, DigitsDataModule(batch_size=32))
    removed = callback.removed()
    assert len(removed) == 2
    for name in removed:
        assert isinstance(module.backbone.get_submodule(name), torch.nn.Identity)
        assert all(float(p.abs().sum()) == 0 for p in masked.get_submodule(name).parameters())
    masked.eval(), module.backbone.eval()
    torch.testing.assert_close(module.backbone(tiny_input), masked(tiny_input))
    assert read_scalars(tmp_path)["prune/blocks_alive"][-1][1] == 2


@pytest.mark.parametrize(
    ("callback", "backbone", "message"),
    [
        (LayerPruning(), PlainCNN(width=4), "no removable block"),
        (LayerPruning(sparsity=0.9), ResidualCNN(width=4, depth=1), "would remove every removable block"),
    ],
)
def test_bad_models_fail_before_the_first_step(trainer_factory, callback, backbone, message):
    trainer = trainer_factory(callbacks=[callback], limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=message):
        trainer.fit(ClassifierModule(backbone), DigitsDataModule(batch_size=16))


def test_bad_arguments():
    with pytest.raises(ValueError, match="'medium'"):
        LayerPruning(mode="medium")
    with pytest.raises(ValueError, match=r"1\.5"):
        LayerPruning(sparsity=1.5)
