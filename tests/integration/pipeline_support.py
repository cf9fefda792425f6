"""Run examples/configs/pipeline.yaml through the real command (``python -m lightning_compress.cli fit``), shortened,
optionally interrupted (SIGINT or SIGKILL) at a given step, resumed with the README's ``--ckpt_path last``, or under
DDP; each rank saves its final state, and every process start records the epoch and step it started at.

The shortened schedule (``STEPS_PER_EPOCH`` training batches per epoch, ``EPOCHS`` epochs) keeps every phase of the
real config, one or two epochs each: ``PHASES`` maps a phase to the epochs it spans.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "configs" / "pipeline.yaml"
HERE = Path(__file__).resolve().parent
EPOCHS, STEPS_PER_EPOCH = 8, 4
# AGP over epochs 0-1 with the compaction at the end of epoch 1; QAT from epoch 4: calibration over 6 steps (epochs
# 4 and 5), fake-quantized training, observers frozen from epoch 6.
PHASES = {"distillation + pruning schedule": (0, 2), "compact student": (2, 4), "calibration": (4, 6),
          "quantization-aware training": (6, 8)}
SCHEDULE_END, QAT_START, CALIBRATION_BATCHES, FREEZE_EPOCH = 2, 4, 6, 6


class KillAt(pl.Callback):
    """Send this process ``KILL_SIGNAL`` (SIGKILL by default) after training step ``KILL_AT`` (environment)."""

    def __init__(self) -> None:
        self.step = int(os.environ["KILL_AT"]) if os.environ.get("KILL_AT") else None
        self.signal = getattr(signal, os.environ.get("KILL_SIGNAL") or "SIGKILL")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


class StartMarker(pl.Callback):
    """Append ``{"epoch", "global_step"}`` at the start of training to ``<directory>/starts.jsonl`` (rank zero)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            with (self.directory / "starts.jsonl").open("a") as file:
                file.write(json.dumps({"epoch": trainer.current_epoch, "global_step": trainer.global_step}) + "\n")


def starts(directory: Path) -> list[dict[str, int]]:
    """The epoch and step at which each process started training, in order."""
    path = directory / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def checkpoint_dir(directory: Path) -> Path:
    """Where the config's ModelCheckpoint writes: the logger's first run directory."""
    return directory / "runs" / "pipeline" / "version_0" / "checkpoints"


class SaveFinal(pl.Callback):
    """At the end of fit each rank saves the student, every compression callback's state and the final metrics."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        from lightning_compress import FilterPruning, QuantizationAwareTraining

        states = {type(c).__name__: c.state_dict() for c in trainer.callbacks  # type: ignore[attr-defined]
                  if isinstance(c, (FilterPruning, QuantizationAwareTraining))}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("export/")}
        student = pl_module.compression_target
        torch.save({"student": {k: v.detach().clone() for k, v in student.state_dict().items()},
                    "callbacks": states, "metrics": metrics,
                    "structure": {n: type(m).__name__ for n, m in student.named_modules()}},
                   self.directory / f"final_rank{trainer.global_rank}.pt")


def write_config(directory: Path, references: Path) -> Path:
    """The real pipeline config, shortened, writing under ``directory``; returns the file."""
    config = yaml.safe_load(CONFIG.read_text())
    config["references"].update(directory=str(references), teacher_epochs=3, alone_epochs=EPOCHS)
    trainer = config["trainer"]
    trainer.update(max_epochs=EPOCHS, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=2,
                   num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False)
    trainer["logger"]["init_args"]["save_dir"] = str(directory / "runs")
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c for c in trainer["callbacks"]}
    callbacks["FilterPruning"]["init_args"]["schedule"]["init_args"]["end"] = SCHEDULE_END
    callbacks["FilterPruning"]["init_args"]["recalibration_batches"] = 2
    callbacks["QuantizationAwareTraining"]["init_args"].update(
        start_epoch=QAT_START, calibration_batches=CALIBRATION_BATCHES, freeze_epoch=FREEZE_EPOCH)
    callbacks["CompressionReport"]["init_args"].update(latency_runs=3, warmup=1)
    # 32 steps leave a student with near-tied logits: the export's agreement check is not what these runs test
    callbacks["Int8Export"]["init_args"] = {"min_agreement": None}
    trainer["callbacks"] += [{"class_path": "pipeline_support.KillAt"},
                             {"class_path": "pipeline_support.StartMarker", "init_args": {"directory": str(directory)}},
                             {"class_path": "pipeline_support.SaveFinal",
                              "init_args": {"directory": str(directory)}}]
    path = directory / "pipeline.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_pipeline(directory: Path, references: Path, *extra: str, kill_at: int | None = None,
                 kill_signal: str = "SIGKILL", resume: bool = False,
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``lightning-compress fit`` on the shortened config in a fresh process (one torch thread); with ``resume``,
    the README's resume command (``--ckpt_path last``)."""
    config = write_config(directory, references)
    command = [sys.executable, "-m", "lightning_compress.cli", "fit", "--config", str(config), *extra]
    if resume:
        command += ["--ckpt_path", "last"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "KILL_AT": "" if kill_at is None else str(kill_at), "KILL_SIGNAL": kill_signal, "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=directory)


def load_final(directory: Path, rank: int = 0) -> dict[str, Any]:
    return torch.load(directory / f"final_rank{rank}.pt", weights_only=False)


if __name__ == "__main__":  # a manual run: python tests/integration/pipeline_support.py DIR
    result = run_pipeline(Path(sys.argv[1]).resolve(), Path(sys.argv[1]).resolve() / "references", *sys.argv[2:])
    print(result.stdout[-4000:], result.stderr[-4000:])
    sys.exit(result.returncode)
