"""A checkpoint of a network compacted in place and quantized later in the same fit is evaluated with
``trainer.test(ckpt_path=...)`` in a fresh model (the compactions replayed, then the quantizers attached) and in the
same process after fit; no patched hook stays on the module, even after a failed load."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import FilterPruning, QuantizationAwareTraining
from lightning_compress.demo import MLP, ClassifierModule, DigitsDataModule, ResidualCNN
from lightning_compress.pruning.schedules import AGP


def _callbacks():
    return [FilterPruning(sparsity=0.5, mode="soft", schedule=AGP(start=0, end=2), compact_at_schedule_end=True,
                          recalibration_batches=2),
            QuantizationAwareTraining(calibration_batches=2, start_epoch=3)]


def _test(trainer_factory, module, ckpt_path=None):
    trainer = trainer_factory(callbacks=_callbacks(), limit_test_batches=2)
    return trainer.test(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path, verbose=False)[0]["test/acc"]


@pytest.mark.parametrize("network", [lambda: ResidualCNN(width=8), lambda: MLP(64, [32, 32])], ids=["cnn", "mlp"])
def test_compacted_quantized_checkpoint_tests_in_a_fresh_model(tmp_path, trainer_factory, network):
    torch.manual_seed(0)
    module = ClassifierModule(network(), lr=3e-3)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True)
    trainer = trainer_factory(callbacks=[*_callbacks(), checkpoints], max_epochs=5, limit_train_batches=3,
                              limit_val_batches=2, enable_checkpointing=True)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    last = str(tmp_path / "ckpt" / "last.ckpt")
    after_fit = _test(trainer_factory, module, last)  # same process: already compact and quantized
    fresh = ClassifierModule(network(), lr=3e-3)
    assert _test(trainer_factory, fresh, last) == pytest.approx(after_fit)
    state = torch.load(last, weights_only=False)["state_dict"]
    assert fresh.state_dict().keys() == state.keys()
    for key, value in fresh.state_dict().items():
        assert value.shape == state[key].shape, key
    # the checkpoint holds a compacted network (so equal shapes mean the compactions were replayed) ...
    assert sum(p.numel() for p in fresh.backbone.parameters()) < sum(p.numel() for p in network().parameters())
    # ... and a quantized one
    assert any(key.endswith("input_quantizer.amax") for key in fresh.state_dict())
    assert "on_load_checkpoint" not in vars(fresh) and "on_load_checkpoint" not in vars(module)


def test_a_failed_load_leaves_no_patched_hook(tmp_path, trainer_factory):
    module = ClassifierModule(ResidualCNN(width=8))
    wrong = ClassifierModule(ResidualCNN(width=4))
    path = tmp_path / "wrong.ckpt"
    trainer = trainer_factory(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(wrong, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _test(trainer_factory, module, str(path))
    assert "on_load_checkpoint" not in vars(module)


@pytest.fixture(scope="module")
def compressed_checkpoint(tmp_path_factory):
    """A distillation run whose student was compacted (epoch 1) and quantized (from epoch 3): its last.ckpt."""
    from conftest import make_trainer

    from lightning_compress import DistillationModule

    root = tmp_path_factory.mktemp("compressed")
    torch.manual_seed(0)
    module = DistillationModule(ResidualCNN(width=8), ResidualCNN(width=8), lr=3e-3)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=1, save_last=True)
    trainer = make_trainer(root, callbacks=[*_callbacks(), checkpoints], max_epochs=5, limit_train_batches=3,
                           limit_val_batches=2, enable_checkpointing=True)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return root / "ckpt" / "last.ckpt", module.student.eval()


def test_load_compressed_brings_a_fresh_model_to_the_compressed_student(compressed_checkpoint):
    from lightning_compress import load_compressed
    from lightning_compress.quantization.quantizers import quantized_layers, remove_quantizers

    path, student = compressed_checkpoint
    inputs = torch.randn(16, 1, 8, 8)
    fresh = load_compressed(path, ResidualCNN(width=8)).eval()
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in student.parameters())
    assert set(quantized_layers(fresh)) == set(quantized_layers(student)) != set()
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs), student(inputs))
    float_only = load_compressed(path, ResidualCNN(width=8), quantized=False).eval()
    assert not quantized_layers(float_only)
    reference = remove_quantizers(student) and student
    with torch.no_grad():
        torch.testing.assert_close(float_only(inputs), reference(inputs))


def test_a_plain_load_of_a_compressed_checkpoint_points_to_load_compressed(compressed_checkpoint):
    from lightning_compress.distillation import load_network_weights

    with pytest.raises(ValueError, match=r"load_compressed\(path, model\)"):
        load_network_weights(ResidualCNN(width=8), compressed_checkpoint[0])
