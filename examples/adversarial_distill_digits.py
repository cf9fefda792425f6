"""Adversarial distillation on digits: a discriminator between teacher and student, and holistic Structured KD.

    python examples/adversarial_distill_digits.py            # 3 seeds, the full table (a few minutes, 2 CPU cores)
    python examples/adversarial_distill_digits.py --quick    # one seed, a couple of batches (what the tests run)

Per seed (the seed fixes the data split, the data order and the initialisation; every student of a seed starts
from the same weights), the teacher ``ResidualCNN(width=16)`` is trained for 20 epochs, then each student
``slim_copy(teacher, 0.25)`` (width 4) for 30 epochs with the same optimizer (Adam, lr 3e-3, weight decay 1e-4,
cosine annealing; the discriminator shares it). Rows:

- student alone: cross-entropy only;
- KD (Hinton et al. 2015): ``0.9 * T^2 KL + 0.1 CE`` at ``T = 4``;
- KD + adversarial on logits (after Xu et al. 2018, KDGAN-style): KD plus ``ADVERSARIAL_WEIGHT`` times the
  non-saturating GAN loss of an MLP discriminator (64, 64) that tells teacher logits from student logits;
- KD + holistic Structured KD (Liu et al. CVPR 2019): KD plus the pair-wise term on stage 2 (4x4 positions) and
  a Wasserstein critic with gradient penalty (lambda 10) on (input, pooled stage-3 features) pairs, the student's
  features through a learned linear adapter (16 -> 64 channels), weighted 0.1.

The table reports the test split: mean +- sample standard deviation over the seeds, the per-seed differences to
"student alone" and to "KD" (same seed: same split, data order and initialisation), and a verdict: a gain or a
loss on every seed, else "mixed: no clear effect". The discriminator's final training accuracy
(``distill/discriminator_acc``; 0.5 = cannot tell) is listed for the adversarial rows. Digits is an easy task: the
student alone is at about 97% and the test split has 359 images (one image = 0.28 points).

The adversarial weight 0.1 was chosen on the validation split of seeds 0 and 1 (against 1.0, which was worse:
logits 97.8 / 96.1% against 98.1 / 97.5%, holistic 97.2 / 96.7% against 97.5 / 97.5%, KD 97.8 / 97.8%).

Measured (3 seeds, under 3 minutes on 2 busy cores): teacher 99.4%, student alone 97.0%, KD 97.5% (+0.5 points,
a gain on every seed), KD + adversarial on logits 97.6% (vs KD per seed: 0, -1, +2 test images), KD + holistic
Structured KD 97.5% (vs KD: +1, -1, 0 images). The adversarial terms do not help at this scale: KD already hands
the student the teacher's outputs, and a discriminator adds a noisier signal about the same thing. The logit
discriminator ends at 69%, 66% and 38% training accuracy (chance 50%; below chance, the student has overshot it:
the usual back-and-forth of a two-player game); the feature critic still ranks the teacher's (input, features)
above the student's on almost every sample (99%), i.e. the student's stage-3 features, even through the linear
adapter, stay easy to tell from the teacher's.
"""

from __future__ import annotations

import statistics
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress.demo import ClassifierModule, DigitsDataModule, ResidualCNN
from lightning_compress.demo.experiments import (
    ExampleSettings,
    example_parser,
    quiet_single_thread,
    seeded,
    write_results,
)
from lightning_compress.distillation import DistillationModule, slim_copy
from lightning_compress.distillation.methods.adversarial import AdversarialDistillationModule
from lightning_compress.measure import count_parameters

OPTIMIZER: dict[str, Any] = {"optimizer": "adam", "lr": 3e-3, "weight_decay": 1e-4, "lr_scheduler": "cosine"}
KD: dict[str, Any] = {"soft_weight": 0.9, "hard_weight": 0.1, "temperature": 4.0}
ADVERSARIAL_WEIGHT = 0.1
LOGITS: dict[str, Any] = {"adversarial_weight": ADVERSARIAL_WEIGHT, "adversarial_loss": "bce"}
HOLISTIC: dict[str, Any] = {"student_layers": ["stage2"], "teacher_layers": ["stage2"], "pairwise_weight": 1.0,
                            "adversarial_weight": 0.1, "adversarial_loss": "wasserstein", "conditional": True,
                            "adversarial_student_layers": ["stage3"], "adversarial_teacher_layers": ["stage3"]}
ROWS = ("student alone", "KD", "KD + adversarial (logits)", "KD + holistic structured (pair-wise + adversarial)")


def teacher_network() -> nn.Module:
    return ResidualCNN(width=16)


def student_network() -> nn.Module:
    return slim_copy(teacher_network(), 0.25)


class Settings(ExampleSettings):
    def __init__(self, quick: bool, epochs: int | None = None, seeds: list[int] | None = None) -> None:
        super().__init__(quick, epochs=(2, 30))
        self.epochs = epochs or self.epochs
        self.seeds = seeds or self.seeds


