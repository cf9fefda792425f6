"""Data-free distillation: inputs synthesised from a trained teacher (DeepInversion), and a data module over them.

DeepInversion (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020)
optimises a batch of noise images ``x`` so that the teacher, in eval mode, classifies them as sampled labels ``y``
while the batch statistics at the input of every BatchNorm layer ``l`` match that layer's running statistics:

``loss = CE(teacher(x), y) + bn_weight * sum_l c_l (||mu_l(x) - mu_l^BN||_2 + ||var_l(x) - var_l^BN||_2)
+ tv_weight * R_TV(x) + l2_weight * mean_i ||x_i||_2 [+ competition_weight * (1 - JS(teacher(x), student(x)))]``

with ``c_1 = first_bn_weight`` and ``c_l = 1`` for the others (the official code weights the first BN layer more),
``R_TV`` the mean squared difference of neighbouring pixels, and the optional last term the Adaptive DeepInversion
competition (the same paper): it rewards inputs on which a given student disagrees with the teacher. The official
code also shifts the batch by random jitter before every step and clips the inputs to the valid image range
(``jitter``, ``input_range`` here); it uses Adam with betas (0.5, 0.9) and a cosine learning rate, as here.

- :func:`bn_statistics_loss`, :func:`total_variation`, :func:`competition_loss`: the terms (pure torch).
- :class:`BNStatisticsHooks`: forward hooks that compute the BN term of every BatchNorm layer during a forward.
- :func:`synthesize`: the whole synthesis, returning ``(inputs, labels)``; teacher left exactly as it was.
- :class:`SyntheticDataModule`: a ``LightningDataModule`` whose training set is synthesised once in ``setup``
  (a fixed set, optionally cached to a file), with validation and test loaders taken from an optional real data
  module for evaluation only.

A fixed set synthesised once (not a callback that regenerates every epoch) was chosen because it is what the
paper distils on, it is reproducible and cacheable, the synthesis dominates the cost (thousands of teacher
forward/backward passes per batch), and the training loop then stays an ordinary Lightning fit.

The synthesis is in :mod:`~lightning_compress.distillation.methods.deep_inversion` (no Lightning); this module adds
:class:`SyntheticDataModule`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.demo.data import EpochSeededSampler
from lightning_compress.distillation.checkpoints import load_network_weights
from lightning_compress.distillation.losses.data_free import BNStatisticsHooks, bn_statistics_loss, competition_loss
from lightning_compress.distillation.methods.deep_inversion import (
    TERMS,
    _check_synthesis_arguments,
    balanced_labels,
    batch_indices,
    synthesize,
    teacher_fingerprint,
)

# ---------------------------------------------------------------------------------------------------- data module


class SyntheticDataModule(pl.LightningDataModule):
    """Training data synthesised from a trained teacher by :func:`synthesize` (DeepInversion), no real data needed.

    The set is synthesised once, in ``setup`` (or, with ``cache_path``, in ``prepare_data`` on one process and
    written to that file, which later runs and the other processes load instead of synthesising again; a cache made
    with other settings or another teacher is synthesised anew and overwritten; without a cache, every process
    synthesises the same set, the synthesis being deterministic under ``seed``). Training batches are
    ``(inputs, labels)`` with the labels the inputs were optimised for: distil with soft targets only
    (``DistillationModule(..., soft_weight=1.0, hard_weight=0.0)``), since the labels only say what the synthesis
    aimed at (the module's ``train/acc`` is then the student's agreement with those labels). Validation and test
    loaders are those of ``eval_datamodule`` (real data, used for evaluation only), or none.

    The synthesis terms of the last step of each batch are logged once to the trainer's loggers as
    ``distill/synthesis/<term>`` (step = batch index) and kept in :attr:`synthesis_terms`.

    Args:
        teacher: the trained teacher (any network with BatchNorm layers).
        num_samples: size of the synthetic set.
        sample_shape: shape of one synthetic input without the batch dimension (default ``[1, 8, 8]``).
        num_classes: number of classes.
        teacher_checkpoint: a checkpoint (Lightning or plain state dict) whose weights are loaded into ``teacher``
            first (:func:`~.checkpoints.load_network_weights`); how a YAML config gives a trained teacher.
        batch_size: batch size of the training loader.
        seed: seed of the synthesis and of the training data order.
        synthesis_steps: synthesis steps per synthesis batch.
        synthesis_lr: synthesis learning rate.
        bn_weight: weight of the BatchNorm-statistics term.
        first_bn_weight: multiplier of the first BatchNorm layer's term.
        tv_weight: weight of the total-variation prior.
        l2_weight: weight of the L2 prior.
        synthesis_batch_size: samples optimised together.
        jitter: random shift in pixels per synthesis step.
        input_range: clamp range of the synthetic inputs, or ``None``.
        cache_path: file to keep the synthetic set in, or ``None``.
        eval_datamodule: a real data module for the validation and test loaders, or ``None``.
        num_workers: DataLoader workers of the training loader.
        student: a student for the Adaptive DeepInversion competition term (e.g. one distilled on a first
            synthetic set, for a second round), or ``None``.
        competition_weight: weight of that term; needs ``student`` when positive.

    Raises:
        ValueError: for the arguments :func:`synthesize` rejects (checked here, before any synthesis) and a
            non-positive batch size.

    The synthesis arguments carry a ``synthesis_`` prefix where the bare name (``lr``, ``steps``,
    ``input_shape``) would clash with the LightningModule's hyperparameters: Lightning merges both sets into the
    logger's hparams and refuses equal keys with different values.

    >>> teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    >>> data = SyntheticDataModule(teacher, num_samples=8, sample_shape=[1, 4, 4], num_classes=3,
    ...                            synthesis_steps=2, batch_size=4)
    >>> data.setup("fit")
    >>> inputs, labels = next(iter(data.train_dataloader()))
    >>> inputs.shape, labels.shape
    (torch.Size([4, 1, 4, 4]), torch.Size([4]))
    """

    def __init__(
        self,
        teacher: nn.Module,
        num_samples: int = 1000,
        sample_shape: list[int] | None = None,
        num_classes: int = 10,
        teacher_checkpoint: str | None = None,
        batch_size: int = 64,
        seed: int = 0,
        synthesis_steps: int = 2000,
        synthesis_lr: float = 0.1,
        bn_weight: float = 0.01,
        first_bn_weight: float = 10.0,
        tv_weight: float = 1e-4,
        l2_weight: float = 1e-5,
        synthesis_batch_size: int = 256,
        jitter: int = 0,
        input_range: tuple[float, float] | None = None,
        cache_path: str | None = None,
        eval_datamodule: pl.LightningDataModule | None = None,
        num_workers: int = 0,
        student: nn.Module | None = None,
        competition_weight: float = 0.0,
    ) -> None:
        super().__init__()
        input_shape = list(sample_shape) if sample_shape is not None else [1, 8, 8]
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.options: dict[str, Any] = {
            "steps": synthesis_steps, "lr": synthesis_lr, "bn_weight": bn_weight, "first_bn_weight": first_bn_weight,
            "tv_weight": tv_weight, "l2_weight": l2_weight, "seed": seed, "batch_size": synthesis_batch_size,
            "jitter": jitter, "input_range": None if input_range is None else tuple(float(v) for v in input_range),
            "competition_weight": competition_weight,
        }
        if competition_weight > 0 and student is None:
            raise ValueError(f"competition_weight={competition_weight!r} needs a student (Adaptive DeepInversion).")
        weights = {name: self.options[name] for name in ("bn_weight", "first_bn_weight", "tv_weight", "l2_weight",
                                                         "competition_weight")}
        _check_synthesis_arguments(num_samples, input_shape, num_classes, synthesis_steps, synthesis_lr,
                                   synthesis_batch_size, weights, jitter, self.options["input_range"])
        self.save_hyperparameters(ignore=["teacher", "eval_datamodule", "student"])
        if teacher_checkpoint is not None:
            load_network_weights(teacher, teacher_checkpoint)
        self.teacher = teacher
        self.student = student
        self.num_samples = num_samples
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.seed = seed
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.eval_datamodule = eval_datamodule
        self.num_workers = num_workers
        self.synthesis_terms: dict[int, dict[str, float]] = {}
        self.train_set: TensorDataset | None = None

    # ------------------------------------------------------------------ synthesis and cache

    def settings(self) -> dict[str, Any]:
        """Everything the synthetic set depends on, teacher fingerprint included (the cache's key)."""
        student = None if self.student is None else teacher_fingerprint(self.student)
        return {"num_samples": self.num_samples, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, **self.options, "teacher": teacher_fingerprint(self.teacher),
                "student": student}

    def synthesize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Run :func:`synthesize` with this module's settings (override point, e.g. for another method)."""
        last: dict[int, dict[str, float]] = {}

        def record(batch_index: int, step: int, terms: dict[str, float]) -> None:
            last[batch_index] = terms

        inputs, labels = synthesize(self.teacher, self.num_samples, self.input_shape, self.num_classes,
                                    **self.options, student=self.student, on_step=record)
        self.synthesis_terms = last
        return inputs.cpu(), labels.cpu()

    def _load_cache(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cache_path is None or not self.cache_path.exists():
            return None
        cached = torch.load(self.cache_path, map_location="cpu", weights_only=True)
        if not isinstance(cached, dict) or cached.get("settings") != self.settings():
            return None
        self.synthesis_terms = {int(index): terms for index, terms in cached.get("terms", {}).items()}
        return cached["inputs"], cached["labels"]

    def _synthesize_and_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = self.synthesize()
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"inputs": inputs, "labels": labels, "settings": self.settings(),
                        "terms": self.synthesis_terms}, self.cache_path)
        return inputs, labels

    # ------------------------------------------------------------------ LightningDataModule

    def prepare_data(self) -> None:
        if self.cache_path is not None and self._load_cache() is None:
            self._synthesize_and_cache()
        if self.eval_datamodule is not None:
            self.eval_datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.eval_datamodule is not None:
            self.eval_datamodule.setup(stage)  # type: ignore[arg-type]  # None: every stage, as Lightning allows
        if self.train_set is not None or stage not in (None, "fit"):
            return
        cached = self._load_cache()
        inputs, labels = cached if cached is not None else self._synthesize_and_cache()
        self.train_set = TensorDataset(inputs, labels)
        self._log_synthesis()

    def _log_synthesis(self) -> None:
        trainer = self.trainer
        if trainer is None or not self.synthesis_terms:
            return
        for logger in trainer.loggers:
            for index, terms in sorted(self.synthesis_terms.items()):
                logger.log_metrics({f"distill/synthesis/{name}": value for name, value in terms.items()}, step=index)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("Call setup('fit') before train_dataloader().")
        sampler = EpochSeededSampler(len(self.train_set), self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> Any:
        return [] if self.eval_datamodule is None else self.eval_datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return [] if self.eval_datamodule is None else self.eval_datamodule.test_dataloader()


__all__ = [
    "TERMS",
    "BNStatisticsHooks",
    "SyntheticDataModule",
    "balanced_labels",
    "batch_indices",
    "bn_statistics_loss",
    "competition_loss",
    "synthesize",
    "teacher_fingerprint",
]
