"""MutualLearningModule (online) and SelfDistillationModule (exit heads): fits, logs, targets, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress.demo import MLP, ResidualCNN
from lightning_compress.distillation import ExitHead, MutualLearningModule, SelfDistillationModule, losses
from lightning_compress.testing import read_scalars

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")
QUICK = {"limit_train_batches": 2, "limit_val_batches": 2, "num_sanity_val_steps": 0}


def test_mutual_learning_fit_logs_each_peer(trainer_factory: Any, digits: Any, tmp_path: Path) -> None:
    peers = [ResidualCNN(width=4), MLP(hidden=(16,)), ResidualCNN(width=4)]
    before = [p.fc.weight.clone() if hasattr(p, "fc") else p.classifier.weight.clone() for p in peers]
    module = MutualLearningModule(peers, temperature=1.0, lr=1e-2)
    trainer_factory(**QUICK).fit(module, datamodule=digits)
    after = [p.fc.weight if hasattr(p, "fc") else p.classifier.weight for p in peers]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # every peer trains
    scalars = read_scalars(tmp_path)
    for tag in ("distill/total", "distill/agreement", "val/acc", "val/loss",
                *(f"val/acc/peer{k}" for k in range(3)), *(f"distill/peer{k}" for k in range(3))):
        assert tag in scalars, tag
    assert module.compression_target is module.peers


def test_mutual_learning_step_equals_the_loss_function() -> None:
    peers = [nn.Linear(4, 3), nn.Linear(4, 3)]
    module = MutualLearningModule(peers, temperature=2.0)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    total = module.training_step((x, y), 0)
    torch.testing.assert_close(total, losses.mutual_learning_loss([p(x) for p in peers], y, 2.0).sum())


def test_mutual_learning_errors() -> None:
    peer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="at least 2 peers, got 1"):
        MutualLearningModule([peer])
    with pytest.raises(ValueError, match="given twice"):
        MutualLearningModule([peer, peer])
    with pytest.raises(ValueError, match=r"same number of classes, got output shapes \[\(3,\), \(2,\)\]"):
        MutualLearningModule([peer, nn.Linear(4, 2)], input_shape=[4])
    with pytest.raises(ValueError, match="temperature must be a finite positive number, got -1"):
        MutualLearningModule([peer, nn.Linear(4, 3)], temperature=-1)


def test_exit_head_shapes() -> None:
    logits, features = ExitHead(6, 6, 5, rank=2)(torch.zeros(3, 6))
    assert logits.shape == (3, 5) and features.shape == (3, 6)
    assert isinstance(ExitHead(6, 6, 5).proj, nn.Identity)


def test_self_distillation_fit_logs_each_exit(trainer_factory: Any, digits: Any, tmp_path: Path) -> None:
    backbone = ResidualCNN(width=4)
    module = SelfDistillationModule(backbone, exit_layers=["stage1", "stage2"], feature_layer="stage3")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = trainer_factory(enable_checkpointing=True, callbacks=[checkpoint], **QUICK)
    trainer.fit(module, datamodule=digits)
    assert [h.fc.in_features for h in module.heads] == [16, 16]  # bottlenecks to stage3's width
    scalars = read_scalars(tmp_path)
    for tag in ("distill/total", "distill/hard", "distill/soft", "distill/feature", "train/acc", "val/acc",
                "val/acc/stage1", "val/acc/stage2"):
        assert tag in scalars, tag
    assert module.compression_target is backbone
    assert sum(len(m._forward_hooks) for m in module.modules()) == 0  # taps removed at teardown
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    fresh = SelfDistillationModule.load_from_checkpoint(path, backbone=ResidualCNN(width=4))
    torch.testing.assert_close(fresh.heads[1].fc.weight, module.heads[1].fc.weight)


def test_self_distillation_step_equals_byot_loss() -> None:
    torch.manual_seed(0)
    module = SelfDistillationModule(ResidualCNN(width=4), ["stage1"], feature_layer="stage3", input_shape=[1, 8, 8],
                                    feature_weight=0.5)
    module.setup("fit")
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.eval()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    total = module.training_step((x, y), 0)
    with torch.no_grad():
        taps = {}
        hooks = [getattr(module.backbone, n).register_forward_hook(lambda m, i, o, n=n: taps.__setitem__(n, o))
                 for n in ("stage1", "stage3")]
        final = module.backbone(x)
        for hook in hooks:
            hook.remove()
        head_logits, head_features = module.heads[0](taps["stage1"])
        expected = losses.be_your_own_teacher_loss(
            [head_logits, final], y, [head_features, taps["stage3"].mean(dim=(2, 3))], 0.1, 3.0, 0.5
        )
    torch.testing.assert_close(total.detach(), expected)
    module.teardown("fit")


def test_self_distillation_errors() -> None:
    with pytest.raises(ValueError, match="exit_layers must name at least one stage"):
        SelfDistillationModule(ResidualCNN(width=4), [])
    with pytest.raises(ValueError, match="Unknown backbone layer 'stage5'"):
        SelfDistillationModule(ResidualCNN(width=4), ["stage5"])
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 2"):
        SelfDistillationModule(ResidualCNN(width=4), ["stage1"], alpha=2)
