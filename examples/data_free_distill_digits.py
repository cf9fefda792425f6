"""Data-free distillation on digits: a student distilled on DeepInversion images alone, tested on real digits.

    python examples/data_free_distill_digits.py            # 3 seeds, the full table
    python examples/data_free_distill_digits.py --quick    # one seed, a few steps and batches (what the tests run)

Per seed (the seed fixes the data split, the data order, the initialisations and the synthesis), the teacher
``ResidualCNN(width=16)`` is trained on the real training split; then, without touching the real training data
again, ``SyntheticDataModule`` synthesises images from the teacher alone (DeepInversion, Yin et al. 2020: noise
optimised so that the batch statistics at every BatchNorm layer match its running statistics, plus cross-entropy
to balanced sampled labels and total-variation and L2 priors). The student ``slim_copy(teacher, 0.25)`` is
distilled on them with soft targets only (``T^2 KL`` at ``T = 4``: the sampled labels carry nothing the teacher's
outputs do not) and tested on the REAL test split. Rows:

- teacher: trained on the real training split;
- student, real data (cross-entropy): the student trained on the real training split, the usual upper bound;
- student, KD on real data: the same soft-target distillation on the real training images (what a data-free
  method tries to recover);
- student, KD on Gaussian noise: the naive data-free baseline, as many N(0, 1) images as the synthetic set;
- student, KD on class-target-only images: synthesis without the BN term (``bn_weight = 0``), an ablation;
- student, KD on DeepInversion images;
- + 2nd DeepInversion round: as many new images (another synthesis seed), and the first-round student distilled
  further on the union of both sets (2x the images, 2x the synthesis);
- + 2nd Adaptive DeepInversion round: the same, with the new images synthesised with the competition term
  (``competition_weight = 1``) against the first-round student, which favours inputs where it disagrees with the
  teacher (Adaptive DeepInversion, same paper). The two second-round rows differ only in that term.

Synthesis settings (``SYNTHESIS``): 200 Adam steps per batch of 250 (lr 0.1, cosine), ``bn_weight = 5`` with the
first BN layer x10, ``tv_weight = 1e-3``, ``l2_weight = 1e-4``, no jitter, no clamping. Chosen on seed 0: a first
round was (by mistake) scored on the test split: ``bn_weight`` 0.05 gave 85.5%, 0.5 90.8% with 1-pixel jitter and
92.8% without, 5 with jitter 93.3%. Then on the validation split, without jitter: ``bn_weight`` 0.5 / 2 / 5 / 20 gave
93.6 / 93.6 / 95.0 / 94.2%; the first BN layer at x1 instead of x10 92.5%; 500 steps instead of 200 95.3% (2.5x
the time); clamping to the real images' value range 93.9%; ``tv_weight`` 1e-2 94.7%. The validation split is
otherwise used only in the teacher's and the real-data students' own training logs; every row is scored on the
test split (359 images: one image = 0.28 points).

Measured (3 seeds, about 6 minutes on 2 busy cores; per seed in brackets): teacher 99.4%; student on real data
97.0% (cross-entropy), 97.9% (KD); KD on Gaussian noise 58.3 ± 11.4% (71.3 / 53.8 / 49.9); KD on class-target-only
images 77.8 ± 4.5% (75.8 / 83.0 / 74.7); KD on DeepInversion images 92.9 ± 1.5% (94.7 / 91.9 / 92.2); a second
DeepInversion round 94.2 ± 1.4% (95.5 / 92.8 / 94.4); a second Adaptive DeepInversion round 95.5 ± 1.7% (96.7 /
93.6 / 96.4). What works at this scale: DeepInversion recovers most of what real data gives (88% of the gap
between noise and real-data KD) from 1000 synthetic images and about 20 s of synthesis per seed, better than
noise and than the class-target-only ablation on every seed; the BatchNorm-statistics term is what makes it work
(the class target alone gives images the teacher labels as intended but that teach the student little). A second
round helps, and the competition term makes the second round better on every seed (+0.8 to +2.0 points, 3 to 7
test images, over the same round without it): Adaptive DeepInversion ends 2.3 points below KD on real data.
Caveats: 3 seeds, a small test split; the class target is reached on only about 70% of the synthetic images at
this BN weight (seed 0; a larger BN weight trades label fidelity for realistic statistics; the soft targets carry
the teacher's actual opinion either way); the teacher is trained on real data, as the method assumes.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.demo import ClassifierModule, DigitsDataModule, EpochSeededSampler, ResidualCNN
from lightning_compress.demo.experiments import (
    ExampleSettings,
    example_parser,
    quiet_single_thread,
    seeded,
    write_results,
)
from lightning_compress.distillation import DistillationModule, slim_copy
from lightning_compress.distillation.methods.data_free import SyntheticDataModule

OPTIMIZER: dict[str, Any] = {"optimizer": "adam", "lr": 3e-3, "weight_decay": 1e-4, "lr_scheduler": "cosine"}
ADAPTIVE: dict[str, Any] = {"competition_weight": 1.0}
ROUND_TWO = "student, + 2nd DeepInversion round (2 x images)"
ADAPTIVE_ROUND_TWO = "student, + 2nd Adaptive DeepInversion round (2 x images)"
SOFT_ONLY: dict[str, Any] = {"soft_weight": 1.0, "hard_weight": 0.0, "temperature": 4.0}
SYNTHESIS: dict[str, Any] = {"synthesis_lr": 0.1, "bn_weight": 5.0, "first_bn_weight": 10.0, "tv_weight": 1e-3,
                             "l2_weight": 1e-4, "synthesis_batch_size": 250, "jitter": 0}


def teacher_network() -> nn.Module:
    return ResidualCNN(width=16)


def student_network() -> nn.Module:
    return slim_copy(teacher_network(), 0.25)


class Settings(ExampleSettings):
    def __init__(self, quick: bool) -> None:
        super().__init__(quick, num_samples=(64, 1000), steps=(10, 200))


def trainer_for(settings: Settings, epochs: int) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                      limit_train_batches=settings.limit, limit_val_batches=settings.limit,
                      limit_test_batches=settings.limit)


def test_accuracy(trainer: pl.Trainer, module: pl.LightningModule, real: DigitsDataModule) -> float:
    return float(trainer.test(module, datamodule=real, verbose=False)[0]["test/acc"])




class TensorDataModule(pl.LightningDataModule):
    """A training set given as tensors (Gaussian noise, or the union of two synthetic sets)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, seed: int, batch_size: int = 64) -> None:
        super().__init__()
        self.train_set = TensorDataset(inputs, labels)
        self.seed, self.batch_size = seed, batch_size

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_set), self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)


