"""One Trainer with distillation, filter pruning, quantization-aware training and the report; the real TensorBoard
server on 127.0.0.1 must serve every documented tag, once per epoch."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from lightning_compress import (
    CompressionReport,
    DistillationModule,
    FilterPruning,
    QuantizationAwareTraining,
)
from lightning_compress.demo import DigitsDataModule, ResidualCNN
from lightning_compress.pruning.schedules import AGP

EPOCHS = 3
PER_EPOCH = ["distill/soft", "distill/hard", "distill/total", "train/acc", "val/acc", "val/loss", "distill/agreement",
             "prune/sparsity", "prune/progress", "prune/sparsity/stage2.0.conv1", "prune/filters_alive/stage2.0.conv1",
             "prune/revived_filters", "quant/phase", "quant/amax/stage2.0.conv1", "quant/weight_amax/stage2.0.conv1",
             "quant/error/stage2.0.conv1"]
ONCE = ["val/teacher_acc", "report/parameters", "report/macs", "report/latency_ms", "report/size_bytes"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str, **query: str):
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def logdir(tmp_path, trainer_factory):
    module = DistillationModule(ResidualCNN(width=4), ResidualCNN(width=8).eval(), soft_weight=0.9, hard_weight=0.1)
    callbacks = [FilterPruning(sparsity=0.25, schedule=AGP(start=0, end=2), recalibration_batches=2),
                 QuantizationAwareTraining(num_bits=8, calibration="max", calibration_batches=2),
                 CompressionReport(batch_size=8, latency_runs=2, warmup=0)]
    trainer = trainer_factory(callbacks=callbacks, max_epochs=EPOCHS, limit_train_batches=4, limit_val_batches=2)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return tmp_path


@pytest.mark.slow
def test_every_documented_tag_is_served_once_per_epoch(logdir):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port",
         str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            try:
                tags = _get(port, "/data/plugin/scalars/tags")
                if tags and all(any(t in run for run in tags.values()) for t in PER_EPOCH + ONCE):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert tags, "TensorBoard did not answer"
        (run, run_tags), = tags.items()
        missing = [tag for tag in PER_EPOCH + ONCE if tag not in run_tags]
        assert not missing, f"tags not served: {missing}"
        for tag in PER_EPOCH:
            points = _get(port, "/data/plugin/scalars/scalars", run=run, tag=tag)
            assert len(points) == EPOCHS, (tag, points)
        for tag in ONCE:
            assert len(_get(port, "/data/plugin/scalars/scalars", run=run, tag=tag)) == 1, tag
    finally:
        server.terminate()
        server.wait(timeout=10)
