"""Learning without Forgetting on digits: learn digits 5-9 after 0-4 and measure what is forgotten of 0-4.

    python examples/lifelong_digits.py            # 3 seeds, the full table (about 2 minutes on 2 busy cores)
    python examples/lifelong_digits.py --quick    # one seed, a couple of batches (what the tests run)

Per seed (the seed fixes the data split, the data order and the initialisation):

1. task 1: ``ResidualCNN(width=8, num_classes=5)`` trained on digits 0-4 (cross-entropy, Adam lr 3e-3, cosine);
2. its ``fc`` becomes the old head (:func:`split_head`), a fresh ``Linear(32, 5)`` the new head for digits 5-9;
3. task 2, from the same task-1 weights, on digits 5-9 only (no image of 0-4 is seen):
   - fine-tuning (the paper's baseline): backbone and new head trained with cross-entropy, old head untouched
     (``LwFModule(old_weight=0)``);
   - Learning without Forgetting (Li & Hoiem 2016): the same plus the old head distilled toward the task-1
     network's outputs on the 5-9 images (``old_weight=1``, ``T=2`` as in the paper).

Evaluation is multi-head, as in the paper: old-task test accuracy is the old head's on the test images of 0-4,
new-task accuracy the new head's on those of 5-9. Forgetting = old-task accuracy after task 1 minus after task 2.
The table reports the test split (mean +- sample standard deviation over the seeds) and the per-seed difference
LwF minus fine-tuning.

Measured (3 seeds, under a minute): after task 1 the old task is at 100%. Fine-tuning on 5-9 drops it to 56.3%
(forgetting 43.7 points) for 99.3% on the new task; LwF keeps it at 97.8% (forgetting 2.2 points) for 99.1% on the
new task: +47.2, +46.7, +30.6 points on the old task per seed, at a cost of 0.2 points on the new one.
"""

from __future__ import annotations

import statistics
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress.demo import ClassifierModule, ResidualCNN
from lightning_compress.demo.experiments import ExampleSettings, example_parser, over_seeds, write_results
from lightning_compress.distillation.methods.lifelong import LwFModule, TaskSplitDataModule, split_head

OLD_CLASSES, NEW_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
OPTIMIZER: dict[str, Any] = {"optimizer": "adam", "lr": 3e-3, "weight_decay": 1e-4, "lr_scheduler": "cosine"}
METHODS = {"fine-tuning": {"old_weight": 0.0}, "LwF (T=2)": {"old_weight": 1.0, "temperature": 2.0}}


class Settings(ExampleSettings):
    def __init__(self, quick: bool) -> None:
        super().__init__(quick, epochs=15)


def _trainer(settings: Settings) -> pl.Trainer:
    return pl.Trainer(max_epochs=settings.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, accelerator="cpu",
                      limit_train_batches=settings.limit, limit_val_batches=settings.limit,
                      limit_test_batches=settings.limit)


def run_seed(seed: int, settings: Settings) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    old_model = ResidualCNN(width=8, num_classes=len(OLD_CLASSES))
    task1 = TaskSplitDataModule(OLD_CLASSES, seed=seed)
    trainer = _trainer(settings)
    classifier = ClassifierModule(old_model, num_classes=len(OLD_CLASSES), **OPTIMIZER)
    trainer.fit(classifier, task1)
    results = {"after task 1": float(trainer.test(classifier, task1, verbose=False)[0]["test/acc"])}
    for name, options in METHODS.items():
        backbone, old_head = split_head(old_model)
        pl.seed_everything(seed, verbose=False)  # the same new head and data order for every method
        new_head = nn.Linear(old_head.in_features, len(NEW_CLASSES))
        module = LwFModule(backbone, old_head, new_head, **options, **OPTIMIZER)
        task2 = TaskSplitDataModule(NEW_CLASSES, old_classes=OLD_CLASSES, seed=seed)
        trainer = _trainer(settings)
        trainer.fit(module, task2)
        new_task, old_task = trainer.test(module, task2, verbose=False)
        results[f"{name}: old task"] = float(old_task["test/acc_old"])
        results[f"{name}: new task"] = float(new_task["test/acc"])
    return results


def _cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def table(rows: dict[str, list[float]], settings: Settings) -> str:
    split = "quick mode: 2 batches" if settings.limit else "about 180 test images per task"
    before = rows["after task 1"]
    lines = [f"Digits 0-4 (task 1), then 5-9 (task 2); ResidualCNN(width=8), {settings.epochs} epochs per task; test "
             f"accuracy ({split}), mean ± std over {len(settings.seeds)} seed(s). Old task after task 1: "
             f"{_cell(before)}.", "",
             "| method | old task (0-4) after task 2 | forgetting (points) | new task (5-9) |", "|---|---:|---:|---:|"]
    for name in METHODS:
        old, new = rows[f"{name}: old task"], rows[f"{name}: new task"]
        forgetting = [100 * (b - a) for b, a in zip(before, old, strict=True)]
        lines.append(f"| {name} | {_cell(old)} | {statistics.mean(forgetting):.2f} | {_cell(new)} |")
    gain = [100 * (lwf - ft) for lwf, ft in zip(rows["LwF (T=2): old task"], rows["fine-tuning: old task"],
                                                    strict=True)]
    lines += ["", f"LwF minus fine-tuning on the old task, per seed (points): "
              f"{', '.join(f'{g:+.2f}' for g in gain)}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    settings = Settings(parser.parse_args(argv).quick)
    rows = over_seeds(lambda seed: run_seed(seed, settings), settings.seeds)
    result = table(rows, settings)
    write_results("lifelong_digits", result, rows)
    print(result)
    return result


if __name__ == "__main__":
    main()
