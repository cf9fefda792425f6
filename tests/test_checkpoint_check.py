"""check_checkpoint: a real Lightning checkpoint loads; a truncated, empty, random, non-dict or missing one raises a
CheckpointError that names the path, the size and the underlying error, and leaves the file as it was. The loaders of
the distillation package (student_from_checkpoint, teacher_checkpoint) give the same error."""

from __future__ import annotations

import gc
import pickle
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lightning_compress import DistillationModule
from lightning_compress.demo import ClassifierModule, DigitsDataModule, PlainCNN
from lightning_compress.distillation.checkpoints import load_network_weights
from lightning_compress.utils import CheckpointError, check_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by a tiny fit (ModelCheckpoint's epoch file and last.ckpt)."""
    from conftest import make_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = tmp_path_factory.mktemp("ckpt")
    saver = ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)
    trainer = make_trainer(root, callbacks=[saver], enable_checkpointing=True, limit_train_batches=2,
                           limit_val_batches=1)
    trainer.fit(ClassifierModule(PlainCNN(width=4)), DigitsDataModule(batch_size=32))
    return root / "checkpoints" / "last.ckpt"


def _damaged(checkpoint, tmp_path, damage):
    directory = tmp_path / "checkpoints"
    shutil.copytree(checkpoint.parent, directory)
    path = directory / "last.ckpt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(random.Random(0).randbytes(4096))  # seeded: the same bytes, the same error, every run
    elif damage == "list":
        torch.save([1, 2, 3], path)
    elif damage == "no state_dict":
        torch.save({"epoch": 3, "weights": {}}, path)
    elif damage == "missing":
        path.unlink()
    return path


def test_a_real_checkpoint_loads(checkpoint):
    before = checkpoint.read_bytes()
    loaded = check_checkpoint(checkpoint)
    assert {"state_dict", "epoch", "global_step"} <= loaded.keys()
    assert "backbone.classifier.weight" in loaded["state_dict"]
    assert checkpoint.read_bytes() == before


DAMAGES = {
    # damage: (diagnosis, what torch raised)
    "truncated": ("the file is truncated or corrupt (a damaged zip archive", (RuntimeError, OSError)),
    "empty": ("the file is empty (0 bytes): corrupt", EOFError),
    "random": ("the file is corrupt or not a PyTorch checkpoint", pickle.UnpicklingError),
    "list": ("it holds a list, not a checkpoint dictionary", type(None)),
    "no state_dict": ("it is a dictionary without 'state_dict' (keys ['epoch', 'weights']), not a Lightning "
                      "checkpoint", type(None)),
    "missing": ("the file does not exist", FileNotFoundError),
}


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_raises_a_clear_error_and_changes_nothing(checkpoint, tmp_path, damage, mmap):
    path = _damaged(checkpoint, tmp_path, damage)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    with pytest.raises(CheckpointError) as info:
        check_checkpoint(path, mmap=mmap)
    message = str(info.value)
    size = "size unknown" if damage == "missing" else f"{path.stat().st_size:,} bytes"
    diagnosis, raised = DAMAGES[damage]
    assert message.startswith(f"Checkpoint '{path}' ({size}) cannot be used: {diagnosis}")
    cause = info.value.__cause__
    assert isinstance(cause, raised)
    if cause is not None:  # torch's own error, named in the message and chained
        assert f"[{type(cause).__name__}: {str(cause).splitlines()[0]}]" in message
    assert "Nothing was loaded and no file was changed or overwritten" in message
    assert "Resume from another checkpoint instead, e.g. an earlier 'epoch=..' file or the run's 'last.ckpt'" in message
    assert "(next to it: 'epoch=0-step=2.ckpt')" in message  # the checkpoint to resume from instead
    assert isinstance(info.value, ValueError)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_the_mmap_check_maps_the_tensors_instead_of_reading_them(checkpoint, tmp_path):
    read = check_checkpoint(checkpoint)
    mapped = check_checkpoint(checkpoint, mmap=True)
    assert read.keys() == mapped.keys() and read["epoch"] == mapped["epoch"]
    for name, tensor in read["state_dict"].items():
        assert torch.equal(mapped["state_dict"][name], tensor)
    # The mapped check leaves the tensors in the file (a memory map of it), the full load copies them into memory.
    big = tmp_path / "big.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1_000_000)}}, big)

    linux = sys.platform.startswith("linux")  # where the process lists its memory maps in /proc/self/maps

    kept = check_checkpoint(big, mmap=True)
    if linux:
        assert str(big) in Path("/proc/self/maps").read_text()
    del kept
    gc.collect()
    copied = check_checkpoint(big)
    assert copied["state_dict"]["w"].sum() == 0
    if linux:
        assert str(big) not in Path("/proc/self/maps").read_text()
    legacy = tmp_path / "legacy.ckpt"  # the pre-zip format cannot be mapped: read whole, no error
    torch.save({"state_dict": {"w": torch.ones(3)}}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(check_checkpoint(legacy, mmap=True)["state_dict"]["w"], torch.ones(3))


def test_a_plain_state_dict_is_accepted_when_asked(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(PlainCNN(width=4).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        check_checkpoint(path)
    assert "classifier.weight" in check_checkpoint(path, require_state_dict=False)


def test_student_from_a_truncated_checkpoint_loads_nothing(checkpoint, tmp_path):
    path = _damaged(checkpoint, tmp_path, "truncated")
    network = PlainCNN(width=4)
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        DistillationModule.student_from_checkpoint(path, network)
    with pytest.raises(CheckpointError, match="Nothing was loaded"):
        load_network_weights(network, path)
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in weights.items())
    assert load_network_weights(network, checkpoint) is network  # the intact file still loads


def test_corrupt_teacher_checkpoint_names_the_argument(checkpoint, tmp_path):
    path = _damaged(checkpoint, tmp_path, "random")
    with pytest.raises(CheckpointError) as info:
        DistillationModule(PlainCNN(width=4), PlainCNN(width=4), teacher_checkpoint=str(path))
    message = str(info.value)
    assert message.startswith(f"teacher_checkpoint '{path}' (4,096 bytes) cannot be used")
    assert "Point teacher_checkpoint at another checkpoint of the trained teacher" in message
    teacher = PlainCNN(width=4)
    module = DistillationModule(PlainCNN(width=4), teacher, teacher_checkpoint=str(checkpoint))
    expected = check_checkpoint(checkpoint)["state_dict"]["backbone.classifier.weight"]
    assert torch.equal(module.teachers[0].classifier.weight, expected)
