"""DDP on CPU: 2 processes under torchrun (gloo) end with identical weights, the same as one process on the same global
batch; a failing or empty rank ends the run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from detector.config import MODEL_CONFIG_DIR
from detector.data.builtin import ensure_builtin_dataset
from detector.engine.distributed import launch_command
from detector.engine.loggers import read_results
from detector.utils.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, where train.py is
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


def torchrun(out_dir: Path, tiny, mode: str, nproc: int = 2, data: Path | None = None):
    root, tiny_data = tiny
    out_dir.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        str(SCRIPT), str(out_dir), str(data or tiny_data), str(root / "tiny.yaml"), mode,
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


@pytest.fixture(scope="module")
def same_layout(tmp_path_factory) -> Path:
    """8 different noise images that share one label layout: every image has the same number of matched anchors,
    so the loss's per-batch means over positives split evenly between two ranks (as they must for DDP to equal
    one process exactly; with uneven splits the YOLOv5 loss differs slightly, in DDP as in YOLOv5)."""
    root = tmp_path_factory.mktemp("same_layout")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for index in range(8 if split == "train" else 2):
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / split / f"{index}.png"), image)
            (root / "labels" / split / f"{index}.txt").write_text("0 0.5 0.5 0.4 0.4\n1 0.3 0.7 0.2 0.25\n")
    data = root / "data.yaml"
    data.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": ["a", "b"]})
    )
    return data


def test_two_processes_equal_one_process_on_the_same_global_batch(tiny, same_layout, tmp_path):
    """Batch 8 as one process, and as 2 ranks of 4: the DDP-averaged gradient of the world-size-scaled loss equals
    the whole batch's, so after 2 epochs (2 optimizer steps) both runs hold the same weights."""
    weights = []
    for nproc in (1, 2):
        result, _ = torchrun(tmp_path / f"n{nproc}", tiny, "equivalence", nproc=nproc, data=same_layout)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        weights.append(torch.load(tmp_path / f"n{nproc}" / "rank0.pt", weights_only=True))
    one, two = weights
    start = torch.load(tmp_path / "n1" / "start0.pt", weights_only=True)
    trained = [k for k in one if one[k].is_floating_point() and "running" not in k and "anchors" not in k]
    moved = sum(float((one[k] - start[k]).abs().sum()) for k in trained)
    differ = sum(float((two[k] - one[k]).abs().sum()) for k in trained)
    assert moved > 0.1  # two SGD steps changed the weights (0.28 in sum of |change| when written)
    assert differ < 1e-3 * moved, (differ, moved)  # and both runs changed them the same way
    for name in trained:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
