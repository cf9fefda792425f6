"""The user's training recipe carries over: optimizer and schedule as callables (LightningCLI's OptimizerCallable /
LRSchedulerCallable) in every distillation module, the ClassifierModule and the reference runs, in Python and YAML."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
import yaml

from lightning_compress import DistillationModule, MutualLearningModule
from lightning_compress.demo import ClassifierModule, DigitsDataModule, ResidualCNN
from lightning_compress.utils.optim import build_optimizers, describe_recipe

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4)
STEP = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)


def test_a_callable_recipe_builds_the_users_optimizer_and_schedule():
    layer = torch.nn.Linear(3, 2)
    config = build_optimizers(layer.parameters(), SGD, lr=123.0, lr_scheduler=STEP)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["lr"] == 0.05  # lr=123 belongs to names
    assert optimizer.defaults["momentum"] == 0.9 and type(scheduler) is torch.optim.lr_scheduler.StepLR
    plateau = build_optimizers(layer.parameters(), SGD,
                               lr=1.0, lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)["lr_scheduler"]
    assert plateau["monitor"] == "val/loss"


def test_named_recipes_still_work_and_bad_names_are_refused():
    built = build_optimizers(torch.nn.Linear(2, 2).parameters(), "sgd", lr=0.1, lr_scheduler=None)
    assert type(built) is torch.optim.SGD and built.defaults["nesterov"]
    with pytest.raises(ValueError, match=r"optimizer must be one of .* or a callable"):
        DistillationModule(ResidualCNN(width=4), ResidualCNN(width=8), optimizer="rmsprop")


def test_distillation_trains_with_the_users_recipe_and_steps_its_schedule(trainer_factory):
    module = DistillationModule(ResidualCNN(width=4), ResidualCNN(width=8), optimizer=SGD, lr_scheduler=STEP)
    trainer = trainer_factory(max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 2)  # stepped after each of 2 epochs
    student = {id(p) for p in module.student.parameters()}
    assert student <= {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert "optimizer" not in module.hparams and module.hparams["temperature"] == 2.0


def test_mutual_learning_and_the_classifier_take_the_same_recipe(trainer_factory):
    for module in (MutualLearningModule([ResidualCNN(width=4), ResidualCNN(width=4)], optimizer=SGD),
                   ClassifierModule(ResidualCNN(width=4), optimizer=SGD, lr_scheduler=STEP)):
        trainer = trainer_factory(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
        trainer.fit(module, DigitsDataModule(batch_size=32))
        assert type(trainer.optimizers[0]) is torch.optim.SGD and trainer.optimizers[0].defaults["lr"] == 0.05


def test_describe_recipe_is_stable_for_a_fingerprint():
    assert describe_recipe(SGD) == describe_recipe(functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9,
                                                                       weight_decay=1e-4))
    assert describe_recipe(SGD) == "torch.optim.sgd.SGD(lr=0.05, momentum=0.9, weight_decay=0.0001)"
    assert describe_recipe("adam") == "adam"


def test_a_yaml_recipe_reaches_the_module_and_the_reference_runs(tmp_path):
    """The LightningCLI block of a user's own module (class_path + init_args) works as written, and the student
    alone is trained with the same recipe."""
    from lightning_compress.cli import build_cli

    config = {
        "seed_everything": 0,
        "references": {"directory": str(tmp_path / "refs"), "teacher_epochs": 0, "alone_epochs": 1},
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "logger": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "lightning_compress.CompressionReport",
                                   "init_args": {"latency_runs": 1, "warmup": 0, "batch_size": 8}}]},
        "model": {"class_path": "lightning_compress.DistillationModule", "init_args": {
            "student": {"class_path": "lightning_compress.demo.ResidualCNN", "init_args": {"width": 4}},
            "teacher": {"class_path": "lightning_compress.demo.ResidualCNN", "init_args": {"width": 8}},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}}}},
        "data": {"class_path": "lightning_compress.demo.DigitsDataModule", "init_args": {"batch_size": 32}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["lr"] == 0.05
    reference = json.loads((tmp_path / "refs" / "student_alone" / "reference.json").read_text())
    assert reference["settings"]["optimizer"].startswith("torch.optim.sgd.SGD(")
    assert "lr=0.05" in reference["settings"]["optimizer"] and "StepLR" in reference["settings"]["lr_scheduler"]
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "compression_report.json").exists()


def test_a_feature_term_that_drowns_the_task_warns_with_the_weight_to_use(trainer_factory):
    """FitNets hints sum over every feature (hundreds) where soft and hard are a few units: warned at step one."""
    module = DistillationModule(ResidualCNN(width=4), ResidualCNN(width=8), hint_weight=1.0,
                                student_layers=["stage2"], teacher_layers=["stage2"])
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"hint term is \d+x the soft and hard terms .* hint_weight=[\d.e-]+ brings"):
        trainer.fit(module, DigitsDataModule(batch_size=32))
    balanced = DistillationModule(ResidualCNN(width=4), ResidualCNN(width=8), hint_weight=1e-3,
                                  student_layers=["stage2"], teacher_layers=["stage2"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_factory(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(
            balanced, DigitsDataModule(batch_size=32))
    assert not [w for w in caught if "soft and hard terms" in str(w.message)]


def test_recipe_arguments_dump_and_parse_back_as_a_resumed_cli_run_reads_them():
    """LightningCLI writes config.yaml and re-reads the hyper-parameters on --ckpt_path: names and class_path blocks
    must both survive a dump (a callable-first Union dumped a name as "Unable to serialize instance")."""
    from jsonargparse import ArgumentParser

    from lightning_compress.utils.optim import LRSchedulerChoice, OptimizerChoice

    parser = ArgumentParser()
    parser.add_argument("--optimizer", type=OptimizerChoice, default="adam")
    parser.add_argument("--lr_scheduler", type=LRSchedulerChoice | None, default="none")
    named = parser.parse_args(["--optimizer", "sgd", "--lr_scheduler", "cosine"])
    assert yaml.safe_load(parser.dump(named)) == {"optimizer": "sgd", "lr_scheduler": "cosine"}
    block = parser.parse_args(["--optimizer", '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}'])
    assert yaml.safe_load(parser.dump(block))["optimizer"]["init_args"]["lr"] == 0.1
