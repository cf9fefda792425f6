"""The pipeline config (shortened) killed with SIGKILL at a seeded random step inside each phase, resumed from its
last end-of-epoch checkpoint: same student, masks, compaction, scales and final metrics as an uninterrupted run.
A truncated checkpoint stops the command with a clear error and leaves every file as it was."""

import random
import shutil

import pytest
from pipeline_support import PHASES, STEPS_PER_EPOCH, load_final, run_pipeline
from test_kill_resume import assert_same


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    result = run_pipeline(root / "uninterrupted", root / "references")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _steps():
    rng = random.Random("pipeline-kill-steps")
    return {phase: rng.randint(first * STEPS_PER_EPOCH + 1, last * STEPS_PER_EPOCH - 1)
            for phase, (first, last) in PHASES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_killed_pipeline_resumes_to_the_uninterrupted_result(uninterrupted, phase):
    step = _steps()[phase]
    directory = uninterrupted / f"killed-at-{step}"
    killed = run_pipeline(directory, uninterrupted / "references", kill_at=step)
    assert killed.returncode == -9, f"not killed at step {step}: {killed.stderr[-2000:]}"
    assert not (directory / "final_rank0.pt").exists()
    resumed = run_pipeline(directory, uninterrupted / "references", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = load_final(uninterrupted / "uninterrupted")
    assert_same(reference, load_final(directory), f"{phase}, killed at step {step}")


def _snapshot(directory):
    return {path.relative_to(directory): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_checkpoint_stops_with_a_clear_error_and_overwrites_nothing(uninterrupted, damage):
    directory = uninterrupted / f"corrupt-{damage}"
    shutil.copytree(uninterrupted / "uninterrupted" / "checkpoints", directory / "checkpoints")
    last = directory / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x13\x37" * 4096}[damage])
    (directory / "pipeline.yaml").write_text("")  # rewritten by run_pipeline: not part of the comparison
    before = _snapshot(directory)
    result = run_pipeline(directory, uninterrupted / "references", resume=True)
    assert result.returncode != 0
    assert "last.ckpt" in result.stderr and "corrupt" in result.stderr, result.stderr[-2000:]
    after = _snapshot(directory)
    after.pop(next(p for p in after if p.name == "pipeline.yaml"))
    before.pop(next(p for p in before if p.name == "pipeline.yaml"))
    assert after == before
