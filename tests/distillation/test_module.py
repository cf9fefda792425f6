"""DistillationModule: frozen teacher, logged terms, feature knowledge, checkpoints, resume and validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress.demo import ResidualCNN
from lightning_compress.distillation import losses
from lightning_compress.distillation.module import DistillationModule
from lightning_compress.testing import read_scalars

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")
QUICK = {"limit_train_batches": 3, "limit_val_batches": 2, "num_sanity_val_steps": 1}


def _teacher() -> nn.Module:
    torch.manual_seed(1)
    return ResidualCNN(width=8)


def _student(width: int = 4) -> nn.Module:
    torch.manual_seed(2)
    return ResidualCNN(width=width)


class TeacherWatch(Callback):
    """Asserts in every batch hook that the teachers are frozen, in eval mode and leave no activation behind."""

    def __init__(self) -> None:
        self.checks = 0

    def _check(self, pl_module: DistillationModule) -> None:
        for teacher in pl_module.teachers:
            assert all(not m.training for m in teacher.modules())
            assert all(not p.requires_grad for p in teacher.parameters())
        self.checks += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self._check(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self._check(pl_module)
        for taps in (pl_module._teacher_taps, pl_module._student_taps):
            assert taps is None or not taps.outputs  # no activation kept past the step

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self._check(pl_module)


def test_fit_logs_terms_and_keeps_teacher_frozen(trainer_factory: Any, digits: Any, tmp_path: Path) -> None:
    teacher = _teacher()
    before = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(_student(), teacher, soft_weight=0.7, hard_weight=0.3, temperature=4.0)
    watch = TeacherWatch()
    trainer = trainer_factory(callbacks=[watch], max_epochs=2, **QUICK)
    trainer.fit(module, datamodule=digits)
    assert watch.checks > 0
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # BN running stats included
    scalars = read_scalars(tmp_path)
    for tag in ("distill/soft", "distill/hard", "distill/total", "train/acc", "val/acc", "val/loss",
                "distill/agreement"):
        assert len(scalars[tag]) == 2, tag  # once per epoch
    assert len(scalars["val/teacher_acc"]) == 1
    soft, hard, total = (scalars[f"distill/{t}"][-1][1] for t in ("soft", "hard", "total"))
    assert total == pytest.approx(0.7 * soft + 0.3 * hard, rel=1e-5)
    assert 0.0 <= scalars["distill/agreement"][-1][1] <= 1.0
    assert module.teacher.training is False and module.student.training is True


def test_teacher_outputs_carry_no_graph() -> None:
    module = DistillationModule(_student(), _teacher(), student_layers=["stage2"], teacher_layers=["stage2"],
                                attention_weight=1.0, input_shape=[1, 8, 8])
    module.setup("validate")
    inputs = torch.randn(3, 1, 8, 8)
    logits = module.teacher_forward(inputs)
    assert logits[0].grad_fn is None and not logits[0].requires_grad
    assert module._teacher_taps is not None and module._teacher_taps["stage2"].grad_fn is None
    assert not torch.is_inference(logits[0])  # no_grad, not inference_mode
    module.teardown("validate")
    assert module._teacher_taps is None
    assert sum(len(m._forward_hooks) for m in module.modules()) == 0


def test_train_mode_never_reaches_the_teacher() -> None:
    module = DistillationModule(_student(), [_teacher(), _teacher()])
    module.train()
    assert module.student.training and not any(m.training for t in module.teachers for m in t.modules())
    module.eval()
    assert not module.student.training


def test_soft_term_uses_weighted_average_of_teachers() -> None:
    t1, t2 = _teacher(), ResidualCNN(width=4)
    module = DistillationModule(_student(), [t1, t2], teacher_weights=[3.0, 1.0], temperature=2.0)
    inputs, targets = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    module.eval()
    student_logits = module.student(inputs)
    teacher_logits = module.teacher_forward(inputs)
    terms = module.compute_terms(student_logits, teacher_logits, targets)
    expected = losses.multi_teacher_soft_target_loss(student_logits, [t1(inputs), t2(inputs)], 2.0, [3.0, 1.0])
    torch.testing.assert_close(terms["soft"], expected)
    torch.testing.assert_close(terms["hard"], losses.hard_target_loss(student_logits, targets))


def test_every_feature_term_trains_and_regressors_are_saved(trainer_factory: Any, digits: Any,
                                                            tmp_path: Path) -> None:
    teacher, student = _teacher(), _student()
    layers = ["stage1", "stage2"]
    module = DistillationModule(
        student, teacher, student_layers=layers, teacher_layers=layers, hint_weight=1.0, attention_weight=100.0,
        similarity_weight=1.0, rkd_distance_weight=1.0, rkd_angle_weight=1.0, pairwise_weight=1.0,
    )
    trainer = trainer_factory(max_epochs=1, enable_checkpointing=True, limit_train_batches=2, limit_val_batches=1,
                              callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt")])
    trainer.fit(module, datamodule=digits)
    assert [type(r.proj) for r in module.regressors] == [nn.Conv2d, nn.Conv2d]
    assert module.regressors[0].proj.weight.shape == (8, 4, 1, 1)
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimizer_params for p in module.regressors.parameters())
    assert not any(id(p) in optimizer_params for p in module.teacher.parameters())
    scalars = read_scalars(tmp_path)
    for term in ("soft", "hard", "hint", "attention", "similarity", "rkd_distance", "rkd_angle", "pairwise"):
        assert f"distill/{term}" in scalars, term
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    state = torch.load(path, weights_only=False)["state_dict"]
    assert "regressors.0.proj.weight" in state and not any(k.startswith("teachers.") for k in state)
    # a fresh module given a teacher loads the checkpoint (regressors rebuilt from the saved shapes)
    fresh = DistillationModule.load_from_checkpoint(path, student=ResidualCNN(width=4), teacher=_teacher())
    torch.testing.assert_close(fresh.regressors[1].proj.weight, module.regressors[1].proj.weight)
    torch.testing.assert_close(fresh.student.fc.weight, module.student.fc.weight)
    # the trained student alone
    alone = DistillationModule.student_from_checkpoint(path, ResidualCNN(width=4))
    torch.testing.assert_close(alone.stem.conv.weight, module.student.stem.conv.weight)


def test_fsp_between_consecutive_layers_of_equal_width(trainer_factory: Any, digits: Any, tmp_path: Path) -> None:
    torch.manual_seed(3)
    teacher, student = ResidualCNN(width=4, depth=2), ResidualCNN(width=4, depth=1)
    layers = ["stem", "stage1", "stage2"]
    module = DistillationModule(student, teacher, soft_weight=0.0, hard_weight=1.0, fsp_weight=1.0,
                                student_layers=layers, teacher_layers=layers, feature_stage_epochs=1)
    trainer = trainer_factory(max_epochs=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=digits)
    scalars = read_scalars(tmp_path)
    assert len(scalars["distill/fsp"]) == 1 and len(scalars["distill/hard"]) == 1  # stage 1, then stage 2
    assert scalars["distill/fsp"][0][0] < scalars["distill/hard"][0][0]


def test_keep_teacher_in_checkpoint_option(trainer_factory: Any, digits: Any, tmp_path: Path) -> None:
    module = DistillationModule(_student(), _teacher(), keep_teacher_in_checkpoint=True)
    trainer = trainer_factory(limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=digits)
    trainer.save_checkpoint(tmp_path / "with.ckpt")
    state = torch.load(tmp_path / "with.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("teachers.0.") for k in state)


class EpochLosses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.values.append(float(trainer.callback_metrics["distill/total"]))
        assert not pl_module.teacher.training


def test_resume_continues_like_an_uninterrupted_run(trainer_factory: Any, tmp_path: Path) -> None:
    from lightning_compress.demo import DigitsDataModule

    def run(max_epochs: int, ckpt: Path | None = None, save: Path | None = None) -> tuple[DistillationModule, list]:
        pl.seed_everything(0, verbose=False)
        module = DistillationModule(_student(), _teacher(), student_layers=["stage1"], teacher_layers=["stage1"],
                                    hint_weight=0.5)
        record = EpochLosses()
        trainer = trainer_factory(max_epochs=max_epochs, callbacks=[record], limit_train_batches=3,
                                  limit_val_batches=1, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, seed=0), ckpt_path=ckpt)
        if save is not None:
            trainer.save_checkpoint(save)
        return module, record.values

    full, full_losses = run(2)
    run(1, save=tmp_path / "epoch1.ckpt")
    resumed, resumed_losses = run(2, ckpt=tmp_path / "epoch1.ckpt")
    assert resumed_losses == pytest.approx(full_losses[1:], abs=1e-6)
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert not resumed.teacher.training and not any(p.requires_grad for p in resumed.teacher.parameters())
    torch.testing.assert_close(resumed.teacher.fc.weight, _teacher().fc.weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature must be a finite positive number, got 0.0"),
        ({"temperature": float("inf")}, "temperature must be a finite positive number, got inf"),
        ({"soft_weight": -1.0}, "soft_weight must be a finite non-negative number, got -1.0"),
        ({"soft_weight": float("nan")}, "soft_weight must be a finite non-negative number, got nan"),
        ({"hard_weight": float("inf")}, "hard_weight must be a finite non-negative number, got inf"),
        ({"soft_weight": 0.0, "hard_weight": 0.0}, "At least one loss weight must be positive"),
        ({"teacher_weights": [-1.0]}, r"teacher_weights must be finite non-negative numbers, got \[-1.0\]"),
        ({"teacher_weights": [float("nan")]}, r"teacher_weights must be finite .* got \[nan\] \(nan is not\)"),
        ({"teacher_weights": [0.0]}, r"teacher_weights must not all be zero, got \[0.0\]"),
        ({"student_layers": ["stage1"], "teacher_layers": []}, "pair up one to one, got 1 and 0"),
        ({"student_layers": ["stage7"], "teacher_layers": ["stage1"]}, "Unknown student layer 'stage7'"),
        ({"student_layers": ["stage1"], "teacher_layers": ["block1"]}, "Unknown teacher layer 'block1'"),
        ({"hint_weight": 1.0}, "need student_layers and teacher_layers"),
        ({"feature_stage_epochs": -1}, "feature_stage_epochs must be a non-negative integer, got -1"),
        ({"feature_stage_epochs": 1.5, "student_layers": ["stage1"], "teacher_layers": ["stage1"], "hint_weight": 1.0},
         "feature_stage_epochs must be a non-negative integer, got 1.5"),
        ({"feature_stage_epochs": 1, "student_layers": ["stage1"], "teacher_layers": ["stage1"], "hint_weight": 1.0,
          "soft_weight": 0.0, "hard_weight": 0.0}, "the task stage after it trains on soft and hard only"),
        ({"optimizer": "sgd", "momentum": -1.0}, "momentum must be a finite non-negative number, got -1.0"),
        ({"optimizer": "lamb"}, "optimizer must be one of .* got 'lamb'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillationModule(_student(), _teacher(), **kwargs)


@pytest.mark.parametrize("term", ["attention", "pairwise", "fsp"])
def test_spatial_terms_on_vector_layers_fail_at_construction(term: str) -> None:
    """Attention, pairwise and FSP read maps with spatial positions; (batch, features) layers are refused up front."""
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    teacher = copy.deepcopy(student)  # equal widths: the pair itself is fine for every term but the spatial ones
    layers = ["1", "3"]
    with pytest.raises(ValueError, match=rf"{term} needs \(batch, channels, \*spatial\) feature maps, got student "
                                         r"'1' \(2, 16\) and teacher '1' \(2, 16\)"):
        DistillationModule(student, teacher, student_layers=layers, teacher_layers=layers, input_shape=[1, 8, 8],
                           **{f"{term}_weight": 1.0})


def test_teacher_accuracy_is_logged_once_across_a_resume(trainer_factory: Any, digits: Any, tmp_path: Path) -> None:
    def fit(epochs: int, ckpt: Path | None = None) -> pl.Trainer:
        trainer = trainer_factory(max_epochs=epochs, limit_train_batches=2, limit_val_batches=1)
        trainer.fit(DistillationModule(_student(), _teacher()), datamodule=digits, ckpt_path=ckpt)
        return trainer

    first = fit(1)
    assert "val/teacher_acc" in first.callback_metrics
    first.save_checkpoint(tmp_path / "epoch0.ckpt")
    resumed = fit(2, tmp_path / "epoch0.ckpt")
    assert resumed.current_epoch == 2 and "val/teacher_acc" not in resumed.callback_metrics


def test_same_object_as_student_and_teacher() -> None:
    student = _student()
    with pytest.raises(ValueError, match="student is also given as a teacher"):
        DistillationModule(student, student)


def test_class_count_mismatch_fails_before_training(trainer_factory: Any, digits: Any) -> None:
    with pytest.raises(ValueError, match=r"Teacher 0 predicts \(10,\) classes, the student \(5,\)"):
        DistillationModule(ResidualCNN(num_classes=5, width=4), _teacher(), input_shape=[1, 8, 8])
    module = DistillationModule(ResidualCNN(num_classes=5, width=4), _teacher())
    trainer = trainer_factory(limit_train_batches=1)
    with pytest.raises(ValueError, match="same number of classes"):
        trainer.fit(module, datamodule=digits)
    assert trainer.global_step == 0


def test_unmatchable_pair_is_named() -> None:
    with pytest.raises(ValueError, match=r"cannot be matched for hint: student 'fc' \(2, 10\) vs teacher 'stage3'"):
        DistillationModule(_student(), _teacher(), student_layers=["fc"], teacher_layers=["stage3"],
                           hint_weight=1.0, input_shape=[1, 8, 8])
    with pytest.raises(ValueError, match=r"cannot be matched for fsp.*channels"):
        DistillationModule(_student(), _teacher(), student_layers=["stem", "stage1"],
                           teacher_layers=["stem", "stage1"], fsp_weight=1.0, input_shape=[1, 8, 8])


def test_fit_with_plain_dataloaders_and_teacher_eval_in_validate_and_test(trainer_factory: Any, digits: Any) -> None:
    module = DistillationModule(_student(), _teacher(), student_layers=["stage1"], teacher_layers=["stage1"],
                                hint_weight=1.0)
    watch = TeacherWatch()
    trainer = trainer_factory(callbacks=[watch], limit_train_batches=1, limit_val_batches=1, limit_test_batches=1,
                              num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=digits.train_dataloader(), val_dataloaders=digits.val_dataloader())
    assert len(module.regressors) == 1  # built from one batch of the plain loader
    trainer.validate(module, dataloaders=digits.val_dataloader(), verbose=False)
    trainer.test(module, dataloaders=digits.test_dataloader(), verbose=False)
    assert not module.teacher.training and "test/acc" in trainer.callback_metrics


def test_feature_terms_by_hand_and_tiny_batches() -> None:
    from lightning_compress.distillation.terms import feature_terms

    torch.manual_seed(0)
    s = [torch.randn(4, 2, 4, 4), torch.randn(4, 2, 2, 2)]
    t = [torch.randn(4, 3, 4, 4), torch.randn(4, 2, 2, 2)]
    regressors = [losses.HintRegressor(2, 3), losses.HintRegressor(2, 2)]
    terms = feature_terms(s, t, ["hint", "attention", "rkd_angle"], regressors)
    expected_hint = losses.hint_loss(s[0], t[0], regressors[0]) + losses.hint_loss(s[1], t[1])
    torch.testing.assert_close(terms["hint"], expected_hint)
    expected_angle = losses.rkd_angle_loss(s[0], t[0]) + losses.rkd_angle_loss(s[1], t[1])
    torch.testing.assert_close(terms["rkd_angle"], expected_angle)
    torch.testing.assert_close(terms["attention"], losses.attention_loss(s, t))
    t_fsp = [t[0][:, :2], t[1]]
    fsp = feature_terms(s, t_fsp, ["fsp"])["fsp"]
    torch.testing.assert_close(fsp, losses.fsp_loss([(s[0], s[1])], [(t_fsp[0], t_fsp[1])]))
    small = feature_terms([x[:2] for x in s], [x[:2] for x in t], ["rkd_angle", "rkd_distance"])
    assert small["rkd_angle"].item() == 0.0  # no triplet in a batch of 2: the term is skipped, not an error
    assert small["rkd_distance"].item() == pytest.approx(0.0, abs=1e-6)  # one distance, normalised to 1 on both
