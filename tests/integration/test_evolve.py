"""Hyperparameter evolution end to end on a tiny model: train.py --evolve, resume after SIGKILL, exactly N trials,
failed trials, refused options."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import detector
from detector.cli.train import main as train_main
from detector.config import Hyperparameters, load_hyp
from detector.engine.loggers import read_results
from detector.errors import ConfigError
from detector.evolve.search import EvolveRun, execute_trial
from detector.evolve.space import SearchSpace

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: one thread is faster on 2 shared cores

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_flags(tiny, project: Path) -> list[str]:
    return [
        "--data", tiny["data"], "--cfg", tiny["cfg"], "--img", "64", "--batch-size", "4", "--epochs", "1",
        "--workers", "0", "--noautoanchor", "--project", str(project),
    ]  # fmt: skip


def tiny_options(tiny, project: Path, **changes) -> dict:
    options = dict(
        data=tiny["data"], cfg=tiny["cfg"], imgsz=64, batch_size=4, epochs=1, workers=0, noautoanchor=True,
        project=str(project),
    )  # fmt: skip
    return {**options, **changes}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evolve_through_train_py(tiny, tmp_path):
    command = [sys.executable, "train.py", "--evolve", "2", *tiny_flags(tiny, tmp_path / "runs")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    folder = tmp_path / "runs" / "exp"
    rows = read_rows(folder / "evolve.csv")
    assert [row["trial"] for row in rows] == ["0", "1"]  # exactly N trials
    assert all(row["status"] == "ok" for row in rows)

    start = dataclasses.asdict(Hyperparameters())
    assert {key: float(rows[0][key]) for key in start} == pytest.approx(start)  # trial 0 is the starting hyp
    space = SearchSpace.load()
    evolved = space.evolved_keys(start)
    moved = [key for key in evolved if float(rows[1][key]) != start[key]]
    assert moved, "the second trial must differ from the start"
    for key in start:
        value = float(rows[1][key])
        if key in evolved:
            assert space.dimensions[key].low <= value <= space.dimensions[key].high
        else:  # frozen keys (iou_t, anchors, augmentations that start at 0) never move
            assert value == start[key], key

    for row in rows:  # each row holds the final validation of that trial's own results.csv
        last = read_results(folder / "trials" / f"{int(row['trial']):04d}" / "results.csv")[-1]
        for column in ("metrics/mAP_0.5", "val/box_loss", "val/obj_loss", "val/cls_loss"):
            assert float(row[column]) == pytest.approx(last[column], rel=1e-4), column
        weighted = 0.1 * float(row["metrics/mAP_0.5"]) + 0.9 * float(row["metrics/mAP_0.5:0.95"])
        assert float(row["fitness"]) == pytest.approx(weighted, abs=1e-6)
    assert not list(folder.rglob("*.pt")), "trials write no checkpoints"

    best = max(rows, key=lambda row: float(row["fitness"]))
    loaded = dataclasses.asdict(load_hyp(folder / "hyp_evolve.yaml"))  # loadable with --hyp
    assert loaded == pytest.approx({key: float(best[key]) for key in start})
    assert (folder / "evolve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Best: trial {best['trial']}" in result.stdout + result.stderr


def test_sigkill_mid_trial_loses_only_that_trial(tiny, tmp_path):
    project = tmp_path / "runs"
    command = [sys.executable, "train.py", "--evolve", "3", *tiny_flags(tiny, project)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    table = project / "exp" / "evolve.csv"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if table.exists() and len(read_rows(table)) == 1:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # during trial 1
    process.wait()
    first = table.read_text().splitlines()
    assert len(first) == 2, "the kill must come after trial 0 and before trial 1 ended"

    resumed = [sys.executable, "train.py", "--evolve", "3", "--resume-evolve", str(project / "exp")]
    result = subprocess.run(resumed, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    lines = table.read_text().splitlines()
    assert lines[:2] == first  # the finished trial is kept as it was, not run again
    assert [row["trial"] for row in read_rows(table)] == ["0", "1", "2"]

    # The resumed trials are the ones an uninterrupted search proposes: they depend on (seed, index, earlier trials)
    run = EvolveRun.prepare({"resume_evolve": str(project / "exp")}, "test")
    rows = read_rows(table)
    for index in (1, 2):
        proposal = run.strategy.propose(index, run.history[:index])
        assert {key: float(rows[index][key]) for key in proposal} == pytest.approx(proposal)


def test_same_command_with_exist_ok_continues_and_other_options_are_refused(tiny, tmp_path):
    options = tiny_options(tiny, tmp_path / "runs", name="search", exist_ok=True, evolve_strategy="yolov5")
    detector.evolve(evolve=1, **options)
    best = detector.evolve(evolve=2, **options)  # the same command, one more trial
    rows = read_rows(tmp_path / "runs" / "search" / "evolve.csv")
    assert [row["trial"] for row in rows] == ["0", "1"]
    assert best.index in (0, 1) and best.fitness == max(float(row["fitness"]) for row in rows)
    assert detector.evolve(evolve=2, **options).index == best.index  # nothing left to run: no trial repeats
    assert len(read_rows(tmp_path / "runs" / "search" / "evolve.csv")) == 2
    with pytest.raises(ConfigError, match=r"evolve.yaml: this evolution ran with other options \(--epochs\)"):
        detector.evolve(evolve=3, **{**options, "epochs": 2})
    with pytest.raises(ConfigError, match=r"\(--evolve-strategy\)"):
        detector.evolve(evolve=3, **{**options, "evolve_strategy": "genetic"})


def test_a_failed_trial_scores_zero_and_the_search_goes_on(tiny, tmp_path):
    run = EvolveRun.prepare(tiny_options(tiny, tmp_path / "runs", evolve=2), "test")
    broken = {**run.start, "mosaic": 2.0}  # a probability above 1: the trial's trainer refuses it
    outcome = execute_trial(run, 0, broken)
    assert (outcome.status, outcome.fitness) == ("failed", 0.0)
    assert "hyp.mosaic" in outcome.error
    run.record(outcome)
    run.record(execute_trial(run, 1, run.strategy.propose(1, run.history)))
    rows = read_rows(run.save_dir / "evolve.csv")
    assert [(row["trial"], row["status"]) for row in rows] == [("0", "failed"), ("1", "ok")]
    assert run.remaining() == 0


def test_a_bad_space_file_is_one_line_and_writes_nothing(tiny, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {low: 0.1, high: 0.001, scale: log}\n")
    project = tmp_path / "runs"
    assert train_main(["--evolve", "2", "--evolve-space", str(space), *tiny_flags(tiny, project)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(space) in error and "lr0" in error
    assert not project.exists()
