"""The ablation harness end to end on a tiny model: scripts/ablate.py with the baseline and one trick, 2 seeds of 1
epoch each; the same command again skips every finished run; an unknown trick is one line; on Ray, two runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detector.ablation import ablate
from detector.engine.loggers import read_results

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: one thread is faster on 2 shared cores

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_options(tiny, project: Path) -> dict:
    # Single-class validation: even a barely trained model's low-confidence boxes hit a few objects, so mAP > 0.
    return dict(
        data=tiny["data"], cfg=tiny["cfg"], imgsz=64, batch_size=4, epochs=1, workers=0, noautoanchor=True,
        single_cls=True, project=str(project), name="exp",
    )  # fmt: skip


def tiny_flags(tiny, project: Path) -> list[str]:
    return [
        "--data", tiny["data"], "--cfg", tiny["cfg"], "--img", "64", "--batch-size", "4", "--epochs", "1",
        "--workers", "0", "--noautoanchor", "--single-cls", "--project", str(project), "--name", "exp",
    ]  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_rows_match_runs(folder: Path, rows: list[dict[str, str]]) -> None:
    """Each row holds its run's final validation: the last row of that run's own results.csv."""
    for row in rows:
        run = folder / row["trick"] / f"seed{row['seed']}"
        last = read_results(run / "results.csv")[-1]
        assert float(row["mAP50"]) == pytest.approx(last["metrics/mAP_0.5"], rel=1e-4, abs=1e-9), run
        assert float(row["mAP50-95"]) == pytest.approx(last["metrics/mAP_0.5:0.95"], rel=1e-4, abs=1e-9), run
        fitness = 0.1 * float(row["mAP50"]) + 0.9 * float(row["mAP50-95"])
        assert float(row["fitness"]) == pytest.approx(fitness, abs=1e-5)
        assert float(row["train_seconds"]) > 0 and float(row["images_per_second"]) > 0
        assert int(row["epochs"]) == 1 and row["error"] == ""
        assert not (run / "weights").exists(), "no checkpoints unless --keep-weights"


def test_tiny_ablation_through_the_script_and_resume(tiny, tmp_path):
    project = tmp_path / "runs"
    command = [
        sys.executable, "scripts/ablate.py", "--tricks", "label-smoothing", "--seeds", "2", *tiny_flags(tiny, project),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    folder = project / "exp"
    rows = read_rows(folder / "ablation.csv")
    assert sorted((row["trick"], row["seed"], row["status"]) for row in rows) == [
        ("baseline", "0", "ok"),
        ("baseline", "1", "ok"),
        ("label-smoothing", "0", "ok"),
        ("label-smoothing", "1", "ok"),
    ]
    assert {row["overrides"] for row in rows if row["trick"] == "label-smoothing"} == {"hyp.label_smoothing=0.1"}
    assert any(float(row["mAP50"]) > 0 for row in rows), "the premise: some run finds objects"
    check_rows_match_runs(folder, rows)
    config = (folder / "label-smoothing" / "seed1" / "config.yaml").read_text()
    assert "label_smoothing: 0.1" in config and "seed: 1" in config

    markdown = (folder / "ablation.md").read_text()
    assert "| baseline |" in markdown and "| label-smoothing | `hyp.label_smoothing=0.1` | 2/2 |" in markdown
    assert "spread = half the min-max range" in markdown and "scripts/ablate.py --tricks label-smoothing" in markdown
    assert (folder / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same command with --exist-ok (here through the API) runs nothing again and keeps every row.
    summary = ablate(tricks=["label-smoothing"], seeds=2, **tiny_options(tiny, project), exist_ok=True)
    assert summary.save_dir == folder
    assert read_rows(folder / "ablation.csv") == rows
    assert [s.name for s in summary.summaries] == ["baseline", "label-smoothing"]
    assert all(s.finished == 2 for s in summary.summaries)
    assert not (project / "exp2").exists()


def test_unknown_trick_is_one_line_and_writes_nothing(tiny, tmp_path):
    project = tmp_path / "runs"
    command = [sys.executable, "scripts/ablate.py", "--tricks", "mixpu", *tiny_flags(tiny, project)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and "unknown trick 'mixpu'; did you mean 'mixup'?" in error
    assert not project.exists()


@pytest.mark.slow  # Ray's start and two worker processes that each import torch
def test_two_runs_at_once_on_ray(tiny, tmp_path):
    ray = pytest.importorskip("ray", reason='Ray is optional: pip install "detector[tune]"')
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        project = tmp_path / "runs"
        result = ablate(
            tricks=["baseline"], seeds=2, backend="ray", trial_resources="cpu=1", **tiny_options(tiny, project)
        )
    finally:
        ray.shutdown()
    folder = project / "exp"
    rows = read_rows(folder / "ablation.csv")
    assert sorted((row["trick"], row["seed"], row["status"]) for row in rows) == [
        ("baseline", "0", "ok"),
        ("baseline", "1", "ok"),
    ]
    check_rows_match_runs(folder, rows)
    assert (folder / "baseline" / "seed0" / "console.txt").is_file()  # the worker's progress bars
    assert result.summaries[0].finished == 2
    assert (folder / "ablation.md").is_file() and (folder / "ablation.png").is_file()
