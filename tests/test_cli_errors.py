"""A config typo or a bad value prints its root cause in a few lines (LightningCLI kept, its error output shaped)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_compress.cli import build_cli
from lightning_compress.cli_errors import concise_message, root_causes

PIPELINE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "pipeline.yaml"


def _error(args, capsys) -> list[str]:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)  # every case stops before training
    assert exit_info.value.code == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _config(tmp_path, edit) -> str:
    config = yaml.safe_load(PIPELINE.read_text())
    config.pop("references")
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_misspelled_callback_option_names_the_option_it_meant(tmp_path, capsys):
    def misspell(config):
        pruning = config["trainer"]["callbacks"][0]["init_args"]
        pruning["sparsty"] = pruning.pop("sparsity")

    lines = _error(["fit", "--config", _config(tmp_path, misspell)], capsys)
    assert len(lines) <= 3, lines
    assert "lightning_compress.FilterPruning: Option 'sparsty' is not accepted; did you mean 'sparsity'?" in lines[0]


def test_a_bad_value_prints_the_constructor_s_message_alone(tmp_path, capsys):
    def negative(config):
        config["model"]["init_args"]["temperature"] = -1.0

    lines = _error(["fit", "--config", _config(tmp_path, negative)], capsys)
    assert "error: temperature must be a finite positive number, got -1.0." in lines and len(lines) <= 2, lines


def test_an_unknown_argument_suggests_the_nearest_option(capsys):
    lines = _error(["fit", "--trainer.max_epochz", "3"], capsys)
    assert lines[0].startswith("error: unrecognized arguments:") and "--trainer.max_epochz" in lines[0]
    assert lines[0].endswith("; did you mean --trainer.max_epochs?")
    assert len(lines) == 2 and lines[1].startswith("tip:")


def test_root_causes_drop_the_union_noise():
    message = ('Parser key "trainer.callbacks":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
               "    - Problem with given class_path 'lightning_compress.FilterPruning':\n"
               "        Option 'sparsty' is not accepted\n    - Not a valid subclass of Callback\n"
               "      Subclass types expect one of:\n      - a class path (str)\n    - Expected a <class 'NoneType'>\n"
               "  Given value type: <class 'list'>\n  Given value: [...]")
    assert root_causes(message) == ["lightning_compress.FilterPruning: Option 'sparsty' is not accepted"]
    assert concise_message(message).startswith("trainer.callbacks: lightning_compress.FilterPruning: Option 'spars")
    assert concise_message("plain message") == "plain message"
