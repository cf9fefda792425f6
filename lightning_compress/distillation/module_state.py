"""Checkpoints of offline distillation: teachers left out (and restored from the given ones), the teacher's
accuracy logged once per run, hint regressors and transformer projections rebuilt from the saved shapes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_compress.distillation import losses
from lightning_compress.distillation.base import DistillationBase
from lightning_compress.distillation.checkpoints import load_network_weights
from lightning_compress.distillation.transformer import TransformerTerms

_TEACHER_PREFIX = "teachers."


class OfflineCheckpoints(DistillationBase):
    """The checkpoint half of :class:`~.module.DistillationModule` (its base; not used alone)."""

    teachers: nn.ModuleList
    regressors: nn.ModuleList
    weights: dict[str, float]
    student_layers: list[str]
    transformer_terms: TransformerTerms | None
    keep_teacher_in_checkpoint: bool
    _teacher_acc_logged: bool

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["teacher_acc_logged"] = self._teacher_acc_logged  # once per run, resumed runs included
        teacher_acc = self.trainer.callback_metrics.get("val/teacher_acc") if self._trainer is not None else None
        if teacher_acc is not None:
            checkpoint["teacher_acc"] = float(teacher_acc)
        if not self.keep_teacher_in_checkpoint:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(_TEACHER_PREFIX)]:
                del state[key]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._teacher_acc_logged = bool(checkpoint.get("teacher_acc_logged", self._teacher_acc_logged))
        self._restored_teacher_acc = checkpoint.get("teacher_acc")

    @override
    def on_fit_start(self) -> None:
        """A resumed run shows the teacher's accuracy (logged in the first epoch only) in ``callback_metrics`` too."""
        restored = getattr(self, "_restored_teacher_acc", None)
        if restored is not None and "val/teacher_acc" not in self.trainer.callback_metrics:
            self.trainer.callback_metrics["val/teacher_acc"] = torch.tensor(restored)
        self._restored_teacher_acc = None

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint's state; missing teacher weights are taken from the current teachers and hint
        regressors are built from the saved shapes when they do not exist yet."""
        state = dict(state_dict)
        for key, value in self.teachers.state_dict(prefix=_TEACHER_PREFIX).items():
            state.setdefault(key, value)
        if len(self.regressors) == 0 and self.weights["hint"] > 0:
            self.regressors.extend(losses.hint_regressors_from_state(state, len(self.student_layers)))
        if self.transformer_terms is not None:
            self.transformer_terms.build_from_state(state, "transformer_terms.")
        return super().load_state_dict(state, strict=strict, assign=assign)

    @staticmethod
    def student_from_checkpoint(checkpoint_path: str | Path, student: nn.Module) -> nn.Module:
        """``student`` (a fresh network of the student's architecture) with the trained weights of a checkpoint of
        this module (a trusted file)."""
        return load_network_weights(student, checkpoint_path, prefix="student.")
