"""Every config in examples/configs and every script in examples/ runs in a quick mode."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from lightning_compress.cli import build_cli, main
from lightning_compress.testing import read_scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
         "--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_in_quick_mode(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    references = ["--references.teacher_epochs=1"] if "references:" in config.read_text() else []
    main(["fit", "--config", str(config), *QUICK, *references])
    assert list(tmp_path.rglob("events.out.tfevents.*")), "the config must log to TensorBoard"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_script_runs_in_quick_mode(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "--quick"])
    runpy.run_path(str(script), run_name="__main__")


def test_cli_defaults_to_the_digits_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    cli = build_cli(["fit", *QUICK, "--trainer.logger=false", "--trainer.enable_checkpointing=false"])
    assert type(cli.model).__name__ == "ClassifierModule"
    assert type(cli.model.backbone).__name__ == "ResidualCNN"
    assert type(cli.datamodule).__name__ == "DigitsDataModule"


@pytest.mark.slow
def test_baseline_config_reaches_97_percent(tmp_path, monkeypatch):
    """The README's first command, in full: val/acc >= 0.97 at the last epoch, once per epoch, and a report."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    main(["fit", "--config", str(EXAMPLES / "configs" / "digits_baseline.yaml"),
          "--trainer.enable_progress_bar=false"])
    run_dir = tmp_path / "runs" / "digits_baseline" / "version_0"
    accuracy = read_scalars(run_dir)["val/acc"]
    assert len(accuracy) == 20 and accuracy[-1][1] >= 0.97
    report = json.loads((run_dir / "compression_report.json").read_text())
    assert report["accuracy"] == pytest.approx(accuracy[-1][1])


def test_the_command_exits_with_status_zero_after_a_successful_run(tmp_path):
    """The console script passes ``main()``'s return value to ``sys.exit``: a successful run must exit 0, silently."""
    import shutil
    import subprocess

    script = shutil.which("lightning-compress")
    launcher = [script] if script else [sys.executable, "-c",
                                        "import sys; from lightning_compress.cli import main; sys.exit(main())"]
    done = subprocess.run([*launcher, "fit", *QUICK, "--trainer.logger=false", "--trainer.enable_checkpointing=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CompressCLI object" not in done.stderr
