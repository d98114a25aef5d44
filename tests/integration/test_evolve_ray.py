"""Evolution on Ray Tune: two trials at once on a local 2-CPU Ray instance, ASHA stopping a hopeless trial after its
first epoch, and evolve.csv holding what each trial last reported to Ray."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from detector.config import Hyperparameters

ray = pytest.importorskip("ray", reason='Ray Tune is optional: pip install "detector[tune]"')
pytest.importorskip("ray.tune", reason='Ray Tune is optional: pip install "detector[tune]"')

from detector.evolve.search import run_evolution  # noqa: E402  (after the skip: nothing to test without Ray)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs: two 1-CPU trials at a time."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def write_hyp(path: Path, **changes: float) -> Path:
    path.write_text(yaml.safe_dump(dataclasses.asdict(dataclasses.replace(Hyperparameters(), **changes))))
    return path


def ray_results(save_dir: Path) -> dict[int, list[dict]]:
    """Every result each trial reported to Ray, read from Ray's own files (ray/<experiment>/<trial>/result.json)."""
    results = {}
    for path in save_dir.glob("ray/*/trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        results[int(rows[0]["config"]["_index"])] = rows
    return results


def running_span(results: list[dict]) -> tuple[float, float]:
    """When a trial started and ended, from its last result: Ray's ``timestamp`` minus its ``time_total_s``."""
    return results[-1]["timestamp"] - results[-1]["time_total_s"], results[-1]["timestamp"]


@pytest.mark.slow  # ~50 s on 2 cores: Ray's start and three worker processes that each import torch
def test_two_trials_at_once_and_asha_stops_the_hopeless_one(tiny, tmp_path, local_ray):
    # Single-class validation: even an untrained model's many low-confidence boxes hit a few objects, so a
    # normal trial scores above 0 at every epoch. fl_gamma 1.5 starts the class scores at the focal-loss prior
    # (0.01; with one class no class loss moves them), and objectness x 0.01 stays below validation's 0.001
    # confidence threshold: no detection, fitness exactly 0.
    # Trials 0 and 1 (--hyp and the first --evolve-hyps) start together; trial 2 (hopeless) waits for a free CPU,
    # so it reaches ASHA's first rung (epoch 1) after both others have, and below them it is stopped.
    hopeless = write_hyp(tmp_path / "hopeless.yaml", fl_gamma=1.5)
    slower = write_hyp(tmp_path / "slower.yaml", lr0=0.002)
    options = {
        "evolve": 3,
        "evolve_backend": "ray",
        "evolve_scheduler": "asha",
        "asha_grace_period": 1,
        "asha_reduction_factor": 2,
        "evolve_concurrency": 2,
        "evolve_hyps": (str(slower), str(hopeless)),
        "data": tiny["data"],
        "cfg": tiny["cfg"],
        "single_cls": True,
        "imgsz": 64,
        "batch_size": 4,
        "epochs": 2,
        "workers": 0,
        "noautoanchor": True,
        "project": str(tmp_path / "evolve"),
        "name": "exp",
    }
    best = run_evolution(options, "test_evolve_ray")

    save_dir = tmp_path / "evolve" / "exp"
    with open(save_dir / "evolve.csv", newline="") as f:
        rows = {int(row["trial"]): row for row in csv.DictReader(f)}
    assert sorted(rows) == [0, 1, 2]
    assert float(rows[1]["lr0"]) == 0.002
    assert float(rows[2]["fl_gamma"]) == 1.5

    reported = ray_results(save_dir)
    assert sorted(reported) == [0, 1, 2]
    assert reported[0][0]["fitness"] > 0 and reported[1][0]["fitness"] > 0  # the premise: they score at epoch 1
    hopeless_row = rows[2]
    assert (hopeless_row["status"], hopeless_row["epochs"], float(hopeless_row["fitness"])) == ("stopped", "1", 0.0)
    # Of the two that started together, the first at epoch 1 always goes on; the second only if not below it.
    assert {rows[0]["status"], rows[1]["status"]} <= {"ok", "stopped"}
    assert "ok" in {rows[0]["status"], rows[1]["status"]}
    for row in rows.values():
        assert int(row["epochs"]) == (2 if row["status"] == "ok" else 1)
        assert row["error"] == ""

    # Each row holds the trial's last result as Ray received it (an independent record: Ray's result.json).
    for index, row in rows.items():
        last = reported[index][-1]
        assert float(row["fitness"]) == pytest.approx(last["fitness"], rel=1e-5)
        assert int(row["epochs"]) == last["epoch"]
        assert float(row["metrics/mAP_0.5"]) == pytest.approx(last["metrics/mAP_0.5"], rel=1e-5, abs=1e-12)
        assert last.get("finished", False) == (row["status"] == "ok")

    # Trials 0 and 1 ran at the same time: each started before the other ended (Ray's clock; whole seconds).
    (start0, end0), (start1, end1) = running_span(reported[0]), running_span(reported[1])
    assert start0 < end1 and start1 < end0, (start0, end0, start1, end1)

    assert best is not None and best.index in (0, 1) and best.fitness > 0
    assert (save_dir / "hyp_evolve.yaml").is_file() and (save_dir / "evolve.png").is_file()
    assert (save_dir / "trials" / "0000" / "results.csv").is_file()
