"""Reference runs before a compression run: trained once, reused while nothing they depend on changes, the teacher's
weights loaded, the reports wired into CompressionReport, the random state left as it was."""

import json
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import CompressionReport, DistillationModule
from lightning_compress.demo import ClassifierModule, DigitsDataModule, ResidualCNN
from lightning_compress.references import References, prepare_references


def _setup(tmp_path, trainer_factory, student_width=4, teacher=True):
    torch.manual_seed(0)  # the same initial weights every time, as the CLI's seed_everything gives
    report = CompressionReport(latency_runs=1, warmup=0)
    trainer = trainer_factory(callbacks=[report], max_epochs=1)
    if teacher:
        teacher_network = ResidualCNN(width=8)  # first: its initial weights do not depend on the student's size
        module = DistillationModule(ResidualCNN(width=student_width), teacher_network, lr=3e-3)
    else:
        module = ClassifierModule(ResidualCNN(width=student_width))
    settings = References(directory=str(tmp_path / "refs"), teacher_epochs=1, alone_epochs=3)
    return settings, trainer, module, report


def test_teacher_and_student_alone_are_trained_loaded_and_given_to_the_report(tmp_path, trainer_factory):
    settings, trainer, module, report = _setup(tmp_path, trainer_factory)
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    found = prepare_references(settings, trainer, module, DigitsDataModule(batch_size=64))
    assert set(found) == {"teacher", "student_alone"}
    trained = torch.load(found["teacher"] / "weights.pt", weights_only=True)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert not torch.equal(trained["fc.weight"], teacher_before["fc.weight"])  # trained, not the initial weights
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    for key, value in module.student.state_dict().items():  # the student itself is not trained by its reference
        assert torch.equal(value, student_before[key]), key
    reference = json.loads((found["student_alone"] / "compression_report.json").read_text())
    assert report.references["student_alone"]["parameters"] == reference["parameters"]
    assert reference["accuracy"] > 0.5  # three epochs on the digits already train it


def test_existing_references_are_reused_and_a_changed_network_retrains(tmp_path, trainer_factory):
    settings, trainer, module, _ = _setup(tmp_path, trainer_factory)
    found = prepare_references(settings, trainer, module, DigitsDataModule(batch_size=64))
    stamps = {name: (d / "weights.pt").stat().st_mtime_ns for name, d in found.items()}
    settings2, trainer2, module2, _ = _setup(tmp_path, trainer_factory)
    prepare_references(settings2, trainer2, module2, DigitsDataModule(batch_size=64))
    assert {name: (d / "weights.pt").stat().st_mtime_ns for name, d in found.items()} == stamps
    settings3, trainer3, module3, _ = _setup(tmp_path, trainer_factory, student_width=2)
    prepare_references(settings3, trainer3, module3, DigitsDataModule(batch_size=64))
    assert (found["teacher"] / "weights.pt").stat().st_mtime_ns == stamps["teacher"]
    assert (found["student_alone"] / "weights.pt").stat().st_mtime_ns != stamps["student_alone"]
    assert json.loads((found["student_alone"] / "reference.json").read_text())["shapes"]["stem.conv.weight"][0] == 2


def test_random_state_is_the_same_whether_references_were_trained_or_reused(tmp_path, trainer_factory):
    draws = []
    for _ in range(2):
        settings, trainer, module, _ = _setup(tmp_path, trainer_factory)
        torch.manual_seed(123)
        prepare_references(settings, trainer, module, DigitsDataModule(batch_size=64))
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])


def test_without_a_teacher_the_reference_is_the_uncompressed_network(tmp_path, trainer_factory):
    settings, trainer, module, report = _setup(tmp_path, trainer_factory, teacher=False)
    assert set(prepare_references(settings, trainer, module, DigitsDataModule(batch_size=64))) == {"uncompressed"}
    assert set(report.references) == {"uncompressed"}


