"""Adversarial distillation: the losses by hand, which player each term trains, frozen teacher, resume, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_compress.demo import DigitsDataModule, ResidualCNN
from lightning_compress.distillation.methods.adversarial import (
    AdversarialDistillationModule,
    Discriminator,
    discriminator_accuracy,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    pooled_features,
)
from lightning_compress.testing import read_scalars

pytestmark = [pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
              pytest.mark.filterwarnings("ignore:.*self.log.*")]
FEATURES = {"adversarial_student_layers": ["stage3"], "adversarial_teacher_layers": ["stage3"]}


def _teacher() -> nn.Module:
    torch.manual_seed(1)
    return ResidualCNN(width=8)


def _student() -> nn.Module:
    torch.manual_seed(2)
    return ResidualCNN(width=4)


def _batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator)


# ------------------------------------------------------------------ the losses by hand


def test_bce_losses_and_accuracy_by_hand() -> None:
    teacher, student = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.0])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected_d = (softplus(-1) + softplus(-2)) / 2 + (softplus(-1) + softplus(0)) / 2
    assert discriminator_loss(teacher, student).item() == pytest.approx(expected_d)
    assert generator_loss(student).item() == pytest.approx((softplus(1) + softplus(0)) / 2)
    # teacher 1, 2 > 0 right; student -1 < 0 right, 0 wrong
    assert discriminator_accuracy(teacher, student).item() == pytest.approx(0.75)
    # a discriminator that cannot tell: 2 ln 2 for itself, ln 2 for the student
    assert discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(2 * math.log(2))
    assert generator_loss(torch.zeros(4)).item() == pytest.approx(math.log(2))


def test_wasserstein_losses_and_accuracy_by_hand() -> None:
    teacher, student = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-1.0, 3.0, 1.0])
    assert discriminator_loss(teacher, student, "wasserstein").item() == pytest.approx(1.0 - 1.0)
    assert generator_loss(student, "wasserstein").item() == pytest.approx(-1.0)
    assert discriminator_accuracy(teacher, student, "wasserstein").item() == pytest.approx(1 / 3)  # only 1 > -1
    with pytest.raises(ValueError, match=r"adversarial_loss must be one of .* got 'hinge'"):
        generator_loss(student, "hinge")


def test_gradient_penalty_by_hand() -> None:
    critic = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[0.6, 0.8]]))  # a unit gradient everywhere: no penalty
    assert gradient_penalty(critic, torch.ones(3, 2), torch.zeros(3, 2), torch.rand(3, 1)).item() == pytest.approx(0)
    # critic(x) = sum(x^2) / 2 has gradient x; at the interpolate 0.5 * (2, 0) + 0.5 * (0, 0) = (1, 0): norm 1; at
    # 0.25 * (4, 0) + 0.75 * (0, 0) = (1, 0) too; at 1.0 * (3, 4): norm 5, (5 - 1)^2 = 16
    quadratic = lambda x: x.pow(2).sum(1) / 2  # noqa: E731

    class Quadratic(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return quadratic(x)

    teacher = torch.tensor([[2.0, 0.0], [4.0, 0.0], [3.0, 4.0]])
    mix = torch.tensor([[0.5], [0.25], [1.0]])
    penalty = gradient_penalty(Quadratic(), teacher, torch.zeros(3, 2), mix)
    assert penalty.item() == pytest.approx(16 / 3)
    with pytest.raises(ValueError, match="same shape"):
        gradient_penalty(critic, torch.ones(3, 2), torch.ones(2, 2), mix)


def test_gradient_penalty_trains_the_critic() -> None:
    critic = nn.Linear(2, 1, bias=False)
    penalty = gradient_penalty(critic, torch.ones(3, 2), torch.zeros(3, 2), torch.rand(3, 1))
    penalty.backward()
    norm = critic.weight.detach().norm()
    # d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    torch.testing.assert_close(critic.weight.grad, 2 * (norm - 1) * critic.weight.detach() / norm)


def test_pooled_features_and_discriminator_shapes() -> None:
    maps = torch.arange(8.0).reshape(1, 2, 2, 2)
    torch.testing.assert_close(pooled_features([maps, torch.tensor([[7.0]])]), torch.tensor([[1.5, 5.5, 7.0]]))
    assert Discriminator(5, [3, 2])(torch.zeros(4, 5)).shape == (4,)


# ------------------------------------------------------------------ which player each term trains


def _grads(loss: torch.Tensor, module: nn.Module) -> list[torch.Tensor | None]:
    parameters = [p for p in module.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True))


@pytest.mark.parametrize("options", [{}, {"adversarial_loss": "wasserstein", "conditional": True, **FEATURES}],
                         ids=["bce-logits", "wasserstein-features-conditional"])
def test_each_term_reaches_only_its_player(options: dict[str, Any]) -> None:
    module = AdversarialDistillationModule(_student(), _teacher(), adversarial_weight=0.5, input_shape=[1, 8, 8],
                                           **options)
    module.setup("fit")
    inputs, _ = _batch()
    student_logits = module.student(inputs)
    teacher_logits = module.teacher_forward(inputs)
    teacher_view, student_view = module.discriminator_inputs(inputs, student_logits, teacher_logits[0])
    game = module.adversarial_terms(teacher_view, student_view)
    assert module.discriminator is not None
    # the generator term: gradient to the student (and its adapter), none to the discriminator
    assert all(g is None for g in _grads(game["adversarial_g"], module.discriminator))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(game["adversarial_g"], module.student.stage3))
    # the discriminator's loss: gradient to the discriminator, none to the student
    assert all(g is None for g in _grads(game["adversarial_d"], module.student))
    assert all(g is not None for g in _grads(game["adversarial_d"], module.discriminator))
    assert not game["discriminator_acc"].requires_grad
    # the discriminator's parameters require grad again after the generator term
    assert all(p.requires_grad for p in module.discriminator.parameters())
    module.remove_taps()


def test_one_backward_gives_each_player_the_gradient_of_its_own_loss() -> None:
    module = AdversarialDistillationModule(_student(), _teacher(), adversarial_weight=0.5,
                                           adversarial_loss="wasserstein", input_shape=[1, 8, 8])
    inputs, targets = _batch()
    loss = module.training_step((inputs, targets), 0)  # no Trainer: logging is skipped
    assert module.discriminator is not None
    student_grads, critic_grads = _grads(loss, module.student), _grads(loss, module.discriminator)

    student_logits = module.student(inputs)
    teacher_logits = module.teacher_forward(inputs)
    terms = module.compute_terms(student_logits, teacher_logits, targets)
    game = module.adversarial_terms(*module.discriminator_inputs(inputs, student_logits, teacher_logits[0]))
    objective = module.combine({**terms, "adversarial_g": game["adversarial_g"]})
    assert set(terms) == {"soft", "hard"}
    for actual, expected in zip(student_grads, _grads(objective, module.student), strict=True):
        torch.testing.assert_close(actual, expected)
    for actual, expected in zip(critic_grads, _grads(game["adversarial_d"], module.discriminator), strict=True):
        torch.testing.assert_close(actual, expected)  # same interpolation points: seeded by the global step


# ------------------------------------------------------------------ training


class Watch(Callback):
    """Teacher frozen and in eval mode at every batch; the losses of every epoch."""

    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        assert all(not m.training for m in pl_module.teacher.modules())
        assert all(not p.requires_grad for p in pl_module.teacher.parameters())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.losses.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("distill/")})


def test_fit_logs_every_term_each_epoch_and_keeps_teacher_frozen(trainer_factory: Any, digits: Any,
                                                                 tmp_path: Path) -> None:
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = AdversarialDistillationModule(_student(), teacher, adversarial_weight=0.5, student_layers=["stage3"],
                                           teacher_layers=["stage3"], pairwise_weight=1.0, **FEATURES)
    watch = Watch()
    trainer = trainer_factory(max_epochs=2, callbacks=[watch], limit_train_batches=3, limit_val_batches=1,
                              num_sanity_val_steps=0)
    trainer.fit(module, datamodule=digits)
    assert trainer.global_step == 6  # one optimizer step per batch
    scalars = read_scalars(tmp_path)
    for tag in ("distill/adversarial_g", "distill/adversarial_d", "distill/discriminator_acc", "distill/soft",
                "distill/hard", "distill/pairwise", "distill/total", "train/acc", "val/acc"):
        assert len(scalars[tag]) == 2, tag
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    assert isinstance(module.adversarial_adapter, nn.Linear)  # student stage3 16 channels, teacher 32
    assert module.adversarial_adapter.in_features == 16 and module.adversarial_adapter.out_features == 32
    assert module._adversarial_student_taps is None  # hooks removed at the end of fit


def test_zero_weight_trains_the_discriminator_as_a_probe(trainer_factory: Any, digits: Any) -> None:
    module = AdversarialDistillationModule(_student(), _teacher(), adversarial_weight=0.0)
    watch = Watch()
    trainer = trainer_factory(callbacks=[watch], limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=digits)
    assert "distill/adversarial_g" not in watch.losses[0]
    assert {"distill/adversarial_d", "distill/discriminator_acc"} <= set(watch.losses[0])


def _run(tmp_path: Path, trainer_factory: Any, max_epochs: int, ckpt: Path | None = None,
         save: Path | None = None) -> tuple[AdversarialDistillationModule, list[dict[str, float]]]:
    pl.seed_everything(0, verbose=False)
    module = AdversarialDistillationModule(_student(), _teacher(), adversarial_weight=0.5,
                                           adversarial_loss="wasserstein", conditional=True, **FEATURES)
    watch = Watch()
    trainer = trainer_factory(max_epochs=max_epochs, callbacks=[watch], limit_train_batches=3, limit_val_batches=1,
                              num_sanity_val_steps=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, seed=0), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return module, watch.losses


def test_resume_from_end_of_epoch_continues_identically(trainer_factory: Any, tmp_path: Path) -> None:
    full, full_losses = _run(tmp_path, trainer_factory, 2)
    _run(tmp_path, trainer_factory, 1, save=tmp_path / "epoch1.ckpt")
    resumed, resumed_losses = _run(tmp_path, trainer_factory, 2, ckpt=tmp_path / "epoch1.ckpt")
    assert len(resumed_losses) == 1
    assert resumed_losses[0] == pytest.approx(full_losses[1], abs=1e-6)
    for part in ("student", "discriminator", "adversarial_adapter"):
        expected, actual = getattr(full, part).state_dict(), getattr(resumed, part).state_dict()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=f"{part}.{key}")
    assert not resumed.teacher.training and not any(p.requires_grad for p in resumed.teacher.parameters())


def test_checkpoint_keys_and_loading_into_a_fresh_module(trainer_factory: Any, digits: Any, tmp_path: Path) -> None:
    module = AdversarialDistillationModule(_student(), _teacher(), **FEATURES)
    trainer = trainer_factory(limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=digits)
    path = tmp_path / "adversarial.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert not any(k.startswith("teachers.") for k in keys)
    assert {k.split(".")[0] for k in keys} == {"student", "discriminator", "adversarial_adapter"}
    assert "discriminator.layers.0.weight" in keys and "adversarial_adapter.weight" in keys
    # the one optimizer holds the discriminator's moments too
    trainable = [p for m in module.trainable_modules() for p in m.parameters()]
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(trainable)

    fresh = AdversarialDistillationModule.load_from_checkpoint(path, student=ResidualCNN(width=4), teacher=_teacher())
    assert fresh.discriminator is not None
    torch.testing.assert_close(fresh.discriminator.state_dict()["layers.0.weight"],
                               module.discriminator.state_dict()["layers.0.weight"])
    torch.testing.assert_close(fresh.adversarial_adapter.weight, module.adversarial_adapter.weight)
    assert fresh.adversarial_student_layers == ["stage3"]
    alone = AdversarialDistillationModule.student_from_checkpoint(path, ResidualCNN(width=4))
    torch.testing.assert_close(alone.fc.weight, module.student.fc.weight)


def test_generator_term_is_active_in_the_feature_stage_too() -> None:
    module = AdversarialDistillationModule(_student(), _teacher(), student_layers=["stage2"], teacher_layers=["stage2"],
                                           hint_weight=1.0, feature_stage_epochs=1)
    assert module.in_feature_stage and module.active_terms() == ["hint", "adversarial_g"]
    module.feature_stage_epochs = 0  # a one-stage run: every positive term
    assert module.active_terms() == ["soft", "hard", "hint", "adversarial_g"]


def test_conditional_discriminator_reads_the_input_too() -> None:
    module = AdversarialDistillationModule(_student(), _teacher(), conditional=True, discriminator_hidden=[8],
                                           input_shape=[1, 8, 8])
    assert module.discriminator.layers[0].in_features == 64 + 10
    plain = AdversarialDistillationModule(_student(), _teacher(), input_shape=[1, 8, 8], **FEATURES)
    assert plain.discriminator.layers[0].in_features == 32


# ------------------------------------------------------------------ misconfiguration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adversarial_weight": -0.5}, "adversarial_weight must be a finite non-negative number, got -0.5"),
        ({"adversarial_loss": "hinge"}, "adversarial_loss must be one of .* got 'hinge'"),
        ({"gradient_penalty_weight": -1.0}, "gradient_penalty_weight must be a finite non-negative number, got -1.0"),
        ({"discriminator_hidden": [16, 0]}, r"discriminator_hidden must list positive widths, got \[16, 0\]"),
        ({"adversarial_student_layers": ["stage3"]}, "pair up one to one, got 1 and 0"),
        ({"adversarial_student_layers": ["stage7"], "adversarial_teacher_layers": ["stage3"]},
         "Unknown student layer 'stage7'"),
        ({"adversarial_student_layers": ["stage3"], "adversarial_teacher_layers": ["block3"]},
         "Unknown teacher layer 'block3'"),
        ({"soft_weight": -1.0}, "soft_weight must be a finite non-negative number, got -1.0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdversarialDistillationModule(_student(), _teacher(), **kwargs)


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*")
def test_conditioning_on_a_non_tensor_input_fails_before_training(trainer_factory: Any) -> None:
    class DictNet(nn.Linear):
        def forward(self, x: Any) -> torch.Tensor:
            return super().forward(x["image"])

    class DictInputs(AdversarialDistillationModule):
        def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
            return {"image": batch[0]}, batch[1]

    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    module = DictInputs(DictNet(4, 3), DictNet(4, 3), conditional=True)
    trainer = trainer_factory(limit_train_batches=1, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"conditional=True .* must be a tensor; got dict"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == 0
