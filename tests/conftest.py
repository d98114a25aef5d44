"""Shared test fixtures. Real data lives in ../shared beside the checkout; tests needing it skip visibly."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from _pytest.reports import TestReport

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DETECTOR_SHARED", REPO_ROOT.parent / "shared"))

# Two cores: at most two torch threads so DataLoader workers do not oversubscribe the CPU; one per pytest-xdist
# worker process (``pytest -n 2``, as CI runs), where the processes themselves share the cores.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _XDIST_WORKERS)))


# ``@pytest.mark.fresh_process``: the test runs in its own interpreter (``python -m pytest NODEID``), with its
# fixtures, and its outcome is reported here. For tests that compile models with OpenVINO's CPU plugin, which
# corrupts the heap of the process it runs in on some machines: on a 2-core AMD Zen 4 VM (OpenVINO 2025.4 to
# 2026.4) a bare ``Core().compile_model`` of a tiny model, alone in a fresh interpreter, ends in glibc's "free():
# invalid next size" (hwloc_bitmap_free, MALLOC_CHECK_=3) in about a quarter of runs, and a pytest worker that
# had run the OpenVINO tests crashed with SIGSEGV tests later, in unrelated code.
_IN_FRESH_PROCESS = "DETECTOR_TEST_IN_FRESH_PROCESS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fresh_process: run the test in its own interpreter (see tests/conftest.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if item.get_closest_marker("fresh_process") is None or os.environ.get(_IN_FRESH_PROCESS):
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "report.xml"
        command = [sys.executable, "-m", "pytest", item.nodeid, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        start = time.time()
        run = subprocess.run(
            command,
            cwd=item.config.rootpath,
            env={**os.environ, _IN_FRESH_PROCESS: "1"},
            capture_output=True,
            text=True,
        )
        stop = time.time()
        outcome, longrepr = _junit_outcome(junit, run, item)
    common = {"nodeid": item.nodeid, "location": item.location, "keywords": dict.fromkeys(item.keywords, 1)}
    reports = [
        TestReport(
            **common,
            outcome="skipped" if outcome == "skipped" else "passed",
            longrepr=longrepr if outcome == "skipped" else None,
            when="setup",
            start=start,
            stop=start,
        )
    ]
    if outcome != "skipped":
        reports.append(
            TestReport(
                **common, outcome=outcome, longrepr=longrepr, when="call", duration=stop - start, start=start, stop=stop
            )
        )
    # What pytest's teardown phase does besides this item's own fixtures (it had none here): tear down those of
    # earlier tests (module, class scope) that ``nextitem`` does not need.
    try:
        item.session._setupstate.teardown_exact(nextitem)
        reports.append(TestReport(**common, outcome="passed", longrepr=None, when="teardown", start=stop, stop=stop))
    except Exception as e:
        reports.append(TestReport(**common, outcome="failed", longrepr=repr(e), when="teardown", start=stop, stop=stop))
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _junit_outcome(junit: Path, run: subprocess.CompletedProcess, item: pytest.Item) -> tuple[str, object]:
    """("passed" | "failed" | "skipped", pytest's longrepr) of the one test in the child's JUnit XML report."""
    output = f"fresh process exited with {run.returncode}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    cases = ET.parse(junit).getroot().iter("testcase") if junit.is_file() else iter(())
    case = next(cases, None)
    if case is None:
        return "failed", output
    for child in case:
        if child.tag == "skipped":
            path, line, _ = item.location
            return "skipped", (str(path), (line or 0) + 1, child.get("message", "skipped"))
        if child.tag in ("failure", "error"):
            return "failed", f"{child.get('message', '')}\n{child.text or ''}\n{output}"
    return "passed", None


def _shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"real-data fixture {path} is absent (it ships in ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def coco128_dir() -> Path:
    """../shared/datasets/coco128: 128 COCO images, YOLO labels, coco128.yaml, annotations/instances_train2017.json."""
    return _shared_path("datasets/coco128")


@pytest.fixture(scope="session")
def yolov5n_weights() -> Path:
    """../shared/weights/yolov5n.pt: the official YOLOv5n release checkpoint (a pickled YOLOv5 module)."""
    return _shared_path("weights/yolov5n.pt")


@pytest.fixture(scope="session")
def shared_images() -> Path:
    """../shared/images with bus.jpg and zidane.jpg."""
    return _shared_path("images")


@pytest.fixture(scope="session")
def reference_detections() -> Path:
    """YOLOv5's own detect.py output for yolov5n.pt on ../shared/images (YOLO txt: cls x y w h conf)."""
    return _shared_path("reference/yolov5n_detect_labels")
