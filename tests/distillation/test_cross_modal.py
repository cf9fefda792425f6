"""Cross-modal distillation: views, feature-statistics losses and the module's per-model inputs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_compress.demo import ResidualCNN
from lightning_compress.distillation import losses
from lightning_compress.distillation.methods.cross_modal import (
    CrossModalDistillationModule,
    downsample_view,
    feature_statistics_loss,
    make_view,
    mask_view,
    mmd_loss,
    moment_matching_loss,
    paired_hint_loss,
)
from lightning_compress.testing import read_scalars

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")
QUICK = {"limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0}


def _net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ResidualCNN(width=width, num_stages=2)


# ------------------------------------------------------------------------------------------------ views


def test_views_by_hand() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = make_view("downsample:2")(x)
    assert down[0, 0].tolist() == [[2.5, 2.5, 4.5, 4.5], [2.5, 2.5, 4.5, 4.5],
                                   [10.5, 10.5, 12.5, 12.5], [10.5, 10.5, 12.5, 12.5]]
    masked = make_view("mask:0.5")(x)
    assert masked[0, 0, :2].equal(x[0, 0, :2]) and masked[0, 0, 2:].abs().sum() == 0
    assert make_view("identity")(x) is x
    assert make_view("noise:0")(x) is x
    torch.manual_seed(0)
    noisy = make_view("noise:0.5")(torch.zeros(20000))
    assert noisy.std().item() == pytest.approx(0.5, rel=0.03)
    assert downsample_view(x, 1) is x and mask_view(x, 0.0) is x
    double = make_view(lambda t: 2 * t)
    assert double(x).equal(2 * x)


@pytest.mark.parametrize(("spec", "message"), [
    ("blur:2", "Unknown view 'blur:2'; allowed: ['identity', 'downsample"),
    ("downsample", "needs a value"),
    ("downsample:0", "integer >= 1"),
    ("downsample:1.5", "not a valid int"),
    ("mask:1.5", "in [0, 1]"),
    ("noise:-0.1", "non-negative"),
    ("identity:3", "takes no value"),
])
def test_bad_view_names(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        make_view(spec)


# ------------------------------------------------------------------------------------------------ losses


def test_moment_matching_by_hand_and_permutation_invariant() -> None:
    s = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # means [1, 1] vs [1, 0]: mean_d diff^2 = 0.5; covariances [[2, 2], [2, 2]] vs 0: 16 / (4 * 2^2) = 1
    assert moment_matching_loss(s, t).item() == pytest.approx(1.5)
    t2 = torch.randn(5, 3)
    s2 = torch.randn(7, 3)
    shuffled = moment_matching_loss(s2.flip(0), t2[[4, 2, 0, 1, 3]])
    assert moment_matching_loss(s2, t2).item() == pytest.approx(shuffled.item())
    maps = torch.randn(4, 3, 2, 2)
    assert moment_matching_loss(maps, maps).item() == 0.0  # pooled (B, C) features
    with pytest.raises(ValueError, match="equal widths"):
        moment_matching_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        moment_matching_loss(torch.randn(1, 3), torch.randn(4, 3))


def test_mmd_by_hand() -> None:
    s, t = torch.zeros(2, 1), torch.ones(2, 1)
    assert mmd_loss(s, t, bandwidths=[1.0], relative=False).item() == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-5)
    # relative: mean squared distance over the joint 4x4 batch is 8/16 = 0.5, so k(s, t) = exp(-1 / (2 * 0.5))
    assert mmd_loss(s, t, bandwidths=[1.0]).item() == pytest.approx(2 - 2 * math.exp(-1.0), rel=1e-5)
    x = torch.randn(6, 4)
    assert mmd_loss(x, x[torch.randperm(6)]).abs().item() < 1e-6
    assert feature_statistics_loss(s, t, "mmd").item() == pytest.approx(mmd_loss(s, t).item())
    with pytest.raises(ValueError, match="statistic must be one of \\('moments', 'mmd'\\), got 'kl'"):
        feature_statistics_loss(s, t, "kl")
    with pytest.raises(ValueError, match="bandwidths"):
        mmd_loss(s, t, bandwidths=[-1.0])


def test_paired_hint_by_hand() -> None:
    assert paired_hint_loss(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 2, 2)).item() == pytest.approx(1.5)
    projection = losses.HintRegressor(2, 3, rank=2)
    with torch.no_grad():
        projection.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[1.0, 2.0, 0.0]])
    assert paired_hint_loss(s, t, projection).item() == pytest.approx(0.5 * 9)


@pytest.mark.parametrize("loss", [moment_matching_loss, lambda s, t: mmd_loss(s, t, relative=False), paired_hint_loss])
def test_gradients_match_finite_differences(loss: Any) -> None:
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, dtype=torch.double, generator=generator, requires_grad=True)
    t = torch.randn(5, 3, dtype=torch.double, generator=generator)
    assert torch.autograd.gradcheck(lambda a: loss(a, t), (s,))


# ------------------------------------------------------------------------------------------------ module


class Recorder(nn.Module):
    """Wraps a network and keeps the last input it saw in each mode."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen["train" if self.training else "eval"] = x.detach().clone()
        return self.net(x)


