"""Learning without Forgetting: the loss by hand, the old head distilled on new data, the old network frozen."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.demo import ResidualCNN
from lightning_compress.distillation.methods.lifelong import (
    LwFModule,
    TaskSplitDataModule,
    TwoHeadNetwork,
    lwf_loss,
    split_head,
)


def test_lwf_loss_by_hand() -> None:
    # recorded logits [ln 4, 0] at T = 2: softened target = [2/3, 1/3]; the old head's logits [0, 0]: [1/2, 1/2]
    recorded = torch.tensor([[math.log(4.0), 0.0]])
    head = torch.zeros(1, 2)
    expected = -(2 / 3 * math.log(0.5) + 1 / 3 * math.log(0.5))
    assert lwf_loss(head, recorded, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    # head = recorded: the minimum, the entropy of the target (a cross-entropy, not a KL; no T^2 factor)
    entropy = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert lwf_loss(recorded, recorded, 2.0).item() == pytest.approx(entropy, rel=1e-6)
    # at T = 1 it is the cross-entropy with the soft targets; averaged over the batch
    two = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    by_hand = -(F.softmax(two, 1) * F.log_softmax(head.expand(2, 2), 1)).sum(1).mean()
    assert lwf_loss(head.expand(2, 2), two, 1.0).item() == pytest.approx(by_hand.item())


def test_lwf_loss_gradient_equals_soft_target_gradient_over_t_squared() -> None:
    from lightning_compress.distillation.losses import soft_target_loss

    head = torch.randn(5, 4, requires_grad=True)
    recorded = torch.randn(5, 4)
    (grad_lwf,) = torch.autograd.grad(lwf_loss(head, recorded, 2.0), head)
    (grad_kd,) = torch.autograd.grad(soft_target_loss(head, recorded, 2.0), head)
    assert torch.allclose(grad_lwf * 4.0, grad_kd, atol=1e-6)


def test_lwf_loss_errors() -> None:
    with pytest.raises(ValueError, match="temperature must be a finite positive number, got 0"):
        lwf_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        lwf_loss(torch.zeros(1, 2), torch.zeros(1, 3))


def test_split_head_and_two_head_network(tiny_input: torch.Tensor) -> None:
    model = ResidualCNN(width=4, num_classes=5)
    backbone, head = split_head(model)
    assert isinstance(backbone.fc, nn.Identity) and isinstance(model.fc, nn.Linear)  # the model is unchanged
    model.eval(), backbone.eval()
    assert torch.allclose(head(backbone(tiny_input)), model(tiny_input), atol=1e-6)
    net = TwoHeadNetwork(backbone, head, nn.Linear(head.in_features, 3))
    old, new = net.heads(tiny_input)
    assert torch.equal(net(tiny_input), torch.cat([old, new], 1)) and net(tiny_input).shape == (4, 8)
    with pytest.raises(ValueError, match="Unknown head 'head'"):
        split_head(model, "head")


def _module(**options):  # type: ignore[no-untyped-def]
    old = ResidualCNN(width=4, num_classes=3)
    backbone, old_head = split_head(old)
    return old, LwFModule(backbone, old_head, nn.Linear(old_head.in_features, 2), input_shape=[1, 8, 8], **options)


def test_old_model_is_a_frozen_copy_and_stays_in_eval() -> None:
    old, module = _module()
    assert all(not p.requires_grad for p in module.old_model.parameters())
    assert all(p.requires_grad for p in module.network.parameters())
    module.train()
    assert not module.old_model.training and module.network.training
    old.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(module.old_model(x), old(x), atol=1e-6)
    assert module.compression_target is module.network
    assert module.old_model[0] is not module.network.backbone


def test_training_step_distills_the_old_head_on_new_data() -> None:
    _, module = _module(old_weight=0.5, new_weight=2.0, temperature=2.0)
    module.train()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0])
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        old_logits, new_logits = module.network.heads(x)
        recorded = module.old_model(x)
    # the old head is trained toward the old network's outputs on the new task's inputs
    expected = 2.0 * F.cross_entropy(new_logits, y) + 0.5 * lwf_loss(old_logits, recorded, 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert module.network.old_head.weight.grad is not None and module.network.old_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.old_model.parameters())


def test_without_lwf_the_old_head_gets_no_gradient() -> None:
    _, module = _module(old_weight=0.0)
    module.log = lambda *args, **kwargs: None
    module.training_step((torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])), 0).backward()
    assert module.network.old_head.weight.grad is None
    assert module.network.backbone.stem.conv.weight.grad is not None


def test_fit_keeps_the_old_network_frozen_and_logs(trainer_factory) -> None:  # type: ignore[no-untyped-def]
    _, module = _module()
    old_state = copy.deepcopy(module.old_model.state_dict())
    data = TaskSplitDataModule(classes=[5, 6], old_classes=[0, 1, 2], batch_size=32)
    trainer = trainer_factory(limit_train_batches=3, limit_val_batches=2)
    trainer.fit(module, data)
    for key, value in module.old_model.state_dict().items():
        assert torch.equal(value, old_state[key]), key  # weights and BatchNorm statistics untouched
    metrics = trainer.callback_metrics
    for name in ("distill/new", "distill/old", "distill/total", "train/acc", "val/acc", "val/acc_old"):
        assert name in metrics, name
    new_task, old_task = trainer.test(module, data, verbose=False)  # one dict per test loader
    assert "test/acc" in new_task and "test/acc_old" in old_task


def test_checkpoint_leaves_out_the_old_network(trainer_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, module = _module()
    trainer = trainer_factory(limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, TaskSplitDataModule(classes=[5, 6], batch_size=32))
    path = tmp_path / "lwf.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and not any(k.startswith("old_model.") for k in state)
    backbone, old_head = split_head(ResidualCNN(width=4, num_classes=3))
    fresh = LwFModule.load_from_checkpoint(path, backbone=backbone, old_head=old_head,
                                           new_head=nn.Linear(old_head.in_features, 2), weights_only=False)
    assert torch.equal(fresh.network.new_head.weight, module.network.new_head.weight)
    assert torch.equal(fresh.network.backbone.stem.conv.weight, module.network.backbone.stem.conv.weight)


def test_warmup_trains_only_the_new_head() -> None:
    _, module = _module(warmup_epochs=1)
    module.log = lambda *args, **kwargs: None
    assert module.in_warmup
    module.training_step((torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])), 0).backward()
    assert module.network.new_head.weight.grad is not None
    assert all(p.grad is None for p in module.network.backbone.parameters())
    assert module.network.old_head.weight.grad is None


def test_task_split_data_module_relabels_and_splits() -> None:
    data = TaskSplitDataModule(classes=[7, 3], old_classes=[0], batch_size=16)
    data.setup()
    labels = torch.cat([y for _, y in data.train_dataloader()])
    assert set(labels.tolist()) == {0, 1}
    base_labels = data.base.train_set.tensors[1]
    assert (labels == 0).sum() == (base_labels == 7).sum() and (labels == 1).sum() == (base_labels == 3).sum()
    new_val, old_val = data.val_dataloader()
    assert set(torch.cat([y for _, y in old_val]).tolist()) == {0}
    val_labels = data.base.val_set.tensors[1]
    assert len(new_val.dataset) == int(((val_labels == 7) | (val_labels == 3)).sum())
    single = TaskSplitDataModule(classes=[1, 2])
    single.setup()
    assert not isinstance(single.val_dataloader(), list)


def test_bad_arguments() -> None:
    backbone, head = split_head(ResidualCNN(width=4, num_classes=3))
    new = nn.Linear(head.in_features, 2)
    with pytest.raises(ValueError, match="old_weight must be a finite non-negative number, got -1"):
        LwFModule(backbone, head, new, old_weight=-1)
    with pytest.raises(ValueError, match="must not both be zero"):
        LwFModule(backbone, head, new, old_weight=0, new_weight=0)
    with pytest.raises(ValueError, match="temperature must be a finite positive number"):
        LwFModule(backbone, head, new, temperature=0)
    with pytest.raises(ValueError, match="warmup_epochs must be a non-negative integer, got -2"):
        LwFModule(backbone, head, new, warmup_epochs=-2)
    with pytest.raises(ValueError, match="given twice"):
        LwFModule(backbone, head, head)
    with pytest.raises(ValueError, match="new_head does not accept the backbone's features of shape \\(2, 16\\)"):
        LwFModule(backbone, head, nn.Linear(7, 2), input_shape=[1, 8, 8])
    with pytest.raises(ValueError, match="must be disjoint; shared: \\[3\\]"):
        TaskSplitDataModule(classes=[3, 4], old_classes=[1, 3])
    with pytest.raises(ValueError, match="non-empty list of distinct labels"):
        TaskSplitDataModule(classes=[])
    with pytest.raises(ValueError, match="No train sample has a label in \\[42\\]"):
        TaskSplitDataModule(classes=[42]).setup()
