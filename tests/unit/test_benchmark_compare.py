"""The side-by-side harness of scripts/benchmark.py (--compare-yolov5) without YOLOv5: the A B A B order of real
processes, the median / min-max / ratio arithmetic against hand numbers, the table, and the error line for a PATH
that is not a YOLOv5 install."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from detector.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    """scripts/benchmark.py as a module (scripts are not a package; importing it only registers benchmarks)."""
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO_ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_schedule_alternates_sides_and_times_only_after_warmup(bench):
    assert bench.interleaved_schedule(1, 2) == [
        (0, "ours", False),
        (0, "yolov5", False),
        (1, "ours", True),
        (1, "yolov5", True),
        (2, "ours", True),
        (2, "yolov5", True),
    ]


def test_median_min_max_and_ratio_of_medians(bench):
    ours, theirs = [14.0, 10.0, 12.0], [20.0, 24.0, 16.0, 30.0]
    assert bench.Spread.of(ours) == bench.Spread(12.0, 10.0, 14.0)
    assert bench.Spread.of(theirs) == bench.Spread(22.0, 16.0, 30.0)  # even count: mean of the middle two
    assert bench.ratio_of_medians(ours, theirs) == pytest.approx(12 / 22)
    assert str(bench.Spread.of(ours)) == "12 [10-14]"
    nan = bench.ratio_of_medians(ours, [])
    assert nan != nan  # no YOLOv5 figure: no ratio


def test_table_shows_both_sides_the_ratio_and_errors(bench):
    forward = bench.Figure("forward", "ms/img", "ms/img")
    rate = bench.Figure("loader", "img/s", "img/s", higher_is_better=True)
    row = bench.ComparisonRow("model/x", "", {}, (forward, rate))
    values = {"forward": {"ours": [6.0, 5.0, 7.0], "yolov5": [10.0, 8.0, 12.0]},
              "loader": {"ours": [300.0], "yolov5": [200.0]}}  # fmt: skip
    failed = bench.ComparedRow(bench.ComparisonRow("val/y", "", {}, (forward,)), {}, error="YOLOv5 exited with 1: boom")
    lines = bench.comparison_table([bench.ComparedRow(row, values), failed]).splitlines()
    assert lines[2] == "| model/x | forward (ms/img) | 6 [5-7] | 10 [8-12] | 0.60x (lower is better) |"
    assert lines[3] == "| model/x | loader (img/s) | 300 [300-300] | 200 [200-200] | 1.50x (higher is better) |"
    assert lines[4] == "| val/y | error: YOLOv5 exited with 1: boom | | | |"


# Each side appends its run name to a shared file and reports how many runs came before it and itself.
_SIDE = """
import json, sys
from pathlib import Path
order = Path(sys.argv[1])
runs = (order.read_text() if order.exists() else "").split() + [sys.argv[2]]
order.write_text(" ".join(runs))
print("progress\\rBENCHMARK-RESULT " + json.dumps({"n": len(runs)}))
sys.exit(int(sys.argv[3]))
"""


def _run(bench, tmp_path: Path, yolov5_exit: int):
    order = tmp_path / "order.txt"
    commands = {side: [sys.executable, "-c", _SIDE, str(order), "{run}", "0"] for side in bench.SIDES}
    commands["yolov5"][-1] = str(yolov5_exit)
    row = bench.ComparisonRow("t/x", "", commands, (bench.Figure("n", "runs", "n"), bench.WALL))
    env, cwd = {side: dict(os.environ) for side in bench.SIDES}, {side: tmp_path for side in bench.SIDES}
    compared = bench.run_comparison([row], env, cwd, tmp_path, warmup=1, repeats=2, timeout=60)
    return compared[0], order.read_text().split()


def test_processes_run_in_turn_and_only_timed_rounds_count(bench, tmp_path):
    compared, order = _run(bench, tmp_path, yolov5_exit=0)
    assert order == ["ours-0", "yolov5-0", "ours-1", "yolov5-1", "ours-2", "yolov5-2"]
    assert compared.error == ""
    assert compared.values["n"] == {"ours": [3.0, 5.0], "yolov5": [4.0, 6.0]}  # round 0 was the warm-up
    assert all(0 < wall < 60 for side in bench.SIDES for wall in compared.values["whole command"][side])
    assert bench.ratio_of_medians(compared.values["n"]["ours"], compared.values["n"]["yolov5"]) == pytest.approx(0.8)


def test_a_failing_side_ends_its_row_with_its_last_line(bench, tmp_path):
    compared, order = _run(bench, tmp_path, yolov5_exit=3)
    assert order == ["ours-0", "yolov5-0"]
    assert compared.error.startswith("YOLOv5 exited with 3: BENCHMARK-RESULT {")
    assert "(log: " in compared.error


def test_path_that_is_not_yolov5_gives_one_error_line(bench, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^--compare-yolov5 .*: no such folder"):
        bench.find_yolov5(tmp_path / "absent")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "yolo.py").touch()
    with pytest.raises(ConfigError, match=r"missing utils/dataloaders.py, train.py, val.py, detect.py\)$"):
        bench.find_yolov5(tmp_path)
    assert bench.main(["--compare-yolov5", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --compare-yolov5 {tmp_path}: not a YOLOv5 checkout or pip package folder")
    assert error.count("\n") == 1


def test_checkout_and_pip_package_are_told_apart(bench, tmp_path):
    for name in bench.YOLOV5_FILES:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    assert bench.find_yolov5(tmp_path) == bench.Yolov5Install(tmp_path.resolve(), is_package=False)
    (tmp_path / "__init__.py").touch()
    assert bench.find_yolov5(tmp_path).is_package


def test_environment_records_instruction_set_caps_only_when_set(bench, monkeypatch):
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    assert not {"onednn_max_cpu_isa", "dnnl_max_cpu_isa", "aten_cpu_capability"} & set(bench.environment(0))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    info = bench.environment(0)
    assert info["onednn_max_cpu_isa"] == "AVX2" and info["aten_cpu_capability"] == "avx2"
