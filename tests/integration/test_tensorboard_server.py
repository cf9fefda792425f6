"""The real TensorBoard server on 127.0.0.1 against the pipeline's log directory (the README's main command): every
documented tag is served with one point per epoch (quantization tags from the epoch QAT starts), the end-of-fit
tags once."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

EPOCHS, QAT_START = 30, 18
PER_EPOCH = ["distill/soft", "distill/hard", "distill/total", "train/acc", "val/acc", "val/loss", "distill/agreement",
             "prune/sparsity", "prune/progress", "prune/compacted", "prune/sparsity/stage2.0.conv1",
             "prune/filters_alive/stage2.0.conv1", "prune/revived_filters", "quant/phase"]
FROM_QAT_START = ["quant/amax/stage2.0.conv1", "quant/weight_amax/stage2.0.conv1", "quant/error/stage2.0.conv1"]
ONCE = ["val/teacher_acc", "export/acc", "export/agreement", "export/size_bytes", "report/parameters", "report/macs",
        "report/latency_ms", "report/size_bytes", "report/reference/teacher/size_bytes",
        "report/reference/student_alone/accuracy_delta_points"]
EXPECTED = PER_EPOCH + FROM_QAT_START + ONCE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str, **query: str):
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_every_documented_tag_is_served_once_per_epoch(pipeline_run):
    logdir = pipeline_run
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
                if tags and all(any(t in run for run in tags.values()) for t in EXPECTED):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert tags, "TensorBoard did not answer"
        (run, run_tags), = tags.items()
        missing = [tag for tag in EXPECTED if tag not in run_tags]
        assert not missing, f"tags not served: {missing}"
        for tag in PER_EPOCH:
            points = _get(port, "/data/plugin/scalars/scalars", run=run, tag=tag)
            assert len(points) == EPOCHS, (tag, points)
        for tag in FROM_QAT_START:
            points = _get(port, "/data/plugin/scalars/scalars", run=run, tag=tag)
            assert len(points) == EPOCHS - QAT_START, (tag, points)
        for tag in ONCE:
            assert len(_get(port, "/data/plugin/scalars/scalars", run=run, tag=tag)) == 1, tag
    finally:
        server.terminate()
        server.wait(timeout=10)