def gaussian_noise(num_samples: int, seed: int) -> TensorDataModule:
    """``num_samples`` standard normal images (the naive data-free baseline) with dummy labels."""
    inputs = torch.randn(num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return TensorDataModule(inputs, torch.zeros(num_samples, dtype=torch.long), seed)


def run_seed(seed: int, settings: Settings) -> tuple[dict[str, float], dict[str, float]]:
    """Test accuracy of every row for one seed, and the synthesis times in seconds."""
    real = DigitsDataModule(seed=seed)
    teacher = seeded(seed, teacher_network)
    trainer = trainer_for(settings, settings.teacher_epochs)
    teacher_module = ClassifierModule(teacher, **OPTIMIZER)
    trainer.fit(teacher_module, real)
    results = {"teacher": test_accuracy(trainer, teacher_module, real)}
    teacher.eval()

    alone = ClassifierModule(seeded(seed, student_network), **OPTIMIZER)
    trainer = trainer_for(settings, settings.epochs)
    trainer.fit(alone, real)
    results["student, real data (cross-entropy)"] = test_accuracy(trainer, alone, real)

    def distill(data: pl.LightningDataModule, student: nn.Module | None = None) -> tuple[float, nn.Module]:
        student = student if student is not None else seeded(seed, student_network)
        module = DistillationModule(student, teacher, **SOFT_ONLY, **OPTIMIZER)
        trainer = trainer_for(settings, settings.epochs)
        trainer.fit(module, data)
        return test_accuracy(trainer, module, real), student

    def synthetic(row: str, synthesis_seed: int, **overrides: Any) -> SyntheticDataModule:
        # no eval_datamodule: the synthetic data module never sees a real image
        data = SyntheticDataModule(teacher, settings.num_samples, [1, 8, 8], 10, seed=synthesis_seed,
                                   synthesis_steps=settings.steps, **{**SYNTHESIS, **overrides})
        start = time.perf_counter()
        data.setup("fit")
        times[row] = time.perf_counter() - start
        return data

    times: dict[str, float] = {}
    results["student, KD on real data"] = distill(real)[0]
    results["student, KD on Gaussian noise"] = distill(gaussian_noise(settings.num_samples, seed))[0]
    row = "student, KD on class-target-only images"
    results[row] = distill(synthetic(row, seed, bn_weight=0.0))[0]
    row = "student, KD on DeepInversion images"
    first = synthetic(row, seed)
    results[row], first_student = distill(first)
    # A second round of as many images, distilled into the first round's student on the union of both sets:
    # plain DeepInversion, or Adaptive DeepInversion (competition against that student).
    for row, weight in ((ROUND_TWO, 0.0), (ADAPTIVE_ROUND_TWO, ADAPTIVE["competition_weight"])):
        second = synthetic(row, seed + 1000, student=first_student if weight else None, competition_weight=weight)
        assert first.train_set is not None and second.train_set is not None
        (inputs, labels), (more_inputs, more_labels) = first.train_set.tensors, second.train_set.tensors
        union = TensorDataModule(torch.cat([inputs, more_inputs]), torch.cat([labels, more_labels]), seed)
        results[row] = distill(union, copy.deepcopy(first_student))[0]
    return results, times


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: dict[str, list[float]], times: dict[str, list[float]], settings: Settings) -> str:
    split = "quick mode: 2 batches of the test split" if settings.limit else "359 images: one image = 0.28 points"
    lines = [f"Test accuracy on REAL digits ({split}), mean ± std over {len(settings.seeds)} seed(s). Teacher "
             f"ResidualCNN(width=16), {settings.teacher_epochs} epochs; student slim_copy(teacher, 0.25), "
             f"{settings.epochs} epochs; synthetic sets of {settings.num_samples} images, {settings.steps} "
             "DeepInversion steps per batch of 250.", "",
             "| student's training data | test accuracy | synthesis time of the row's new images (s) |",
             "|---|---:|---:|"]
    for row, runs in rows.items():
        seconds = f"{statistics.mean(times[row]):.0f}" if row in times else ""
        lines.append(f"| {row} | {statistics.mean(runs):.4f} ± {_std(runs):.4f} | {seconds} |")
    mean = {row: statistics.mean(runs) for row, runs in rows.items()}
    noise, real, inverted = (mean[f"student, KD on {name}"] for name in ("Gaussian noise", "real data",
                                                                          "DeepInversion images"))
    if real > noise:
        lines += ["", f"DeepInversion closes {100 * (inverted - noise) / (real - noise):.0f}% of the gap between KD "
                  f"on noise and KD on real data; it is {100 * (real - inverted):.1f} points below the latter."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = example_parser(__doc__)
    args = parser.parse_args(argv)
    settings = Settings(args.quick)
    rows: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    with quiet_single_thread():
        for seed in settings.seeds:
            results, seconds = run_seed(seed, settings)
            for row, accuracy in results.items():
                rows.setdefault(row, []).append(accuracy)
            for row, value in seconds.items():
                times.setdefault(row, []).append(value)
    result = table(rows, times, settings)
    write_results("data_free_distill_digits", result, rows)
    print(result)
    return result


if __name__ == "__main__":
    main()
