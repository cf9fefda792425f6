"""Teacher-guided student search on digits: the accuracy / multiply-adds Pareto front of distilled students.

    python examples/search_distill_digits.py            # 3 seeds, the full table (a couple of minutes)
    python examples/search_distill_digits.py --quick    # one seed, a couple of batches (what the tests run)

A grid search (not a learned controller; see :mod:`lightning_compress.distillation.methods.search`): per seed, the
teacher ``ResidualCNN(width=32)`` is trained for 15 epochs; then every student ``ResidualCNN(width, depth)`` with width
in {4, 8, 16} and depth in {1, 2} is trained briefly (5 epochs) with distillation from it (KD, ``0.9 * T^2 KL +
0.1 CE``, ``T = 4``, Adam lr 3e-3), scored on the validation split (the test split is not used by the choice) and
its multiply-adds per sample counted with ``count_macs``. The table lists every candidate with its mean +- std
validation accuracy over the seeds; the Pareto front (marked) is computed on the mean accuracies with
``pareto_front``, as well as per seed (how often each candidate is on the front).

Measured (3 seeds, about 4 minutes on 2 busy cores; teacher 98.6% validation, 3.0M multiply-adds): the front is
width 4 depth 1 (49.6k multiply-adds, 86.5%), 4/2 (105k, 91.2%), 8/1 (193k, 96.8%), 8/2 (415k, 96.9%), 16/1
(764k, 98.1%); 16/2 (1.65M, 98.1%) is dominated. Width buys more than depth here: 8/1 beats 4/2 by 5.7 points for
1.8x the work, while a second block per stage adds at most 4.6 points (at width 4) and nothing from width 8 on.
After 5 epochs the deeper students may simply be less converged: a brief training ranks roughly.
"""

from __future__ import annotations

import statistics
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_compress.demo import ClassifierModule, DigitsDataModule, ResidualCNN
from lightning_compress.demo.experiments import ExampleSettings, example_parser, quiet_single_thread, write_results
from lightning_compress.distillation.methods.search import grid, pareto_front, search_students
from lightning_compress.measure import count_macs

OPTIMIZER: dict[str, Any] = {"optimizer": "adam", "lr": 3e-3, "weight_decay": 1e-4, "lr_scheduler": "cosine"}
KD: dict[str, Any] = {"soft_weight": 0.9, "hard_weight": 0.1, "temperature": 4.0}
SPACE = {"width": [4, 8, 16], "depth": [1, 2]}
TEACHER = {"width": 32}


class Settings(ExampleSettings):
    def __init__(self, quick: bool) -> None:
        super().__init__(quick, teacher_epochs=15, epochs=5)


def _quiet(settings: Settings, epochs: int) -> dict[str, Any]:
    return {"max_epochs": epochs, "deterministic": True, "limit_train_batches": settings.limit,
            "limit_val_batches": settings.limit, "limit_test_batches": settings.limit}


def search_seed(seed: int, settings: Settings) -> list[dict[str, Any]]:
    pl.seed_everything(seed, verbose=False)
    teacher = ResidualCNN(**TEACHER)
    data = DigitsDataModule(seed=seed)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                         **_quiet(settings, settings.teacher_epochs))
    module = ClassifierModule(teacher, **OPTIMIZER)
    trainer.fit(module, data)
    teacher_acc = float(trainer.validate(module, data, verbose=False)[0]["val/acc"])
    result = search_students(teacher.eval(), ResidualCNN, SPACE, data, distill_kwargs={**KD, **OPTIMIZER},
                             trainer_kwargs=_quiet(settings, settings.epochs), split="val", seed=seed)
    rows = [{"config": c.config, "accuracy": c.accuracy, "macs": c.macs, "parameters": c.parameters,
             "on_front": c.on_front} for c in result.candidates]
    return [{"config": TEACHER, "teacher_accuracy": teacher_acc}, *rows]


def table(runs: list[list[dict[str, Any]]], settings: Settings) -> str:
    teacher_acc = [run[0]["teacher_accuracy"] for run in runs]
    candidates = [[run[i] for run in runs] for i in range(1, len(runs[0]))]
    means = [statistics.mean(r["accuracy"] for r in rows) for rows in candidates]
    front = set(pareto_front([(mean, rows[0]["macs"]) for mean, rows in zip(means, candidates, strict=True)]))
    teacher_macs = count_macs(ResidualCNN(**TEACHER), torch.zeros(1, 1, 8, 8))[0]
    split = "quick mode: 2 batches" if settings.limit else "360 images"
    lines = [f"Grid search over ResidualCNN width x depth on digits, each student distilled {settings.epochs} "
             f"epoch(s) from ResidualCNN(width=32) (validation accuracy {statistics.mean(teacher_acc):.4f}, "
             f"{teacher_macs:,} multiply-adds); validation accuracy ({split}), mean ± std over "
             f"{len(settings.seeds)} seed(s). Pareto front on the mean accuracy: *.", "",
             "| width | depth | multiply-adds | parameters | val accuracy | front | on the front (seeds) |",
             "|---:|---:|---:|---:|---:|:---:|---:|"]
    order = sorted(range(len(candidates)), key=lambda i: candidates[i][0]["macs"])
    for i in order:
        rows = candidates[i]
        config = rows[0]["config"]
        spread = statistics.stdev(r["accuracy"] for r in rows) if len(rows) > 1 else 0.0
        lines.append(f"| {config['width']} | {config['depth']} | {rows[0]['macs']:,} | {rows[0]['parameters']:,} | "
                     f"{means[i]:.4f} ± {spread:.4f} | {'*' if i in front else ''} | "
                     f"{sum(r['on_front'] for r in rows)}/{len(rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    settings = Settings(parser.parse_args(argv).quick)
    assert len(grid(SPACE)) == 6
    with quiet_single_thread():
        runs = [search_seed(seed, settings) for seed in settings.seeds]
    result = table(runs, settings)
    write_results("search_distill_digits", result, runs)
    print(result)
    return result


if __name__ == "__main__":
    main()
