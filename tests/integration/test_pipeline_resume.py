"""The pipeline config (shortened) interrupted with SIGINT (graceful) or SIGKILL at a seeded random step inside each
phase, then resumed with the README's command (``--ckpt_path last``): the checkpoint it resumes from exists, the
resumed process starts at the epoch after it, and the run ends with the same student, masks, compaction, scales
and final metrics as an uninterrupted one. A truncated checkpoint stops the command with a clear error and leaves
every file as it was."""

import random
import shutil

import pytest
import torch
from pipeline_support import PHASES, STEPS_PER_EPOCH, checkpoint_dir, load_final, run_pipeline, starts
from test_kill_resume import assert_same


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    result = run_pipeline(root / "uninterrupted", root / "references")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _steps(kill_signal):
    """A step inside each phase, after at least one epoch has ended (before that there is nothing to resume)."""
    rng = random.Random(f"pipeline-{kill_signal}-steps")
    return {phase: rng.randint(max(first, 1) * STEPS_PER_EPOCH + 1, last * STEPS_PER_EPOCH - 1)
            for phase, (first, last) in PHASES.items()}


def test_every_epoch_end_writes_last_ckpt(uninterrupted):
    """last.ckpt exists during the fit, not only at its end: the uninterrupted run started once, at epoch 0."""
    run = uninterrupted / "uninterrupted"
    assert starts(run) == [{"epoch": 0, "global_step": 0}]
    checkpoint = torch.load(checkpoint_dir(run) / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["epoch"] == 7 and checkpoint["global_step"] == 8 * STEPS_PER_EPOCH


@pytest.mark.slow
@pytest.mark.parametrize("kill_signal", ["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_interrupted_pipeline_resumes_from_its_checkpoint_to_the_uninterrupted_result(uninterrupted, phase,
                                                                                      kill_signal):
    step = _steps(kill_signal)[phase]
    directory = uninterrupted / f"{kill_signal}-at-{step}"
    killed = run_pipeline(directory, uninterrupted / "references", kill_at=step, kill_signal=kill_signal)
    expected_code = -9 if kill_signal == "SIGKILL" else 1  # SIGINT: Lightning's graceful shutdown, exit status 1
    assert killed.returncode == expected_code, f"not interrupted at step {step}: {killed.stderr[-2000:]}"
    assert not (directory / "final_rank0.pt").exists()
    last = checkpoint_dir(directory) / "last.ckpt"
    assert last.is_file(), f"{kill_signal} at step {step} left no checkpoint to resume from"
    saved = torch.load(last, weights_only=False, map_location="cpu")
    epochs_done = (step - 1) // STEPS_PER_EPOCH  # step s is a batch of epoch (s - 1) // 4, which did not finish
    assert saved["epoch"] == epochs_done - 1 and saved["global_step"] == epochs_done * STEPS_PER_EPOCH
    resumed = run_pipeline(directory, uninterrupted / "references", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {last}" in resumed.stderr
    assert starts(directory) == [{"epoch": 0, "global_step": 0},
                                 {"epoch": epochs_done, "global_step": epochs_done * STEPS_PER_EPOCH}]
    reference = load_final(uninterrupted / "uninterrupted")
    assert_same(reference, load_final(directory), f"{phase}, {kill_signal} at step {step}")


def test_resume_without_a_checkpoint_says_where_it_looked(uninterrupted):
    directory = uninterrupted / "nothing-to-resume"
    result = run_pipeline(directory, uninterrupted / "references", resume=True)
    assert result.returncode == 2 and not starts(directory)
    assert "no checkpoint to resume from" in result.stderr and "version_*" in result.stderr, result.stderr[-2000:]


def _snapshot(directory):
    return {path.relative_to(directory): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_checkpoint_stops_with_a_clear_error_and_overwrites_nothing(uninterrupted, damage):
    directory = uninterrupted / f"corrupt-{damage}"
    shutil.copytree(checkpoint_dir(uninterrupted / "uninterrupted"), checkpoint_dir(directory))
    last = checkpoint_dir(directory) / "last.ckpt"
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