def test_student_sees_its_view_in_training_and_validation(trainer_factory: Any) -> None:
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    student, teacher = Recorder(_net(4, 0)), Recorder(_net(8, 1))
    module = CrossModalDistillationModule(student, teacher, student_view="downsample:2", teacher_view="identity")
    trainer = trainer_factory(**QUICK)
    trainer.fit(module, loader, loader)
    assert student.seen["train"].equal(downsample_view(x, 2))
    assert student.seen["eval"].equal(downsample_view(x, 2))  # validation: the student's own modality
    assert teacher.seen["eval"].equal(x)
    student.seen.clear()  # what test and forward feed it, not what validation left behind
    trainer.test(module, loader, verbose=False)
    assert student.seen["eval"].equal(downsample_view(x, 2))
    student.seen.clear()
    prediction = module(x)  # forward: the deployed student on its own view (in whichever mode the module is)
    (seen,) = student.seen.values()
    assert seen.equal(downsample_view(x, 2)) and prediction.shape == (16, 10)


class DictDataset(Dataset):
    def __init__(self, n: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.full = torch.randn(n, 1, 8, 8, generator=generator)
        self.low = downsample_view(self.full, 2)
        self.target = torch.arange(n) % 10

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"full": self.full[i], "low": self.low[i], "target": self.target[i]}


@pytest.mark.parametrize("mode", ["paired", "unpaired"])
def test_dict_batches_log_cross_modal_every_epoch(trainer_factory: Any, tmp_path: Path, mode: str) -> None:
    loader = DataLoader(DictDataset(), batch_size=8)
    options: dict[str, Any] = {"soft_weight": 0.5, "hard_weight": 0.5} if mode == "paired" else {
        "soft_weight": 0.0, "hard_weight": 1.0, "statistic": "mmd"}
    module = CrossModalDistillationModule(
        _net(4, 0), _net(8, 1), mode=mode, student_key="low", teacher_key="full", student_layers=["stage2"],
        teacher_layers=["stage2"], cross_modal_weight=0.5, **options)
    trainer_factory(max_epochs=2, **QUICK).fit(module, loader, loader)
    scalars = read_scalars(tmp_path)
    assert len(scalars["distill/cross_modal"]) == 2 and len(scalars["val/acc"]) == 2
    assert ("distill/soft" in scalars) == (mode == "paired")
    total = sum(module.weights[name] * scalars[f"distill/{name}"][-1][1] for name in ("soft", "hard", "cross_modal")
                if f"distill/{name}" in scalars)
    assert scalars["distill/total"][-1][1] == pytest.approx(total, rel=1e-5)
    assert isinstance(module.projections[0].proj, nn.Linear)  # student 8 channels -> teacher 16


