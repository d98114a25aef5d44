"""Resume: a run killed with SIGKILL mid-epoch continues from its last checkpoint to the same final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from detector.config import MODEL_CONFIG_DIR
from detector.data.builtin import ensure_builtin_dataset
from detector.engine.loggers import read_results
from detector.utils.checkpoint import load_checkpoint

# One torch thread per process: the tiny model gains nothing from two, and they crawl on a shared 2-core machine.
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, where train.py is
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = ensure_builtin_dataset(root / "data", num_train=8, num_val=4, progress=False)
    model = yaml.safe_load((MODEL_CONFIG_DIR / "yolov5n.yaml").read_text())
    model["width_multiple"] = 0.125
    (root / "tiny.yaml").write_text(yaml.safe_dump(model))
    return root, data


def train_command(root, data, name: str, epochs: int = 4) -> list[str]:
    return [
        sys.executable, "train.py", "--data", str(data), "--cfg", str(root / "tiny.yaml"), "--img", "64",
        "--batch-size", "4", "--epochs", str(epochs), "--workers", "1", "--deterministic", "--seed", "5",
        "--project", str(root / "runs"), "--name", name, "--noplots", "--noautoanchor",
    ]  # fmt: skip


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    return result


def assert_same_weights(path_a, path_b) -> None:
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    for entry in ("model", "ema"):
        assert a[entry].keys() == b[entry].keys()
        different = [k for k in a[entry] if not torch.equal(a[entry][k], b[entry][k])]
        assert not different, f"{entry}: {len(different)} tensors differ, e.g. {different[:3]}"


def kill_after_checkpoint(command: list[str], last: Path, epoch: int) -> None:
    """Start ``command`` and SIGKILL it as soon as ``last`` holds epoch ``epoch``'s checkpoint (so during the next
    epoch, right after the checkpoint was renamed into place)."""
    killed = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + 180, None
    while killed.poll() is None and time.time() < deadline:
        stamp = last.stat().st_mtime_ns if last.exists() else None
        if stamp != seen and (seen := stamp) is not None and load_checkpoint(last)["epoch"] == epoch:
            break
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert load_checkpoint(last)["epoch"] == epoch


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tiny):
    root, data = tiny
    run(train_command(root, data, "straight"))

    last = root / "runs" / "killed" / "weights" / "last.pt"
    kill_after_checkpoint([*train_command(root, data, "killed"), "--ndjson-file"], last, epoch=0)  # during epoch 1

    resumed = run([sys.executable, "train.py", "--resume", str(last), "--workers", "0"])  # workers may change
    assert "Resuming" in resumed.stdout + resumed.stderr
    assert_same_weights(root / "runs" / "straight" / "weights" / "last.pt", last)
    assert [row["epoch"] for row in read_results(root / "runs" / "killed" / "results.csv")] == [0, 1, 2, 3]
    # results.ndjson (--ndjson-file, kept by the resumed run's saved config) lost the killed epoch's line too
    ndjson = root / "runs" / "killed" / "results.ndjson"
    assert [json.loads(line)["epoch"] for line in ndjson.read_text().splitlines()] == [0, 1, 2, 3]

    # A finished run is extended with --epochs; another changed option is refused, naming the flag.
    refused = subprocess.run(
        [sys.executable, "train.py", "--resume", str(last), "--img", "96"], cwd=REPO_ROOT, env=ENV,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "--imgsz cannot change when resuming" in refused.stderr
    finished = subprocess.run(
        [sys.executable, "train.py", "--resume", str(last)], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert finished.returncode == 2 and "this run has finished (4 of 4 epochs)" in finished.stderr
    assert f"python train.py --resume {last} --epochs 8" in finished.stderr  # how to extend it
    assert finished.stderr.count("\n") == 1 and "WARNING" not in finished.stdout  # one line, nothing before it
    run([sys.executable, "train.py", "--resume", str(last), "--epochs", "5"])
    assert load_checkpoint(last)["epoch"] == 4
    assert len(read_results(root / "runs" / "killed" / "results.csv")) == 5
    assert [json.loads(line)["epoch"] for line in ndjson.read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_sigkill_in_the_close_mosaic_phase_at_the_test_size_then_resume_equals_uninterrupted_run(tiny):
    """--close-mosaic 2 --val-img 96: killed in the closed phase (epoch 3), whose batches come from a loader rebuilt
    at 96 px; the resumed run rebuilds it before its first batch and ends with the uninterrupted run's weights."""
    root, data = tiny
    closed = ["--close-mosaic", "2", "--val-img", "96"]
    run(train_command(root, data, "closed-straight") + closed)

    last = root / "runs" / "closed-killed" / "weights" / "last.pt"
    # epoch 2, the first closed one, is saved: killed in epoch 3
    kill_after_checkpoint(train_command(root, data, "closed-killed") + closed, last, epoch=2)

    resumed = run([sys.executable, "train.py", "--resume", str(last)])
    assert "Training images now load at 96 px" in resumed.stdout + resumed.stderr
    assert_same_weights(root / "runs" / "closed-straight" / "weights" / "last.pt", last)
