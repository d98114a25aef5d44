"""DDP on CPU: 2 processes under torchrun (gloo) end with identical weights; a failing or empty rank ends the run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from detector.config import MODEL_CONFIG_DIR, REPO_ROOT
from detector.data.builtin import ensure_builtin_dataset
from detector.engine.callbacks import read_results
from detector.engine.distributed import launch_command
from detector.utils.checkpoint import load_checkpoint

SCRIPT = Path(__file__).with_name("ddp_train_script.py")
# Short collective timeout so that a bug shows up as a failure, not a hang; one thread per process (2 cores).
ENV = {**os.environ, "DETECTOR_DDP_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = ensure_builtin_dataset(root / "data", num_train=8, num_val=4, progress=False)
    model = yaml.safe_load((MODEL_CONFIG_DIR / "yolov5n.yaml").read_text())
    model["width_multiple"] = 0.125
    (root / "tiny.yaml").write_text(yaml.safe_dump(model))
    return root, data


def torchrun(out_dir: Path, tiny, mode: str) -> tuple[subprocess.CompletedProcess, float]:
    root, data = tiny
    out_dir.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(SCRIPT), str(out_dir), str(data), str(root / "tiny.yaml"), mode,
    ]  # fmt: skip
    start = time.time()
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return result, time.time() - start


def test_two_cpu_processes_end_with_identical_weights(tiny, tmp_path):
    result, _ = torchrun(tmp_path / "ok", tiny, "ok")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    rank0, rank1 = (torch.load(tmp_path / "ok" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert "DDP: all 2 ranks hold identical weights" in output
    run = tmp_path / "ok" / "runs" / "ddp"
    assert [row["epoch"] for row in read_results(run / "results.csv")] == [0, 1, 2]  # rank 0 alone writes
    saved = load_checkpoint(run / "weights" / "last.pt")
    assert all(torch.equal(saved["model"][k], rank0[k]) for k in rank0)
    assert not (tmp_path / "ok" / "runs" / "ddp2").exists()  # both ranks used rank 0's run folder


def test_a_failing_rank_ends_the_run_with_its_error(tiny, tmp_path):
    result, seconds = torchrun(tmp_path / "raise", tiny, "raise")
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
    assert seconds < 120  # torchrun stops rank 0 instead of leaving it waiting at a collective


def test_a_rank_without_batches_is_an_error_on_every_rank(tiny, tmp_path):
    result, seconds = torchrun(tmp_path / "empty", tiny, "empty")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "DDP: a rank has no training batches" in output
    assert seconds < 120


def test_self_launch_command_uses_torchrun():
    command = launch_command(["--device", "0,1", "--epochs", "3"], nproc=2)
    assert command[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert command[4:] == ["--nproc_per_node=2", "-m", "detector.cli.train", "--device", "0,1", "--epochs", "3"]