@pytest.mark.parametrize("field, value", [("teacher_epochs", -1), ("alone_epochs", 1.5), ("seed", True)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"references.{field} must be a non-negative integer, got {value!r}"):
        References(**{field: value})


def test_several_teachers_are_refused_before_training(tmp_path, trainer_factory):
    module = DistillationModule(ResidualCNN(width=4), [ResidualCNN(width=8), ResidualCNN(width=8)])
    trainer = trainer_factory(max_epochs=1)
    with pytest.raises(ValueError, match="references train one teacher; this module has 2"):
        prepare_references(References(directory=str(tmp_path)), trainer, module, DigitsDataModule())
    assert not list(tmp_path.iterdir())


def test_global_state_is_restored_after_training_references(tmp_path, trainer_factory, monkeypatch):
    settings, trainer, module, _ = _setup(tmp_path, trainer_factory)
    torch.use_deterministic_algorithms(False)  # the test's own Trainer(deterministic=True) set these
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    prepare_references(settings, trainer, module, DigitsDataModule(batch_size=64))
    assert not torch.are_deterministic_algorithms_enabled()
    assert os.environ["PL_GLOBAL_SEED"] == "5" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_a_changed_data_module_retrains_and_other_ranks_wait_for_rank_zero(tmp_path, trainer_factory, monkeypatch):
    settings, trainer, module, _ = _setup(tmp_path, trainer_factory)
    found = prepare_references(settings, trainer, module, DigitsDataModule(batch_size=64))
    stamp = (found["student_alone"] / "weights.pt").stat().st_mtime_ns
    settings, trainer, module, _ = _setup(tmp_path, trainer_factory)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("lightning_compress.references._wait_for", lambda record, fingerprint: waited.append(record))
    waited = []
    prepare_references(settings, trainer, module, DigitsDataModule(batch_size=32))
    assert [p.parent.name for p in waited] == ["teacher", "student_alone"]
    assert (found["student_alone"] / "weights.pt").stat().st_mtime_ns == stamp  # rank 1 trained nothing


def test_max_epochs_unset_needs_explicit_alone_epochs(tmp_path, trainer_factory):
    module = ClassifierModule(ResidualCNN(width=4))
    trainer = trainer_factory(max_epochs=-1, max_steps=2)
    with pytest.raises(ValueError, match=r"give references\.alone_epochs explicitly"):
        prepare_references(References(directory=str(tmp_path)), trainer, module, DigitsDataModule())


class _ThreeClasses(pl.LightningDataModule):
    """Three classes, no ``num_classes`` attribute, data made in ``setup`` (as a user's data module often is)."""

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(48, 6, generator=generator)
        self.data = TensorDataset(inputs, (inputs[:, 0] > 0).long() + (inputs[:, 1] > 1).long())

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=16)


class _UserModule(pl.LightningModule):
    def __init__(self, outputs=3, inputs=6):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 8), nn.ReLU(), nn.Linear(8, outputs))

    @property
    def compression_target(self):
        return self.net

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_class_count_comes_from_the_network_output(tmp_path, trainer_factory):
    trainer = trainer_factory(callbacks=[CompressionReport(latency_runs=1, warmup=0)], max_epochs=1)
    found = prepare_references(References(directory=str(tmp_path / "refs")), trainer, _UserModule(), _ThreeClasses())
    reference = json.loads((found["uncompressed"] / "compression_report.json").read_text())
    assert reference["parameters"] == 6 * 8 + 8 + 8 * 3 + 3 and reference["accuracy"] is not None


@pytest.mark.parametrize(
    ("module", "datamodule", "message"),
    [
        (lambda: _UserModule(inputs=64), lambda: DigitsDataModule(),
         "num_classes is 10 but Sequential outputs 3 classes"),
        (lambda: _UserModule(outputs=1), lambda: _ThreeClasses(), r"at least 2 classes.*is \(16, 1\)"),
        (lambda: DistillationModule(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), ResidualCNN(width=4)),
         lambda: DigitsDataModule(), "num_classes is 10 but Sequential outputs 3 classes"),
    ],
    ids=["declared_differs", "one_output", "student_differs_after_teacher"],
)
def test_a_network_that_cannot_be_trained_is_refused_before_anything_is_written(tmp_path, trainer_factory, module,
                                                                                 datamodule, message):
    trainer = trainer_factory(max_epochs=1)
    with pytest.raises(ValueError, match=message):
        prepare_references(References(directory=str(tmp_path / "refs"), teacher_epochs=1), trainer, module(),
                           datamodule())
    assert not (tmp_path / "refs").exists()


def _reference_latency(root, trainer_factory, **report):
    torch.manual_seed(0)  # the same initial weights every time
    trainer = trainer_factory(callbacks=[CompressionReport(**report)], max_epochs=1)
    directory = prepare_references(References(directory=str(root)), trainer, _UserModule(), _ThreeClasses())[
        "uncompressed"]
    latency = json.loads((directory / "compression_report.json").read_text())["latency"]
    stamp = (directory / "weights.pt").stat().st_mtime_ns
    return {key: latency[key] for key in ("batch_size", "runs", "warmup")}, stamp


def test_references_are_measured_with_the_runs_report_settings(tmp_path, trainer_factory):
    latency, stamp = _reference_latency(tmp_path, trainer_factory, batch_size=8, latency_runs=2, warmup=1)
    assert latency == {"batch_size": 8, "runs": 2, "warmup": 1}  # not CompressionReport's defaults 64, 20, 5
    assert _reference_latency(tmp_path, trainer_factory, batch_size=8, latency_runs=2, warmup=1)[1] == stamp
    latency, restamp = _reference_latency(tmp_path, trainer_factory, batch_size=4, latency_runs=2, warmup=1)
    assert latency["batch_size"] == 4 and restamp != stamp  # other settings: measured again
