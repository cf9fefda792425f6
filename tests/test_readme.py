"""Every Python snippet of the README runs as written, in order, in one namespace (a newcomer's copy and paste);
only the Trainer is shortened (epochs and batches), so the test takes seconds instead of the documented minutes."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SHORT = {"max_epochs": 3, "limit_train_batches": 8, "limit_val_batches": 2, "enable_progress_bar": False,
         "enable_model_summary": False}


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_snippets_that_use_the_library():
    blocks = snippets()
    assert len(blocks) >= 5 and all("lightning_compress" in b or "torch" in b for b in blocks)


@pytest.mark.slow
def test_every_python_snippet_runs_as_written(tmp_path, monkeypatch):
    original = pl.Trainer.__init__

    def shortened(self, *args, **kwargs):
        kwargs.update({key: min(kwargs.get(key, value), value) if key == "max_epochs" else value
                       for key, value in SHORT.items()})
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", shortened)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(snippets()):
        try:
            exec(compile(block, f"README.md python snippet {index}", "exec"), namespace)
        except Exception as error:  # name the snippet that failed
            pytest.fail(f"README snippet {index} failed: {type(error).__name__}: {error}\n{block}")
    torch.use_deterministic_algorithms(False)
    assert (tmp_path / "model_int8.pt").is_file() and (tmp_path / "model_int8.json").is_file()
    assert namespace["model"](torch.randn(2, 1, 8, 8)).shape == (2, 10)  # the int8 file, loaded with torch alone
    assert any(tmp_path.rglob("compression_report.md"))
