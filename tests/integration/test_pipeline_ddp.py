"""The pipeline config (shortened) with 2 CPU processes under the ``ddp`` strategy (subprocess launcher): identical
students, masks, compaction and scales on both ranks, and a pruned, quantized student in the main process."""

import pytest
import torch
from pipeline_support import load_final, run_pipeline
from test_kill_resume import assert_same


@pytest.mark.slow
def test_pipeline_under_ddp_ends_identical_on_every_rank(tmp_path):
    directory = tmp_path / "ddp"
    result = run_pipeline(directory, tmp_path / "references", "--trainer.strategy=ddp", "--trainer.devices=2",
                          "--trainer.accelerator=cpu")
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = load_final(directory, 0), load_final(directory, 1)
    assert_same(rank0["student"], rank1["student"], "student")
    assert_same(rank0["callbacks"], rank1["callbacks"], "callback state")
    assert rank0["callbacks"]["FilterPruning"]["events"], "the student was not compacted"
    assert rank0["callbacks"]["QuantizationAwareTraining"]["phase"] == "frozen"
    structure, student = rank0["structure"], rank0["student"]
    assert structure["stem.conv"] == "QuantConv2d" and structure["fc"] == "QuantLinear"
    assert student["stem.conv.weight"].shape[0] < 8, "the stem kept all 8 filters"
    assert torch.count_nonzero(student["stem.conv.input_quantizer.amax"]) > 0
    run_dir = next((directory / "runs" / "pipeline").glob("version_*"))
    assert (run_dir / "model_int8.pt").is_file() and (run_dir / "compression_report.json").is_file()
