"""Pretrained teachers from checkpoints, and DistillationModule through LightningCLI with class_path networks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_compress.demo import ClassifierModule, ResidualCNN
from lightning_compress.distillation import DistillationModule
from lightning_compress.distillation.checkpoints import find_prefix, load_network_weights

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")


@pytest.fixture
def teacher_checkpoint(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(5)
    classifier = ClassifierModule(ResidualCNN(width=8))
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": classifier.state_dict(), "epoch": 3}, path)
    return path, classifier.backbone


def test_load_network_weights_finds_the_prefix(teacher_checkpoint: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, trained = teacher_checkpoint
    network = load_network_weights(ResidualCNN(width=8), path)
    torch.testing.assert_close(network.stage3[0].conv2.weight, trained.stage3[0].conv2.weight)
    plain = tmp_path / "plain.pt"
    torch.save(trained.state_dict(), plain)
    torch.testing.assert_close(load_network_weights(ResidualCNN(width=8), plain).fc.bias, trained.fc.bias)
    with pytest.raises(ValueError, match="no complete set of ResidualCNN weights"):
        load_network_weights(ResidualCNN(width=4), path)  # the names match, the shapes do not
    state = {k: torch.zeros(1, 1) if k.endswith("weight") else torch.zeros(1)
             for k in ("a.b.weight", "a.b.bias", "b.weight", "b.bias")}
    assert find_prefix(state, nn.Linear(1, 1)) == "b."  # the shortest complete prefix


def test_teacher_checkpoint_argument(teacher_checkpoint: tuple[Path, nn.Module]) -> None:
    path, trained = teacher_checkpoint
    module = DistillationModule(ResidualCNN(width=4), ResidualCNN(width=8), teacher_checkpoint=str(path))
    torch.testing.assert_close(module.teacher.fc.weight, trained.fc.weight)
    assert not module.teacher.fc.weight.requires_grad
    with pytest.raises(ValueError, match="one path per teacher"):
        DistillationModule(ResidualCNN(width=4), ResidualCNN(width=8), teacher_checkpoint=[str(path)] * 2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_lightning_cli_with_class_path_networks(
    teacher_checkpoint: tuple[Path, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("jsonargparse")
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    from lightning_compress.cli import build_cli

    path, trained = teacher_checkpoint
    config = tmp_path / "distill.yaml"
    config.write_text(f"""
model:
  class_path: lightning_compress.distillation.DistillationModule
  init_args:
    student: {{class_path: lightning_compress.demo.ResidualCNN, init_args: {{width: 4}}}}
    teacher: {{class_path: lightning_compress.demo.ResidualCNN, init_args: {{width: 8}}}}
    teacher_checkpoint: {path}
    temperature: 3.0
    student_layers: [stage2]
    teacher_layers: [stage2]
    hint_weight: 0.5
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  num_sanity_val_steps: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
""")
    cli = build_cli(["fit", "--config", str(config)])
    model = cli.model
    assert isinstance(model, DistillationModule) and model.temperature == 3.0
    assert cli.trainer.global_step == 2
    torch.testing.assert_close(model.teacher.fc.weight, trained.fc.weight)  # frozen and loaded