def test_cross_modal_gradient_reaches_student_and_projection_only() -> None:
    student, teacher = _net(4, 0), _net(8, 1)
    module = CrossModalDistillationModule(student, teacher, mode="unpaired", soft_weight=0.0, hard_weight=0.0,
                                          cross_modal_weight=1.0, student_layers=["stage2"],
                                          teacher_layers=["stage2"], student_view="mask:0.5", input_shape=[1, 8, 8])
    module.setup("validate")
    x = torch.randn(6, 1, 8, 8)
    student_in, teacher_in, y = module.split_modalities((x, torch.zeros(6, dtype=torch.long)))
    terms = module.compute_terms(module.student(student_in), module.teacher_forward(teacher_in), y)
    assert set(terms) == {"cross_modal"}
    terms["cross_modal"].backward()
    assert student.stem[0].weight.grad.abs().sum() > 0
    assert module.projections[0].proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    module.remove_taps()


def test_checkpoint_state_loads_into_a_fresh_module() -> None:
    options: dict[str, Any] = {"student_layers": ["stage2"], "teacher_layers": ["stage2"], "cross_modal_weight": 1.0}
    module = CrossModalDistillationModule(_net(4, 0), _net(8, 1), input_shape=[1, 8, 8], **options)
    fresh = CrossModalDistillationModule(_net(4, 2), _net(8, 1), **options)
    assert len(fresh.projections) == 0
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh.projections[0].proj.weight, module.projections[0].proj.weight)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "both"}, "mode must be one of \\('paired', 'unpaired'\\), got 'both'"),
    ({"statistic": "kl"}, "statistic must be one of"),
    ({"cross_modal_weight": -1.0}, "cross_modal_weight must be a finite non-negative number, got -1.0"),
    ({"hard_weight": -0.5}, "hard_weight must be a finite non-negative number"),
    ({"student_view": "blur"}, "Unknown view 'blur'; allowed"),
    ({"student_key": "low"}, "Give both student_key and teacher_key"),
    ({"mode": "unpaired"}, "not available: {'soft': 0.9}"),
    ({"cross_modal_weight": 1.0}, "needs student_layers"),
])
def test_bad_arguments(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CrossModalDistillationModule(_net(4, 0), _net(8, 1), **options)


class CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


@pytest.mark.parametrize(("keys", "message"), [
    ({"student_key": "low", "teacher_key": "rgb"},
     "teacher_key='rgb' is not in the batch; its keys: \\['full', 'low', 'target'\\]"),
    ({}, "give student_key and teacher_key"),
])
def test_batch_layout_errors_before_the_first_step(trainer_factory: Any, keys: dict[str, str], message: str) -> None:
    loader = DataLoader(DictDataset(), batch_size=8)
    module = CrossModalDistillationModule(_net(4, 0), _net(8, 1), input_shape=[1, 8, 8], **keys)
    counter = CountSteps()
    with pytest.raises(ValueError, match=message):
        trainer_factory(callbacks=[counter], **QUICK).fit(module, loader, loader)
    assert counter.steps == 0


def test_key_on_tuple_batches_errors_before_the_first_step(trainer_factory: Any) -> None:
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.arange(8)), batch_size=4)
    module = CrossModalDistillationModule(_net(4, 0), _net(8, 1), student_key="low", teacher_key="full")
    counter = CountSteps()
    with pytest.raises(ValueError, match="need mapping batches"):
        trainer_factory(callbacks=[counter], **QUICK).fit(module, loader, loader)
    assert counter.steps == 0


def test_cross_modal_term_follows_the_feature_stage() -> None:
    options: dict[str, Any] = {"student_layers": ["stage2"], "teacher_layers": ["stage2"], "cross_modal_weight": 1.0}
    module = CrossModalDistillationModule(_net(4, 0), _net(8, 1), **options)
    assert module.active_terms() == ["soft", "hard", "cross_modal"]
    staged = CrossModalDistillationModule(_net(4, 0), _net(8, 1), hint_weight=1.0, feature_stage_epochs=1, **options)
    assert staged.active_terms() == ["hint", "cross_modal"]  # epoch 0: the feature stage


def test_hyperparameters_keep_named_views_and_input_shape_not_callables() -> None:
    module = CrossModalDistillationModule(_net(4, 0), _net(8, 1), student_view=lambda t: t, teacher_view="noise:0.1",
                                          input_shape=[1, 8, 8])
    assert module.hparams["teacher_view"] == "noise:0.1" and "student_view" not in module.hparams
    assert module.hparams["input_shape"] == [1, 8, 8] and module.hparams["mode"] == "paired"