def fit_and_test(module: pl.LightningModule, settings: Settings, seed: int, epochs: int,
                 split: str = "test") -> dict[str, float]:
    """Train ``module`` on digits; the logged metrics of ``split`` ("test" or "val") and of the last train epoch."""
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                         limit_train_batches=settings.limit, limit_val_batches=settings.limit,
                         limit_test_batches=settings.limit)
    datamodule = DigitsDataModule(seed=seed)
    trainer.fit(module, datamodule)
    trained = {k: float(v) for k, v in trainer.callback_metrics.items()}
    evaluate = trainer.test if split == "test" else trainer.validate
    return {**trained, **{k: float(v) for k, v in evaluate(module, datamodule, verbose=False)[0].items()}}




def run_seed(seed: int, settings: Settings, split: str = "test") -> dict[str, float]:
    """Accuracy of every row for one seed, and the discriminators' last training accuracy."""
    teacher = seeded(seed, teacher_network)
    results = {"teacher": fit_and_test(ClassifierModule(teacher, **OPTIMIZER), settings, seed,
                                       settings.teacher_epochs, split)[f"{split}/acc"]}
    teacher.eval()
    alone = ClassifierModule(seeded(seed, student_network), **OPTIMIZER)
    results[ROWS[0]] = fit_and_test(alone, settings, seed, settings.epochs, split)[f"{split}/acc"]
    kd = DistillationModule(seeded(seed, student_network), teacher, **OPTIMIZER, **KD)
    results[ROWS[1]] = fit_and_test(kd, settings, seed, settings.epochs, split)[f"{split}/acc"]
    for row, options in ((ROWS[2], LOGITS), (ROWS[3], HOLISTIC)):
        module = AdversarialDistillationModule(seeded(seed, student_network), teacher, **OPTIMIZER, **KD, **options)
        metrics = fit_and_test(module, settings, seed, settings.epochs, split)
        results[row] = metrics[f"{split}/acc"]
        results[f"{row}: discriminator acc"] = metrics["distill/discriminator_acc"]
    return results


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _compare(runs: list[float], base: list[float]) -> str:
    differences = [100 * (run - reference) for run, reference in zip(runs, base, strict=True)]
    cell = f"{statistics.mean(differences):+.2f} ± {_std(differences):.2f}"
    if len(runs) < 2:
        return cell
    word = ("gain on every seed" if all(d > 0 for d in differences) else
            "loss on every seed" if all(d < 0 for d in differences) else "mixed")
    return f"{cell} ({word})"


def table(rows: dict[str, list[float]], settings: Settings, split: str = "test") -> str:
    size = "359 images: one image = 0.28 points" if split == "test" else "validation split"
    size = f"quick mode: 2 batches of the {split} split" if settings.limit else size
    lines = [f"{split.capitalize()} accuracy on digits ({size}), mean ± std over {len(settings.seeds)} seed(s); "
             f"students trained {settings.epochs} epochs, teacher {settings.teacher_epochs}. Teacher "
             f"ResidualCNN(width=16) {count_parameters(teacher_network())} parameters, student "
             f"slim_copy(teacher, 0.25) {count_parameters(student_network())}. Differences in points: mean ± std "
             "of the per-seed differences.", "",
             f"| method | {split} accuracy | vs alone | vs KD | discriminator acc (train, last epoch) |",
             "|---|---:|---:|---:|---:|"]
    for row in ("teacher", *ROWS):
        runs = rows[row]
        cells = [row, f"{statistics.mean(runs):.4f} ± {_std(runs):.4f}", "", "", ""]
        if row not in ("teacher", ROWS[0]):
            cells[2] = _compare(runs, rows[ROWS[0]])
        if row in ROWS[2:]:
            cells[3] = _compare(runs, rows[ROWS[1]])
            cells[4] = f"{statistics.mean(rows[f'{row}: discriminator acc']):.2f}"
        lines.append("| " + " | ".join(cells) + " |")
    if len(settings.seeds) < 2:
        lines += ["", "One seed: no verdict (run without --quick for 3 seeds)."]
        return "\n".join(lines)
    helps = [row for row in ROWS[2:] if all(
        a > b for a, b in zip(rows[row], rows[ROWS[1]], strict=True))]
    lines += ["", "Over KD, the adversarial term " + (
        f"helps on every seed for: {', '.join(helps)}." if helps else
        "does not help at this scale (no row beats KD on every seed): on digits the student alone is within "
        f"{100 * (statistics.mean(rows['teacher']) - statistics.mean(rows[ROWS[0]])):.1f} points of the teacher "
        "and KD already transfers the teacher's outputs; a discriminator adds a noisier signal about the same "
        "outputs.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default 30; quick: 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2; quick: 0")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="split to report")
    args = parser.parse_args(argv)
    settings = Settings(args.quick, args.epochs, args.seeds)
    rows: dict[str, list[float]] = {}
    with quiet_single_thread():
        for seed in settings.seeds:
            for row, value in run_seed(seed, settings, args.split).items():
                rows.setdefault(row, []).append(value)
    result = table(rows, settings, args.split)
    write_results("adversarial_distill_digits", result, rows)
    print(result)
    return result


if __name__ == "__main__":
    main()
