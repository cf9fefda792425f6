"""Shared fixtures: deterministic seeds, a quiet Trainer factory and the digits data."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

# The tests' models are tiny: a thread pool only adds overhead, and on a busy 2-core machine it multiplies the run
# time. One intra-op thread also makes the runs independent of the machine's core count.
torch.set_num_threads(1)


def pytest_report_header(config: Any) -> str:
    """The CPU and quantized engines the int8 tests ran with (results of quantized kernels depend on them)."""
    from lightning_compress.export.engines import host_summary

    summary = host_summary()
    return (f"int8 host: {summary['machine']}, cpu capability {summary['capability']}, VNNI {summary['vnni']}, "
            f"quantized engines {summary['engines']} (default {summary['current_engine']})")


@pytest.fixture(autouse=True)
def _seed_everything() -> Any:
    pl.seed_everything(0, workers=True, verbose=False)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Trainer(deterministic=True) turns torch's deterministic algorithms on for the whole process: restore the state
    # so that one test does not slow the next (torchvision's Swin runs 4x slower in deterministic mode)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def make_trainer(root: Any, **overrides: Any) -> pl.Trainer:
    """A quiet CPU Trainer writing TensorBoard logs under ``root``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    options: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": TensorBoardLogger(str(root), name="run"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(root),
        "deterministic": True,
    }
    options.update(overrides)
    return pl.Trainer(**options)


@pytest.fixture
def trainer_factory(tmp_path):  # type: ignore[no-untyped-def]
    def factory(**overrides: Any) -> pl.Trainer:
        return make_trainer(tmp_path, **overrides)

    return factory


@pytest.fixture(scope="session")
def digits():  # type: ignore[no-untyped-def]
    from lightning_compress.demo import DigitsDataModule

    datamodule = DigitsDataModule(batch_size=64, seed=0)
    datamodule.setup()
    return datamodule


@pytest.fixture
def tiny_input() -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: Any) -> Path:
    """The README's main command, once per session, in a fresh process and a temporary directory:
    ``lightning-compress fit --config examples/configs/pipeline.yaml``; returns its run directory."""
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "pipeline.yaml"
    root = tmp_path_factory.mktemp("pipeline-full")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "lightning_compress.cli", "fit", "--config", str(config),
                             "--trainer.enable_progress_bar=false"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = (root / "runs" / "pipeline").glob("version_*")
    return run_dir
