"""Benchmark harness: run registered benchmarks, report medians with min and max, and how to reproduce each row.

Usage::

    python scripts/benchmark.py --list                      # what is registered
    python scripts/benchmark.py                             # everything: Markdown table on stdout
    python scripts/benchmark.py --only data/builtin-generate --repeats 5 --warmup 1 --json out.json
    python scripts/benchmark.py --only 'data/*' --threads 2 # shell-style patterns over group/name

Adding an entry (in this file, below the harness): decorate a *set-up function* with ``@benchmark(group, name,
unit=...)``. It runs once, untimed, and returns the callable to measure; the harness calls that callable
``--warmup`` times, then ``--repeats`` times, and reports the median, min and max of the figures::

    @benchmark("model", "yolov5n-forward-320", unit="ms")
    def yolov5n_forward_320() -> Callable[[], object]:
        model = build_model("yolov5n.yaml").eval()          # set-up: not timed
        images = torch.zeros(1, 3, 320, 320)
        return lambda: model(images)                         # timed

What the timed callable returns decides the figure:

- anything that is not a number (e.g. None, a tensor): its wall time, in ``unit`` ("s", "ms" or "us"); with
  ``items=N`` the figure is a throughput instead, ``N / seconds`` (unit e.g. "img/s");
- a number: that number is the figure (for figures measured inside, e.g. mAP or an img/s the code reports);
- a ``dict[str, float]``: several figures, one row each, named ``name:key``; ``units={"key": "unit"}`` gives
  each its unit (default ``unit``).

Side by side with YOLOv5 (``--compare-yolov5 PATH``, PATH a YOLOv5 checkout or pip package folder, run with
``--yolov5-python EXE``, the interpreter of the scratch environment that has it): the rows of README.md's
performance table (training epoch, loader, PyTorch forward, val.py, detect.py, ONNX Runtime; ``--list`` names them,
``--compare-rows PATTERN`` picks some) run on the same inputs on both sides, each measurement in a fresh process
per side, alternating ours and YOLOv5's (A B A B ..., ``--warmup`` untimed rounds, then ``--repeats``). YOLOv5's
side is scripts/yolov5_side.py (YOLOv5's interpreter, never our package), ours scripts/detector_side.py or the entry
scripts. The table gives each side's median [min-max] and the ratio of medians, ours / YOLOv5::

    python scripts/benchmark.py --compare-yolov5 ../yolov5 --yolov5-python ../y5env/bin/python --repeats 3
    python scripts/benchmark.py --compare-yolov5 ../yolov5 --compare-rows 'model/*' val --repeats 5

Keep set-up functions free of work at import time (import torch and build models inside them): this module is
imported by nothing else but its test of the comparison logic (tests/unit/test_benchmark_compare.py), and pytest
never collects it (``testpaths = ["tests"]``). Timings on a shared machine are noisy: compare runs from one
session, and quote the command shown in each row.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TIME_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6}


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: ``setup()`` returns the callable to measure."""

    group: str
    name: str
    setup: Callable[[], Callable[[], Any]]
    unit: str = "ms"
    items: int | None = None  # with a time measurement: report items / seconds
    units: dict[str, str] = field(default_factory=dict)  # per-key units for dict results
    description: str = ""

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


@dataclass
class Row:
    """One reported figure: the median, min and max over the repeats, and the command that reproduces it."""

    group: str
    name: str
    unit: str
    values: list[float]
    command: str
    error: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        low, high = (min(self.values), max(self.values)) if self.values else (float("nan"), float("nan"))
        return {"group": self.group, "name": self.name, "unit": self.unit, "median": self.median, "min": low,
                "max": high, "values": self.values, "command": self.command, "error": self.error}  # fmt: skip


REGISTRY: dict[str, Benchmark] = {}


def benchmark(
    group: str, name: str, *, unit: str = "ms", items: int | None = None, units: dict[str, str] | None = None
) -> Callable[[Callable[[], Callable[[], Any]]], Callable[[], Callable[[], Any]]]:
    """Register a set-up function as benchmark ``group/name`` (see the module docstring)."""

    def register(setup: Callable[[], Callable[[], Any]]) -> Callable[[], Callable[[], Any]]:
        entry = Benchmark(group, name, setup, unit, items, dict(units or {}), (setup.__doc__ or "").strip())
        if entry.key in REGISTRY:
            raise ValueError(f"benchmark {entry.key!r} is registered twice")
        REGISTRY[entry.key] = entry
        return setup

    return register


# --------------------------------------------------------------------------------------------------------------------
# Running


def run_benchmark(entry: Benchmark, *, repeats: int, warmup: int, command: str) -> list[Row]:
    """Set up ``entry``, call it ``warmup`` times untimed, then ``repeats`` times; one Row per figure."""
    measure = entry.setup()
    for _ in range(warmup):
        measure()
    collected: dict[str, list[float]] = {}
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = measure()
        seconds = time.perf_counter() - start
        for key, value in _figures(entry, result, seconds).items():
            collected.setdefault(key, []).append(value)
    return [
        Row(
            entry.group, f"{entry.name}:{key}" if key else entry.name, entry.units.get(key, entry.unit), values, command
        )
        for key, values in collected.items()
    ]


def _figures(entry: Benchmark, result: Any, seconds: float) -> dict[str, float]:
    if isinstance(result, dict):
        return {str(k): float(v) for k, v in result.items()}
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return {"": float(result)}
    if entry.items is not None:
        return {"": entry.items / seconds}
    if entry.unit not in TIME_UNITS:
        raise ValueError(f"{entry.key}: unit {entry.unit!r} needs items=N or a callable that returns its figures")
    return {"": seconds * TIME_UNITS[entry.unit]}


def reproduce_command(key: str, repeats: int, warmup: int, threads: int) -> str:
    parts = ["python", "scripts/benchmark.py", "--only", key, "--repeats", str(repeats), "--warmup", str(warmup)]
    if threads:
        parts += ["--threads", str(threads)]
    return shlex.join(parts)


def select(patterns: Sequence[str] | None) -> list[Benchmark]:
    """Registered benchmarks whose ``group/name`` matches any pattern (all when none); unknown patterns raise."""
    if not patterns:
        return list(REGISTRY.values())
    chosen: dict[str, Benchmark] = {}
    for pattern in patterns:
        matches = [e for key, e in REGISTRY.items() if fnmatch.fnmatchcase(key, pattern) or e.group == pattern]
        if not matches:
            raise SystemExit(f"error: no benchmark matches {pattern!r}; registered: {', '.join(REGISTRY)}")
        chosen.update((e.key, e) for e in matches)
    return list(chosen.values())


def environment(threads: int) -> dict[str, Any]:
    """Where the figures were taken: versions, threads, CPU and load (timings are only comparable within one)."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    # instruction-set caps (an AVX2-only CPU emulated on a newer one, say: README, Speed and memory) change every figure
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        if os.environ.get(name):
            info[name.lower()] = os.environ[name]
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), requested_threads=threads or None)
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| group | name | median | min | max | unit | command |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.group} | {row.name} | error: {row.error} | | | | `{row.command}` |")
            continue
        figures = " | ".join(_fmt(v) for v in (row.median, min(row.values), max(row.values)))
        lines.append(f"| {row.group} | {row.name} | {figures} | {row.unit} | `{row.command}` |")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


# --------------------------------------------------------------------------------------------------------------------
# Side by side with YOLOv5 (--compare-yolov5 PATH): every measurement is a fresh process, ours and YOLOv5's in turn
# (A B A B ...), so both sides pay the same start-up costs and share the machine's drifts alike. YOLOv5 runs from
# its own interpreter (--yolov5-python) through scripts/yolov5_side.py; ours through scripts/detector_side.py or
# the entry scripts themselves. Neither side imports the other.

SIDES = ("ours", "yolov5")
SIDE_LABELS = {"ours": "ours", "yolov5": "YOLOv5"}
SIDE_RESULT = re.compile(r"BENCHMARK-RESULT (\{.*\})")  # the line the side scripts print
COMPARE_TRAIN_IMAGES, COMPARE_VAL_IMAGES = 800, 200  # the built-in generator's shapes, like REFERENCE.md's set
COMPARE_DETECT_IMAGES = 20
YOLOV5_FILES = ("models/yolo.py", "utils/dataloaders.py", "train.py", "val.py", "detect.py")


@dataclass(frozen=True)
class Yolov5Install:
    """A YOLOv5 checkout, or the folder of an installed pip ``yolov5`` package (``is_package``)."""

    root: Path
    is_package: bool


def find_yolov5(path: str | Path) -> Yolov5Install:
    """``path`` as a YOLOv5 install; a one-line ConfigError naming --compare-yolov5 when it is not one."""
    from detector.errors import ConfigError

    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--compare-yolov5 {path}: no such folder (a YOLOv5 checkout or pip package folder)")
    missing = [name for name in YOLOV5_FILES if not (root / name).is_file()]
    if missing:
        raise ConfigError(
            f"--compare-yolov5 {path}: not a YOLOv5 checkout or pip package folder (missing {', '.join(missing)})"
        )
    return Yolov5Install(root.resolve(), (root / "__init__.py").is_file())


@dataclass(frozen=True)
class Figure:
    """One reported figure of a comparison row, read from the side's result line or measured from outside."""

    name: str
    unit: str
    source: str  # a key of the BENCHMARK-RESULT line, or "wall", "cpu", "peak_rss" (the process, from outside)
    higher_is_better: bool = False


WALL = Figure("whole command", "s", "wall")
CPU = Figure("CPU time (all processes)", "s", "cpu")
PEAK_RSS = Figure("peak RSS (largest process)", "MiB", "peak_rss")


@dataclass(frozen=True)
class ComparisonRow:
    """One hot path measured on both sides: each side's command line (``{run}`` becomes a run's unique name)."""

    key: str  # group/name, matched by --compare-rows
    description: str
    commands: dict[str, list[str]]  # side -> argv, interpreter first
    figures: tuple[Figure, ...]


@dataclass(frozen=True)
class CompareSetup:
    """Everything both sides share: interpreters, inputs (made by prepare_inputs) and the scratch folder."""

    yolov5: Yolov5Install
    yolov5_python: str
    scratch: Path
    dataset: Path  # the built-in generator's 800 train / 200 val images
    weights: Path  # a YOLOv5 release .pt (80 classes); both sides load it
    threads: int = 0
    ours_python: str = sys.executable

    @property
    def data_yaml(self) -> Path:  # the data set's 8 class names, absolute path (YOLOv5 resolves relative ones)
        return self.scratch / "shapes-800-200.yaml"

    @property
    def data_yaml_80(self) -> Path:  # the same images under 80 names, to validate the 80-class weights
        return self.scratch / "shapes-800-200-80names.yaml"

    @property
    def detect_images(self) -> Path:
        return self.scratch / "detect-images"

    def side_command(self, side: str, *args: str) -> list[str]:
        """The side script of ``side`` with ``args``, run by that side's interpreter."""
        if side == "ours":
            return [self.ours_python, str(REPO_ROOT / "scripts" / "detector_side.py"), *args]
        return [
            self.yolov5_python,
            str(REPO_ROOT / "scripts" / "yolov5_side.py"),
            "--yolov5",
            str(self.yolov5.root),
            *args,
        ]

    def entry_command(self, side: str, script: str, *flags: str) -> list[str]:
        """``python {script}.py FLAGS``: our entry script, or YOLOv5's run as its command line runs it."""
        if side == "ours":
            return [self.ours_python, str(REPO_ROOT / f"{script}.py"), *flags]
        return self.side_command(side, "script", script, "--", *flags)


def _jpeg_decoder(python: str) -> str:
    """How our side's training loader decodes JPEGs (the ``fast-jpeg`` extra decodes only what a mosaic shows)."""
    probe = "from detector.data import turbojpeg; d = turbojpeg.decoder(); print(d.path if d else '')"
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60).stdout.strip()
    if found:
        return f"JPEG regions decoded by {found}"
    return "whole JPEGs decoded by OpenCV (no libturbojpeg 3, or $DETECTOR_TURBOJPEG=off; see the fast-jpeg extra)"


def comparison_rows(setup: CompareSetup) -> list[ComparisonRow]:
    """The rows of the README's performance table, in its order (the same inputs and flags on both sides)."""
    runs, weights = setup.scratch / "runs", ["--weights", str(setup.weights)]
    threads = ["--threads", str(setup.threads)] if setup.threads else []

    def side_tasks(task: str, *flags: str, out: str) -> dict[str, list[str]]:
        """The side scripts' ``task`` with ``flags``; ``out``: a folder name (per side) for its files."""
        return {side: setup.side_command(side, task, *flags, f"{runs / f'{side}-{out}'}") for side in SIDES}

    def entry_commands(script: str, *flags: str) -> dict[str, list[str]]:
        return {
            side: setup.entry_command(side, script, *flags, "--project", str(runs / f"{side}-{script}"))
            for side in SIDES
        }

    train_flags = (
        *("--data", str(setup.data_yaml), "--cfg", "yolov5n.yaml", "--weights", "", "--img", "320"),
        *("--batch-size", "16", "--workers", "2", "--epochs", "1", "--noval", "--noplots", "--noautoanchor"),
        *("--device", "cpu", "--name", "{run}", "--exist-ok", "--project"),
    )
    rows = [
        ComparisonRow(
            "train/epoch-yolov5n-320-b16-w2",
            "train.py, one epoch of the 800 images from scratch (yolov5n.yaml), --img 320, batch 16, 2 workers, "
            "--noval: its training part (first step's start to last step's end) and the whole command",
            side_tasks("train", "--", *train_flags, out="train"),
            (Figure("training part", "s", "train_s"), Figure("training", "img/s", "img/s", True), WALL, CPU, PEAK_RSS),
        )
    ]
    for imgsz in (320, 640):
        for workers in (0, 2):
            images = str(setup.dataset / "images" / "train")
            flags = ("--images", images, "--img", str(imgsz), "--workers", str(workers), "--batches", "20")
            commands = {
                "ours": setup.side_command("ours", "loader", *flags, "--classes", "8"),
                "yolov5": setup.side_command("yolov5", "loader", *flags),
            }
            description = f"training loader (mosaic, hyp.scratch-low), batch 16, --img {imgsz}, {workers} workers"
            loader = Figure("loader", "img/s", "img/s", higher_is_better=True)
            rows.append(ComparisonRow(f"data/loader-mosaic-{imgsz}-w{workers}", description, commands, (loader,)))
    for name, source, imgsz, batch, iters in (
        ("yolov5n-b1-640", weights, 640, 1, 20),
        ("yolov5n-b1-320", weights, 320, 1, 40),
        ("yolov5s-b1-640", ["--cfg", "yolov5s.yaml"], 640, 1, 10),
        ("yolov5n-b8-320", weights, 320, 8, 8),
    ):
        flags = (*source, "--img", str(imgsz), "--batch", str(batch), "--iters", str(iters), *threads, "--out")
        description = (
            f"PyTorch forward, fused fp32, batch {batch} at {imgsz}: our load_backend vs YOLOv5's "
            f"DetectMultiBackend, median of {iters} calls per process"
        )
        forward = Figure("forward", "ms/img", "ms/img")
        rows.append(
            ComparisonRow(f"model/forward-{name}", description, side_tasks("forward", *flags, out="model"), (forward,))
        )
    val_flags = (
        *("--data", str(setup.data_yaml_80), *weights, "--img", "320", "--conf-thres", "0.001", "--iou-thres"),
        *("0.6", "--batch-size", "32", "--workers", "2", "--device", "cpu", "--name", "{run}"),
    )
    rows.append(
        ComparisonRow(
            "val/val.py-200-320",
            "val.py on the 200 val images at 320, conf 0.001, batch 32, 2 workers, same weights: the whole command",
            entry_commands("val", *val_flags),
            (WALL, CPU, PEAK_RSS),
        )
    )
    detect_flags = (
        *("--source", str(setup.detect_images), *weights, "--img", "320", "--conf-thres", "0.25", "--iou-thres"),
        *("0.45", "--device", "cpu", "--name", "{run}"),
    )
    rows.append(
        ComparisonRow(
            f"detect/detect.py-{COMPARE_DETECT_IMAGES}-320",
            f"detect.py on {COMPARE_DETECT_IMAGES} images at 320 (annotated images saved): the whole command",
            entry_commands("detect", *detect_flags),
            (WALL, CPU),
        )
    )
    onnx_flags = (*weights, "--img", "320", "--iters", "50", "--warmup-iters", "10", *threads, "--out")
    rows.append(
        ComparisonRow(
            "export/onnxruntime-yolov5n-320-b1",
            "ONNX Runtime (CPU) batch 1 at 320 on each side's own export.py file of the same weights, median of 50",
            side_tasks("onnx", *onnx_flags, out="onnx"),
            (Figure("ONNX Runtime", "ms", "ms"),),
        )
    )
    return rows


def select_comparison_rows(rows: Sequence[ComparisonRow], patterns: Sequence[str] | None) -> list[ComparisonRow]:
    """Rows whose key matches any shell pattern (or equals its group); all without patterns. Unknown ones raise."""
    from detector.errors import ConfigError

    if not patterns:
        return list(rows)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(row.key, pattern) or row.key.split("/")[0] == pattern for row in rows):
            keys = ", ".join(row.key for row in rows)
            raise ConfigError(f"--compare-rows {pattern!r}: matches no row; rows: {keys}")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.key, p) or r.key.split("/")[0] == p for p in patterns)]


def interleaved_schedule(warmup: int, repeats: int, sides: Sequence[str] = SIDES) -> list[tuple[int, str, bool]]:
    """The run order ``(round, side, timed)``: every round runs each side once, always in the same order
    (A B A B ...); the first ``warmup`` rounds are not timed."""
    return [(round_index, side, round_index >= warmup) for round_index in range(warmup + repeats) for side in sides]


@dataclass(frozen=True)
class Spread:
    """Median, min and max of one side's figures."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"))
        return cls(statistics.median(values), min(values), max(values))

    def __str__(self) -> str:
        return f"{_fmt(self.median)} [{_fmt(self.low)}-{_fmt(self.high)}]"


def ratio_of_medians(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """ours' median / YOLOv5's median (NaN when either is missing or YOLOv5's is 0)."""
    ours_median, theirs_median = Spread.of(ours).median, Spread.of(theirs).median
    if theirs_median != theirs_median or ours_median != ours_median or theirs_median == 0:
        return float("nan")
    return ours_median / theirs_median


@dataclass
class Measurement:
    """One side's process: wall and CPU seconds and peak RSS from outside, figures from its result line."""

    wall: float
    cpu: float
    peak_rss: float  # MiB, the largest single process of the tree (ru_maxrss of the child and its waited children)
    result: dict[str, float]
    returncode: int
    log: Path

    def figure(self, source: str) -> float:
        if source in ("wall", "cpu", "peak_rss"):
            return getattr(self, source)
        if source not in self.result:
            raise KeyError(f"printed no {source!r} in its BENCHMARK-RESULT line (got {sorted(self.result)})")
        return float(self.result[source])


def measure_process(argv: Sequence[str], *, env: dict[str, str], cwd: Path, log: Path, timeout: float) -> Measurement:
    """Run ``argv`` to its end with its output in ``log``; killed with its process group after ``timeout`` s."""
    import signal
    import subprocess
    import threading

    with open(log, "w") as output:
        started = time.perf_counter()
        process = subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
        )
        timer = threading.Timer(timeout, os.killpg, (process.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)  # rusage of this child (and its waited-for children)
        except BaseException:  # Ctrl-C: the child runs in its own session and would not see it
            os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped above: tell Popen
    matches = SIDE_RESULT.findall(log.read_text(errors="replace"))
    result = json.loads(matches[-1]) if matches else {}
    return Measurement(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, result, process.returncode, log)


@dataclass
class ComparedRow:
    """A row's figures on both sides (timed rounds only), or the error that stopped it."""

    row: ComparisonRow
    values: dict[str, dict[str, list[float]]]  # figure name -> side -> values
    error: str = ""


def run_comparison(
    rows: Sequence[ComparisonRow],
    env: dict[str, dict[str, str]],
    cwd: dict[str, Path],
    scratch: Path,
    *,
    warmup: int,
    repeats: int,
    timeout: float,
) -> list[ComparedRow]:
    """Each row in turn, its processes in :func:`interleaved_schedule` order; a failing process ends its row."""
    compared = []
    (scratch / "logs").mkdir(parents=True, exist_ok=True)
    for number, row in enumerate(rows, 1):
        result = ComparedRow(row, {f.name: {side: [] for side in SIDES} for f in row.figures})
        for round_index, side, timed in interleaved_schedule(warmup, repeats):
            run = f"{side}-{round_index}"
            argv = [arg.replace("{run}", run) for arg in row.commands[side]]
            log = scratch / "logs" / f"{row.key.replace('/', '-')}-{run}.log"
            measurement = measure_process(argv, env=env[side], cwd=cwd[side], log=log, timeout=timeout)
            try:
                if measurement.returncode != 0:
                    killed = " (killed after --compare-timeout)" if measurement.returncode == -9 else ""
                    raise ValueError(f"exited with {measurement.returncode}{killed}: {_last_line(log)}")
                figures = {f.name: measurement.figure(f.source) for f in row.figures}
            except (KeyError, ValueError) as e:
                result.error = f"{SIDE_LABELS[side]} {e.args[0]} (log: {log})"
                break
            shown = ", ".join(f"{f.name} {_fmt(figures[f.name])} {f.unit}" for f in row.figures)
            what = "" if timed else " (warm-up)"
            print(
                f"[{number}/{len(rows)}] {row.key} {SIDE_LABELS[side]} round {round_index}{what}: {shown}",
                file=sys.stderr,
                flush=True,
            )
            if timed:
                for name, value in figures.items():
                    result.values[name][side].append(value)
        compared.append(result)
    return compared


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()]
    return next((line for line in reversed(lines) if line), "(no output)")


def comparison_table(compared: Sequence[ComparedRow]) -> str:
    """Markdown: per row and figure, each side's median [min-max] and the ratio of medians (ours / YOLOv5)."""
    lines = [
        "| row | figure | ours: median [min-max] | YOLOv5: median [min-max] | ours / YOLOv5 |",
        "|---|---|---|---|---|",
    ]
    for item in compared:
        if item.error:
            lines.append(f"| {item.row.key} | error: {item.error} | | | |")
            continue
        for figure in item.row.figures:
            ours, theirs = item.values[figure.name]["ours"], item.values[figure.name]["yolov5"]
            better = "higher is better" if figure.higher_is_better else "lower is better"
            lines.append(
                f"| {item.row.key} | {figure.name} ({figure.unit}) | {Spread.of(ours)} | "
                f"{Spread.of(theirs)} | {ratio_of_medians(ours, theirs):.2f}x ({better}) |"
            )
    return "\n".join(lines)


def yolov5_environment(scratch: Path) -> dict[str, str]:
    """YOLOv5's processes offline: its font where its checks look, no pip auto-install; torch may unpickle its
    release checkpoints (YOLOv5's torch.load predates weights_only=True, torch's default since 2.6)."""
    config = scratch / "yolov5-config"
    config.mkdir(parents=True, exist_ok=True)
    font = _a_truetype_font()
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if font is not None and not (config / name).exists():
            shutil.copyfile(font, config / name)
    return {
        **os.environ,
        "YOLOV5_CONFIG_DIR": str(config),
        "YOLO_CONFIG_DIR": str(config),
        "YOLO_OFFLINE": "1",
        "YOLOv5_AUTOINSTALL": "false",
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
    }


def _a_truetype_font() -> Path | None:
    """A TrueType font that is surely there: matplotlib's DejaVu Sans (a dependency), else a system one."""
    try:
        import matplotlib

        candidates = [Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"]
    except ImportError:
        candidates = []
    candidates += sorted(Path("/usr/share/fonts").glob("**/*.ttf"))
    return next((path for path in candidates if path.is_file()), None)


def prepare_inputs(setup: CompareSetup, env: dict[str, dict[str, str]], timeout: float) -> None:
    """The data set (generated once into the cache), the YAMLs both sides read, the detect images, and each
    side's label caches (built now, so no timed run scans)."""
    from detector.data.builtin import BUILTIN_CLASSES, ensure_builtin_dataset

    ensure_builtin_dataset(setup.dataset, num_train=COMPARE_TRAIN_IMAGES, num_val=COMPARE_VAL_IMAGES)
    names = list(BUILTIN_CLASSES)
    for path, listed in ((setup.data_yaml, names), (setup.data_yaml_80, names + [f"class{i}" for i in range(8, 80)])):
        text = json.dumps({"path": str(setup.dataset), "train": "images/train", "val": "images/val", "names": listed})
        path.write_text(text + "\n")  # JSON is YAML
    setup.detect_images.mkdir(exist_ok=True)
    for image in sorted((setup.dataset / "images" / "val").glob("*.jpg"))[:COMPARE_DETECT_IMAGES]:
        shutil.copyfile(image, setup.detect_images / image.name)
    folders = [str(setup.dataset / "images" / split) for split in ("train", "val")]
    cwd = {"ours": REPO_ROOT, "yolov5": setup.scratch}
    for side in SIDES:
        extra = ["--classes", str(len(names))] if side == "ours" else []
        log = setup.scratch / f"prepare-{side}.log"
        argv = setup.side_command(side, "cache", "--images", *folders, *extra)
        if measure_process(argv, env=env[side], cwd=cwd[side], log=log, timeout=timeout).returncode != 0:
            from detector.errors import ConfigError

            python = "--yolov5-python" if side == "yolov5" else "our interpreter"
            raise ConfigError(f"{python}: building the label caches failed: {_last_line(log)} (log: {log})")


def compare_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a comparison (the README quotes it)."""
    parts = ["python", "scripts/benchmark.py", "--compare-yolov5", str(args.compare_yolov5)]
    if args.yolov5_python != sys.executable:
        parts += ["--yolov5-python", args.yolov5_python]
    if args.compare_weights != _shared_folder() / "weights" / "yolov5n.pt":
        parts += ["--compare-weights", str(args.compare_weights)]
    if args.compare_rows:
        parts += ["--compare-rows", *args.compare_rows]
    parts += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def _compare_setup(args: argparse.Namespace, scratch: Path) -> CompareSetup:
    from detector.data.builtin import builtin_dataset_dir

    yolov5 = find_yolov5(args.compare_yolov5)
    dataset = builtin_dataset_dir(COMPARE_TRAIN_IMAGES, COMPARE_VAL_IMAGES)
    return CompareSetup(yolov5, args.yolov5_python, scratch, dataset, args.compare_weights, args.threads)


def list_comparison_rows(args: argparse.Namespace) -> int:
    rows = select_comparison_rows(comparison_rows(_compare_setup(args, Path("SCRATCH"))), args.compare_rows)
    for row in rows:
        print(f"{row.key:40s} {row.description}")
    return 0


def compare_main(args: argparse.Namespace) -> int:
    """--compare-yolov5: check the flags, prepare the inputs, run the selected rows interleaved, print the table."""
    from detector.errors import ConfigError

    setup = _compare_setup(args, Path("SCRATCH"))
    rows = select_comparison_rows(comparison_rows(setup), args.compare_rows)  # a bad pattern fails here, early
    if shutil.which(args.yolov5_python) is None:
        raise ConfigError(f"--yolov5-python {args.yolov5_python}: not an executable")
    if not args.compare_weights.is_file():
        raise ConfigError(f"--compare-weights {args.compare_weights}: not found (a YOLOv5 .pt, e.g. yolov5n.pt)")
    scratch = Path(tempfile.mkdtemp(prefix="compare-yolov5-"))
    setup = _compare_setup(args, scratch)
    keys = {row.key for row in rows}
    rows = [row for row in comparison_rows(setup) if row.key in keys]
    env = {"ours": dict(os.environ), "yolov5": yolov5_environment(scratch)}
    started, load_before = time.perf_counter(), _load_average()
    print(f"preparing inputs in {scratch} ...", file=sys.stderr, flush=True)
    prepare_inputs(setup, env, args.compare_timeout)
    cwd = {"ours": REPO_ROOT, "yolov5": scratch}
    compared = run_comparison(
        rows, env, cwd, scratch, warmup=args.warmup, repeats=args.repeats, timeout=args.compare_timeout
    )
    minutes = (time.perf_counter() - started) / 60
    kind = "pip package" if setup.yolov5.is_package else "checkout"
    print(f"Command: `{compare_command(args)}`\n")
    print(comparison_table(compared))
    print(
        f"\n{_cpu_name()}, {os.cpu_count()} CPUs; load average {load_before} before, {_load_average()} after; "
        f"{minutes:.1f} min in all. YOLOv5: {setup.yolov5.root} ({kind}). Ours: {_jpeg_decoder(setup.ours_python)}."
    )
    if args.json:
        payload = {
            "environment": environment(args.threads),
            "command": compare_command(args),
            "minutes": minutes,
            "rows": [
                {"key": item.row.key, "description": item.row.description, "error": item.error, "figures": item.values}
                for item in compared
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    failed = any(item.error for item in compared)
    if failed:
        print(f"logs kept in {scratch / 'logs'}", file=sys.stderr)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


def _load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="GROUP/NAME", help="benchmarks to run (shell patterns allowed)")
    parser.add_argument("--repeats", type=int, help="timed calls per benchmark (default 5; comparison rounds: 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls before the timed ones (default 1; comparison: 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results and environment as JSON")
    parser.add_argument("--list", action="store_true", help="list the benchmarks (or comparison rows) and exit")
    compare = parser.add_argument_group("side by side with YOLOv5: a fresh process per side and round, A B A B ...")
    add = compare.add_argument
    add("--compare-yolov5", metavar="PATH", help="a YOLOv5 checkout or pip package folder: run the comparison rows")
    add("--yolov5-python", metavar="EXE", default=sys.executable, help="YOLOv5's interpreter (default: this one)")
    add("--compare-rows", nargs="+", metavar="PATTERN", help="rows to compare (shell patterns or groups; default all)")
    add("--compare-weights", type=Path, metavar="PT", default=_shared_folder() / "weights" / "yolov5n.pt",
        help="a YOLOv5 .pt that both sides load (default ../shared/weights/yolov5n.pt)")  # fmt: skip
    add("--compare-timeout", type=float, default=1800, metavar="S", help="kill a side's process after S seconds")
    args = parser.parse_args(argv)
    comparing = args.compare_yolov5 is not None
    args.repeats = args.repeats if args.repeats is not None else (3 if comparing else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if comparing else 1)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if comparing:
        from detector.errors import DetectorError

        try:
            return list_comparison_rows(args) if args.list else compare_main(args)
        except DetectorError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.list:
        for entry in REGISTRY.values():
            print(f"{entry.key:40s} [{entry.unit}] {entry.description.splitlines()[0] if entry.description else ''}")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    for entry in select(args.only):
        command = reproduce_command(entry.key, args.repeats, args.warmup, args.threads)
        print(f"running {entry.key} ...", file=sys.stderr, flush=True)
        try:
            rows += run_benchmark(entry, repeats=args.repeats, warmup=args.warmup, command=command)
        except Exception as e:  # one broken benchmark must not hide the others' figures; it is reported below
            rows.append(Row(entry.group, entry.name, entry.unit, [], command, error=f"{type(e).__name__}: {e}"))
    print(markdown_table(rows))
    if args.json:
        payload = {"environment": environment(args.threads), "results": [row.to_dict() for row in rows]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if any(row.error for row in rows) else 0


# --------------------------------------------------------------------------------------------------------------------
# Benchmarks. Group names in use: data, model, train, val, detect, export. Keep each set-up function small.


@benchmark("data", "builtin-generate", unit="img/s", items=40)
def builtin_generate() -> Callable[[], Any]:
    """Built-in dataset generation throughput: 40 images rendered, JPEG-encoded and written (default threads)."""
    from detector.data.builtin import generate_builtin_dataset

    scratch = tempfile.TemporaryDirectory(prefix="bench-builtin-")  # removed when the closure is dropped
    calls = iter(range(1_000_000))

    def generate() -> None:
        out = Path(scratch.name) / str(next(calls))
        generate_builtin_dataset(out, num_train=32, num_val=8, progress=False)

    return generate


@benchmark("data", "dataset-yaml-load", unit="ms")
def dataset_yaml_load() -> Callable[[], Any]:
    """Parse and validate data/coco.yaml (80 names, 3 download entries) without touching the dataset paths."""
    from detector.data.dataset_config import load_dataset_config

    path = REPO_ROOT / "data" / "coco.yaml"
    return lambda: load_dataset_config(path, check_paths=False)


# -- detect: per-image latency of the whole detect pipeline (letterbox + inference + NMS), one model load ---------


def _detect_setup(weights_format: str, imgsz: int = 640) -> Callable[[], dict[str, float]]:
    """A Predictor for yolov5n in ``weights_format`` ("pt", "onnx", "openvino") and a call on bus.jpg.

    Uses ../shared/weights/yolov5n.pt and ../shared/images/bus.jpg when present (DETECTOR_SHARED overrides the
    folder), else a randomly initialised yolov5n and a random 1080x810 image (latency only, no real detections).
    """
    import cv2
    import numpy as np

    from detector.engine.predictor import Predictor

    shared = Path(os.environ.get("DETECTOR_SHARED", REPO_ROOT.parent / "shared"))
    weights = shared / "weights" / "yolov5n.pt"
    image = cv2.imread(str(shared / "images" / "bus.jpg"))
    scratch = tempfile.TemporaryDirectory(prefix="bench-detect-")
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (1080, 810, 3), dtype=np.uint8)
    if not weights.is_file():
        weights = _random_yolov5n_checkpoint(Path(scratch.name))
    if weights_format != "pt":
        from detector import export

        weights = export(weights, include=(weights_format,), imgsz=imgsz, project=scratch.name)[weights_format]
    predictor = Predictor(weights, device="cpu", imgsz=imgsz)

    def detect_once() -> dict[str, float]:
        cpu_start = time.process_time()
        speed = predictor.predict_images([image])[0].speed
        cpu_ms = (time.process_time() - cpu_start) * 1e3
        _ = scratch  # keep the exported files alive as long as the benchmark runs
        # cpu: this process's CPU time for the call, all threads; steadier than wall time on a busy machine
        return {"total": sum(speed.values()), **speed, "cpu": cpu_ms}

    return detect_once


def _random_yolov5n_checkpoint(folder: Path) -> Path:
    from detector.models.loading import checkpoint_model_entries
    from detector.models.yolo import DetectionModel
    from detector.utils.checkpoint import save_checkpoint

    path = folder / "yolov5n-random.pt"
    save_checkpoint(checkpoint_model_entries(DetectionModel("yolov5n.yaml")), path)
    return path


_DETECT_UNITS = {"total": "ms", "preprocess": "ms", "inference": "ms", "nms": "ms", "cpu": "ms"}


@benchmark("detect", "yolov5n-pt-640", unit="ms", units=_DETECT_UNITS)
def detect_pt_640() -> Callable[[], Any]:
    """detect.py's path for yolov5n.pt on bus.jpg at --img 640 (640x480 input): pre-process, inference, NMS."""
    return _detect_setup("pt")


@benchmark("detect", "yolov5n-onnx-640", unit="ms", units=_DETECT_UNITS)
def detect_onnx_640() -> Callable[[], Any]:
    """Same through ONNX Runtime (CPU), the model exported by export.py at 640x640 (static: input padded to 640)."""
    return _detect_setup("onnx")


@benchmark("detect", "yolov5n-openvino-640", unit="ms", units=_DETECT_UNITS)
def detect_openvino_640() -> Callable[[], Any]:
    """Same through OpenVINO (CPU, f32), exported by export.py at 640x640."""
    return _detect_setup("openvino")


# -- data: loader throughput with mosaic on, as REFERENCE.md measures YOLOv5 (800 JPEGs of 320-640 px) -------------

_LOADER_BATCHES = 10  # batches of 16 per timed call
_LOADER_DATA: list[Path] = []  # the benchmark images, made once per process


def _loader_benchmark_images() -> Path:
    """800 JPEGs of 320-640 px (long side) with YOLO labels in a temporary folder, made once per process.

    Made from ../shared/datasets/coco128 when present (real photos and boxes, classes folded to 14 as in the
    reference data set), else from random shapes; the scan cache is written in the temporary folder.
    """
    if _LOADER_DATA:
        return _LOADER_DATA[0]
    import atexit
    import shutil

    import cv2
    import numpy as np

    folder = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    rng = np.random.default_rng(0)
    shared = Path(os.environ.get("DETECTOR_SHARED", REPO_ROOT.parent / "shared")) / "datasets" / "coco128"
    photos = sorted((shared / "images" / "train2017").glob("*.jpg"))
    for index in range(800):
        long_side = int(rng.integers(320, 641))
        if photos:
            photo = photos[index % len(photos)]
            image = cv2.imread(str(photo))
            label = shared / "labels" / "train2017" / f"{photo.stem}.txt"
            rows = [line.split() for line in label.read_text().splitlines()] if label.is_file() else []
            text = "".join(f"{int(r[0]) % 14} {' '.join(r[1:5])}\n" for r in rows if len(r) == 5)
        else:
            image = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (9, 9), 0)
            boxes = rng.uniform(0.1, 0.9, (7, 2))
            text = "".join(f"{i % 14} {x:.4f} {y:.4f} 0.1 0.1\n" for i, (x, y) in enumerate(boxes))
        ratio = long_side / max(image.shape[:2])
        size = (round(image.shape[1] * ratio), round(image.shape[0] * ratio))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / "images" / f"{index:04d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (folder / "labels" / f"{index:04d}.txt").write_text(text)
    _LOADER_DATA.append(folder / "images")
    return folder / "images"


def _loader_setup(imgsz: int, workers: int) -> Callable[[], None]:
    """Training loader (hyp.scratch-low: mosaic 1.0, HSV, flips, translate/scale), batch 16, shuffled."""
    from detector.config import load_hyp
    from detector.data.loader import create_dataloader

    loader, _ = create_dataloader(
        _loader_benchmark_images(),
        imgsz=imgsz,
        batch_size=16,
        hyp=load_hyp("hyp.scratch-low.yaml"),
        augment=True,
        shuffle=True,
        workers=workers,
        num_classes=14,
    )
    state = {"iterator": iter(loader)}

    def next_batches() -> None:
        for _ in range(_LOADER_BATCHES):
            try:
                next(state["iterator"])
            except StopIteration:  # a new epoch: the persistent workers carry on
                state["iterator"] = iter(loader)
                next(state["iterator"])

    return next_batches


@benchmark("data", "loader-mosaic-320-w0", unit="img/s", items=16 * _LOADER_BATCHES)
def loader_320_w0() -> Callable[[], Any]:
    """Training batches/s x 16 at --img 320 in the main process (workers 0); YOLOv5: 143 img/s (REFERENCE.md)."""
    return _loader_setup(320, 0)


@benchmark("data", "loader-mosaic-320-w2", unit="img/s", items=16 * _LOADER_BATCHES)
def loader_320_w2() -> Callable[[], Any]:
    """Same with 2 workers; YOLOv5: 283 img/s."""
    return _loader_setup(320, 2)


@benchmark("data", "loader-mosaic-640-w0", unit="img/s", items=16 * _LOADER_BATCHES)
def loader_640_w0() -> Callable[[], Any]:
    """Same at --img 640, workers 0; YOLOv5: 87 img/s."""
    return _loader_setup(640, 0)


@benchmark("data", "loader-mosaic-640-w2", unit="img/s", items=16 * _LOADER_BATCHES)
def loader_640_w2() -> Callable[[], Any]:
    """Same at --img 640, 2 workers; YOLOv5: 152 img/s."""
    return _loader_setup(640, 2)


# -- model: forward latency of the fused PyTorch model (fp32, eval, torch.inference_mode), NCHW vs channels_last ---

_MODEL_LATENCY_CASES = ((1, 320), (1, 640), (8, 320))  # (batch, image size) as REFERENCE.md reports them


def _model_forward_setup(cfg: str, batch: int, imgsz: int, channels_last: bool) -> Callable[[], Any]:
    """A fused, eval-mode model (random weights: latency does not depend on them) and one timed forward pass.

    Reports milliseconds per image (batch-8 rows compare with REFERENCE.md's ms/img): ``wall`` time, and ``cpu``,
    the process CPU time summed over threads (with 2 threads ideally 2x wall; steadier on a shared machine).
    """
    import torch

    from detector.models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(cfg).fuse().eval()
    images = torch.rand(batch, 3, imgsz, imgsz)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def forward() -> dict[str, float]:
        with torch.inference_mode():
            start, start_cpu = time.perf_counter(), time.process_time()
            model(images)
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        return {"wall": wall * 1e3 / batch, "cpu": cpu * 1e3 / batch}

    return forward


def _register_model_latency_benchmarks() -> None:
    for cfg in ("yolov5n", "yolov5s"):
        for batch, imgsz in _MODEL_LATENCY_CASES:
            for channels_last in (False, True):

                def setup(cfg=cfg, batch=batch, imgsz=imgsz, channels_last=channels_last) -> Callable[[], Any]:
                    return _model_forward_setup(f"{cfg}.yaml", batch, imgsz, channels_last)

                layout = "channels_last" if channels_last else "NCHW"
                setup.__doc__ = f"{cfg} fused fp32 forward, batch {batch} at {imgsz}x{imgsz}, {layout}: ms per image"
                name = f"{cfg}-forward-b{batch}-{imgsz}" + ("-channels-last" if channels_last else "")
                benchmark("model", name, unit="ms/img", units={"wall": "ms/img", "cpu": "ms/img"})(setup)


_register_model_latency_benchmarks()


# -- train components: loss, optimizer step, EMA update, AutoAnchor evolution (detector.models.loss etc.) ----------


def _loss_setup(imgsz: int, batch_size: int = 16, num_targets: int = 120) -> Callable[[], Any]:
    """DetectionLoss forward + backward on random yolov5n-shaped raw maps (80 classes) with random targets."""
    import torch

    from detector.config import Hyperparameters
    from detector.models.loss import DetectionLoss
    from detector.models.yolo import DetectionModel

    head = DetectionModel("yolov5n.yaml").detect
    generator = torch.Generator().manual_seed(0)
    shapes = [(batch_size, head.na, imgsz // int(s), imgsz // int(s), head.no) for s in head.stride]
    raw = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    targets = torch.cat(
        (
            torch.randint(0, batch_size, (num_targets, 1), generator=generator).float(),
            torch.randint(0, head.nc, (num_targets, 1), generator=generator).float(),
            torch.rand(num_targets, 2, generator=generator),
            torch.rand(num_targets, 2, generator=generator) * 0.3 + 0.01,
        ),
        dim=1,
    )
    loss_fn = DetectionLoss(head, Hyperparameters())

    def step() -> None:
        for tensor in raw:
            tensor.grad = None
        terms = loss_fn(raw, targets)
        (sum(terms.values()) * batch_size).backward()  # what the trainer minimises

    return step


@benchmark("train", "loss-fwd-bwd-320-b16", unit="ms")
def loss_320() -> Callable[[], Any]:
    """Loss forward + backward, batch 16 at 320, 120 targets, 80 classes (the maps' gradient dominates)."""
    return _loss_setup(320)


@benchmark("train", "loss-fwd-bwd-640-b16", unit="ms")
def loss_640() -> Callable[[], Any]:
    """Same at 640."""
    return _loss_setup(640)


def _optimizer_step_setup(fused: bool) -> Callable[[], Any]:
    """One SGD (Nesterov, 3 groups) step over yolov5s's 7.2M parameters with fixed random gradients."""
    import torch

    from detector.engine.optim import build_optimizer, parameter_groups
    from detector.models.yolo import DetectionModel

    model = DetectionModel("yolov5s.yaml")
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    if fused:
        optimizer = build_optimizer(model, "SGD", lr=0.01, momentum=0.937, weight_decay=5e-4)
    else:  # the same groups through torch's default (per-tensor loop on CPU), as YOLOv5 builds it
        groups = parameter_groups(model)
        optimizer = torch.optim.SGD(
            [
                {"params": groups["bias"], "weight_decay": 0.0},
                {"params": groups["weight"], "weight_decay": 5e-4},
                {"params": groups["norm"], "weight_decay": 0.0},
            ],
            lr=0.01,
            momentum=0.937,
            nesterov=True,
        )
    return optimizer.step


@benchmark("train", "sgd-step-yolov5s", unit="ms")
def sgd_step_fused() -> Callable[[], Any]:
    """build_optimizer's SGD step (fused kernel) on yolov5s."""
    return _optimizer_step_setup(fused=True)


@benchmark("train", "sgd-step-yolov5s-unfused", unit="ms")
def sgd_step_unfused() -> Callable[[], Any]:
    """The same step with torch's default SGD implementation (what YOLOv5 runs)."""
    return _optimizer_step_setup(fused=False)


@benchmark("train", "ema-update-yolov5s", unit="ms")
def ema_update() -> Callable[[], Any]:
    """ModelEMA.update on yolov5s (7.2M parameters + BN buffers)."""
    from detector.engine.ema import ModelEMA
    from detector.models.yolo import DetectionModel

    model = DetectionModel("yolov5s.yaml")
    ema = ModelEMA(model)
    return lambda: ema.update(model)


@benchmark("train", "autoanchor-evolve-1000-boxes", unit="s")
def autoanchor_evolve() -> Callable[[], Any]:
    """kmean_anchors: k-means + 1000 generations on 1000 random boxes (coco128 has 929)."""
    import numpy as np

    from detector.models.autoanchor import kmean_anchors

    sizes = np.random.default_rng(0).uniform(3, 600, (1000, 2)).astype(np.float32)
    return lambda: kmean_anchors(sizes, n=9, imgsz=640, generations=1000, verbose=False)


# -- train: end-to-end training throughput (Trainer.train_one_epoch: data, forward, loss, backward, SGD, EMA) --------

_TRAIN_BATCHES = 20  # batches of 16 per timed call (a fifth of an 800-image epoch, validation excluded)
_TRAIN_PHASES = ("data", "forward", "loss", "backward", "optimizer")


def _train_setup(imgsz: int, workers: int, amp: str = "off", **options: Any) -> Callable[[], dict[str, float]]:
    """A yolov5n Trainer (hyp.scratch-low, SGD, batch 16) on the 800 loader-benchmark images (14 classes);
    ``options`` are further TrainConfig fields (``channels_last``, ``grad_checkpoint``, ``compile``).

    Each call trains ``_TRAIN_BATCHES`` batches through ``Trainer.train_one_epoch`` and reports images/s and the
    milliseconds per batch spent waiting for data and in forward, loss, backward and optimizer step (+ EMA).
    """
    import yaml

    from detector.config import TrainConfig
    from detector.engine.trainer import Trainer

    images = _loader_benchmark_images()
    data = images.parent / "bench.yaml"
    data.write_text(yaml.safe_dump({"path": str(images.parent), "train": "images", "val": "images",
                                    "names": [f"class{i}" for i in range(14)]}))  # fmt: skip
    scratch = tempfile.TemporaryDirectory(prefix="bench-train-")
    config = TrainConfig(data=str(data), cfg="yolov5n.yaml", imgsz=imgsz, batch_size=16, epochs=300, workers=workers,
                         noautoanchor=True, noplots=True, project=scratch.name, amp=amp, **options)  # fmt: skip
    trainer = Trainer(config, callbacks=())
    trainer.num_batches = _TRAIN_BATCHES  # train_one_epoch stops after this many batches

    def train_batches() -> dict[str, float]:
        _ = scratch  # keep the run folder alive while the benchmark runs
        before = dict(trainer.timings)
        trainer.state.epoch += 1
        started = time.perf_counter()
        trainer.train_one_epoch()
        seconds = time.perf_counter() - started
        figures = {"img/s": _TRAIN_BATCHES * 16 / seconds}
        for phase in _TRAIN_PHASES:
            figures[f"{phase}_ms"] = 1000 * (trainer.timings[phase] - before[phase]) / _TRAIN_BATCHES
        return figures

    return train_batches


_TRAIN_UNITS = {"img/s": "img/s", **{f"{phase}_ms": "ms/batch" for phase in _TRAIN_PHASES}}


@benchmark("train", "yolov5n-320-b16-w2", unit="img/s", units=_TRAIN_UNITS)
def train_320_w2() -> Callable[[], Any]:
    """Training throughput as REFERENCE.md measures YOLOv5 (yolov5n, 320, batch 16, 2 workers): 22.0 img/s."""
    return _train_setup(320, workers=2)


@benchmark("train", "yolov5n-320-b16-w0", unit="img/s", units=_TRAIN_UNITS)
def train_320_w0() -> Callable[[], Any]:
    """The same with the data loaded in the training process (no workers)."""
    return _train_setup(320, workers=0)


@benchmark("train", "yolov5n-320-b16-w2-bf16", unit="img/s", units=_TRAIN_UNITS)
def train_320_w2_bf16() -> Callable[[], Any]:
    """The same with --amp bf16: CPU autocast, for CPUs with native bfloat16 (AVX512-BF16/AMX); 10x slower without."""
    return _train_setup(320, workers=2, amp="bf16")


@benchmark("train", "yolov5n-320-b16-w2-nchw", unit="img/s", units=_TRAIN_UNITS)
def train_320_w2_nchw() -> Callable[[], Any]:
    """The same with --channels-last off: NCHW model and batches (the CPU's default, auto, is NHWC)."""
    return _train_setup(320, workers=2, channels_last="off")


@benchmark("train", "yolov5n-320-b16-w2-grad-checkpoint", unit="img/s", units=_TRAIN_UNITS)
def train_320_w2_grad_checkpoint() -> Callable[[], Any]:
    """The same with --grad-checkpoint: backbone and neck recompute their activations in backward."""
    return _train_setup(320, workers=2, grad_checkpoint=True)


@benchmark("train", "yolov5n-320-b16-w2-augment-on-device", unit="img/s", units=_TRAIN_UNITS)
def train_320_w2_augment_on_device() -> Callable[[], Any]:
    """The same with --augment-on-device: HSV colour and flips in the training step (on the CPU: OpenCV per image)
    instead of in the loader workers."""
    return _train_setup(320, workers=2, augment_on_device=True)


@benchmark("train", "yolov5n-320-b16-w2-compile", unit="img/s", units=_TRAIN_UNITS)
def train_320_w2_compile() -> Callable[[], Any]:
    """The same with --compile (inductor). Compiling happens in the untimed set-up and takes minutes on 2 cores;
    use --warmup 1 or more: a new batch shape (none here) would recompile."""
    return _train_setup(320, workers=2, compile=True)


def _step_memory_in_this_process(imgsz: int, batch_size: int, grad_checkpoint: bool) -> float:
    """MiB by which one yolov5n training step (forward, loss, backward) raises this process's peak resident memory
    above its resident memory before the step; meant for a fresh process (the peak is the process's lifetime)."""
    import resource

    import torch

    from detector.config import Hyperparameters
    from detector.engine.loggers import resident_memory_bytes
    from detector.models.loss import DetectionLoss
    from detector.models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=80).to(memory_format=torch.channels_last).train()
    model.set_grad_checkpointing(grad_checkpoint)
    loss_fn = DetectionLoss(model, Hyperparameters())
    images = torch.rand(batch_size, 3, imgsz, imgsz).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[i, i % 80, 0.5, 0.5, 0.2, 0.3] for i in range(batch_size)])  # image, class, xywhn
    before = resident_memory_bytes()
    sum(loss_fn(model(images), targets).values()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return (peak - before) / 2**20


@benchmark("train", "yolov5n-320-b16-step-memory", unit="MiB", units={"plain": "MiB", "grad-checkpoint": "MiB"})
def train_step_memory() -> Callable[[], Any]:
    """Peak resident memory of one yolov5n training step at 320, batch 16, above the memory before it (model,
    batch and imports), without and with --grad-checkpoint; each in a fresh process (Linux: ru_maxrss)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh peak per measurement

    def measure() -> dict[str, float]:
        figures = {}
        for name, grad_checkpoint in (("plain", False), ("grad-checkpoint", True)):
            with context.Pool(1) as pool:
                figures[name] = pool.apply(_step_memory_in_this_process, (320, 16, grad_checkpoint))
        return figures

    return measure


# -- export: export.py's time, and CPU latency (batch 1) of each exported format beside PyTorch ------------------


def _yolov5n_weights(scratch: Path) -> Path:
    """../shared/weights/yolov5n.pt when present (DETECTOR_SHARED overrides the folder), else a random yolov5n."""
    shared = Path(os.environ.get("DETECTOR_SHARED", REPO_ROOT.parent / "shared"))
    weights = shared / "weights" / "yolov5n.pt"
    return weights if weights.is_file() else _random_yolov5n_checkpoint(scratch)


@benchmark("export", "yolov5n-torchscript+onnx-640", unit="s", units={"total": "s", "torchscript": "s", "onnx": "s"})
def export_torchscript_onnx() -> Callable[[], Any]:
    """export.py --include torchscript onnx at 640: total wall time (load, write, checks) and each format's write."""
    from detector.config import ExportConfig
    from detector.export import Exporter

    scratch = tempfile.TemporaryDirectory(prefix="bench-export-")
    weights = _yolov5n_weights(Path(scratch.name))
    config = ExportConfig(weights=str(weights), include=("torchscript", "onnx"), project=scratch.name)

    def export_once() -> dict[str, float]:
        started = time.perf_counter()
        results = Exporter(config).run()
        _ = scratch  # keep the folder alive while the benchmark runs
        return {"total": time.perf_counter() - started, **{r.format: r.seconds for r in results}}

    return export_once


_EXPORTED: dict[int, dict[str, Path]] = {}  # imgsz -> {format: path}, exported once per process
_EXPORT_SCRATCH: list[tempfile.TemporaryDirectory] = []


def _latency_setup(weights_format: str, imgsz: int) -> Callable[[], Any]:
    """One batch-1 forward of yolov5n at ``imgsz`` in its runtime: "pytorch" (fused, fp32), or an exported file."""
    import numpy as np
    import torch

    images = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    if weights_format == "pytorch":
        from detector.export.exporter import prepare_model
        from detector.models.loading import load_model

        if not _EXPORT_SCRATCH:
            _EXPORT_SCRATCH.append(tempfile.TemporaryDirectory(prefix="bench-export-"))
        model = prepare_model(load_model(_yolov5n_weights(Path(_EXPORT_SCRATCH[0].name))), torch.device("cpu"))

        def forward() -> None:
            with torch.inference_mode():
                model(images)

        return forward
    if imgsz not in _EXPORTED:
        from detector import export

        _EXPORT_SCRATCH.append(tempfile.TemporaryDirectory(prefix="bench-export-"))
        scratch = Path(_EXPORT_SCRATCH[-1].name)
        formats = ("torchscript", "onnx", "openvino")
        _EXPORTED[imgsz] = export(_yolov5n_weights(scratch), include=formats, imgsz=imgsz, project=str(scratch))
    path = _EXPORTED[imgsz][weights_format]
    array = images.numpy()
    if weights_format == "torchscript":
        module = torch.jit.load(str(path))

        def forward_torchscript() -> None:
            with torch.inference_mode():
                module(images)

        return forward_torchscript
    if weights_format == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as REFERENCE.md: ONNX Runtime, CPU, 2 threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda: session.run(None, {"images": array})
    import openvino

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    config["INFERENCE_NUM_THREADS"] = torch.get_num_threads()
    compiled = openvino.Core().compile_model(str(next(path.glob("*.xml"))), "CPU", config)
    request = compiled.create_infer_request()
    return lambda: request.infer({0: np.ascontiguousarray(array)})


def _register_latency_benchmarks() -> None:
    for weights_format in ("pytorch", "torchscript", "onnx", "openvino"):
        for imgsz in (320, 640):

            def setup(weights_format: str = weights_format, imgsz: int = imgsz) -> Callable[[], Any]:
                return _latency_setup(weights_format, imgsz)

            what = "the fused PyTorch model (baseline)" if weights_format == "pytorch" else "export.py's file"
            setup.__doc__ = f"yolov5n batch 1 at {imgsz}x{imgsz}, {weights_format} on CPU: {what}"
            benchmark("export", f"latency-{weights_format}-{imgsz}", unit="ms")(setup)


_register_latency_benchmarks()


# -- val: validation time and its parts; NMS against YOLOv5's one-call-per-image scheme -----------------------------


def _shared_folder() -> Path:
    return Path(os.environ.get("DETECTOR_SHARED", REPO_ROOT.parent / "shared"))


def _val_setup(data: str, weights: Path | None, imgsz: int) -> Callable[[], Any]:
    """The validator over a whole dataset split, as val.py runs it (batch 32, conf 0.001, IoU 0.6, 2 workers)."""
    from detector.config import ValConfig
    from detector.data.dataset_config import load_dataset_config
    from detector.engine.validator import Validator, create_val_dataloader
    from detector.models.loading import load_model
    from detector.models.yolo import DetectionModel

    dataset = load_dataset_config(data)
    model = load_model(weights, fuse=True) if weights else DetectionModel("yolov5n.yaml", nc=dataset.nc).fuse().eval()
    loader, _ = create_val_dataloader(dataset, imgsz=imgsz, batch_size=32, workers=2)
    validator = Validator(ValConfig(imgsz=imgsz), dataset.names, progress=False)

    def validate() -> dict[str, float]:
        start = time.perf_counter()
        metrics = validator.run(model, loader)
        speed = metrics.speed
        return {"wall": time.perf_counter() - start, "preprocess": speed.preprocess, "inference": speed.inference,
                "nms": speed.nms, "metrics": speed.metrics, "mAP50-95": metrics.map}  # fmt: skip

    return validate


_VAL_UNITS = {"wall": "s", "preprocess": "ms/img", "inference": "ms/img", "nms": "ms/img", "metrics": "ms/img",
              "mAP50-95": "mAP"}  # fmt: skip


@benchmark("val", "builtin-val-320", unit="s", units=_VAL_UNITS)
def val_builtin_320() -> Callable[[], Any]:
    """Validation of the built-in dataset's 100 val images at 320: wall time and per-image stages.

    Model: the newest runs/train/*/weights/best.pt if any (e.g. after `python train.py`), else an untrained
    yolov5n, whose near-uniform scores make NMS far busier than a trained model's (a pessimistic NMS figure).
    """
    trained = sorted((REPO_ROOT / "runs" / "train").glob("*/weights/best.pt"), key=lambda p: p.stat().st_mtime)
    return _val_setup("", trained[-1] if trained else None, 320)


@benchmark("val", "coco128-yolov5n-640", unit="s", units=_VAL_UNITS)
def val_coco128_640() -> Callable[[], Any]:
    """val.py's acceptance run: official yolov5n.pt on ../shared/datasets/coco128 (128 images) at 640."""
    shared = _shared_folder()
    return _val_setup(str(shared / "datasets" / "coco128" / "coco128.yaml"), shared / "weights" / "yolov5n.pt", 640)


def _coco128_predictions(imgsz: int, count: int) -> Any:
    """Raw yolov5n predictions (count, N, 85) for the first ``count`` coco128 images, letterboxed square."""
    import torch

    from detector.data.dataset_config import load_dataset_config
    from detector.engine.validator import create_val_dataloader
    from detector.models.loading import load_model

    shared = _shared_folder()
    dataset = load_dataset_config(shared / "datasets" / "coco128" / "coco128.yaml")
    loader, _ = create_val_dataloader(dataset, imgsz=imgsz, batch_size=count, workers=0, rect=False)
    model = load_model(shared / "weights" / "yolov5n.pt", fuse=True)
    images = next(iter(loader))[0]
    with torch.inference_mode():
        return model(images.float() / 255)


def _one_call_per_image_nms(pred: Any, conf_thres: float, iou_thres: float, max_det: int = 300) -> list[Any]:
    """YOLOv5's scheme, re-expressed as the baseline: per image, multi-label candidates, classes shifted apart by
    7680 px in float32, one torchvision NMS call over all of them."""
    import torch
    import torchvision

    output = []
    for image in pred:
        rows = image[image[:, 4] > conf_thres]
        scores = rows[:, 5:] * rows[:, 4:5]
        boxes = torchvision.ops.box_convert(rows[:, :4], "cxcywh", "xyxy")
        anchor, cls = (scores > conf_thres).nonzero(as_tuple=True)
        detections = torch.cat((boxes[anchor], scores[anchor, cls, None], cls[:, None].float()), 1)
        detections = detections[detections[:, 4].argsort(descending=True)[:30000]]
        keep = torchvision.ops.nms(detections[:, :4] + detections[:, 5:6] * 7680, detections[:, 4], iou_thres)
        output.append(detections[keep[:max_det]])
    return output


@benchmark("val", "nms-coco128-640-conf0.001", unit="ms/img", units={"ours": "ms/img", "one-call-per-image": "ms/img"})
def val_nms_coco128() -> Callable[[], Any]:
    """NMS alone at val settings (conf 0.001, IoU 0.6, multi-label) on yolov5n's predictions for 32 coco128
    images at 640 (80 classes): ours (per class, small groups packed) and YOLOv5's one call per image."""
    from detector.ops.nms import non_max_suppression

    pred = _coco128_predictions(640, 32)

    def run_both() -> dict[str, float]:
        start = time.perf_counter()
        non_max_suppression(pred, 0.001, 0.6, multi_label=True, max_det=300)
        middle = time.perf_counter()
        _one_call_per_image_nms(pred, 0.001, 0.6)
        end = time.perf_counter()
        return {"ours": (middle - start) * 1e3 / len(pred), "one-call-per-image": (end - middle) * 1e3 / len(pred)}

    return run_both


# ====================================================================================================================
# deploy: batch-1 CPU latency of yolov5n in each deployment format x precision (the README's deployment table).
# One benchmark per input size times every variant in turn within each repeat (A B C ... A B C ...), so all rows
# of a size share the machine's load; the set-up exports the files once (int8 calibrated on coco128 when ../shared
# has it, else on the built-in dataset) and is not timed: about 3 minutes at 640 on 2 cores.

_DEPLOY_RUNS_PER_ROUND = 5  # forwards per variant and repeat; the figure is their mean, in ms
# PyTorch is left out (model/* times it): its OpenMP threads keep spinning after each call, which would take the
# CPU from whichever variant runs next.
_DEPLOY_VARIANTS = (  # row name: (export precision, format, run in half precision)
    ("onnx-fp32", ("fp32", "onnx", False)),
    ("onnx-int8", ("int8", "onnx", False)),
    ("openvino-fp32", ("fp32", "openvino", False)),
    ("openvino-bf16", ("fp32", "openvino", True)),  # the fp32 IR, compiled with OpenVINO's bf16 inference hint
    ("openvino-int8", ("int8", "openvino", False)),
    ("openvino-int8-bf16", ("int8", "openvino", True)),  # --half: the float decode in bf16
)


def _deploy_setup(imgsz: int) -> Callable[[], dict[str, float]]:
    """Every deployment variant of yolov5n at ``imgsz`` loaded with the backend val.py and detect.py use, timed in
    turn. bf16 rows run only on a CPU with native bfloat16 (AVX512-BF16 or AMX); elsewhere they are left out."""
    import torch

    from detector import export
    from detector.export import format_for_path
    from detector.utils.torch_utils import cpu_has_native_bf16

    scratch = tempfile.TemporaryDirectory(prefix="bench-deploy-")
    weights = _yolov5n_weights(Path(scratch.name))
    coco128 = _shared_folder() / "datasets" / "coco128" / "coco128.yaml"
    calibration = str(coco128) if coco128.is_file() else ""
    exports = {  # no fp16: x86 CPUs without AVX512-FP16 have no fp16 arithmetic (ONNX Runtime casts to fp32)
        "fp32": {"include": ("onnx", "openvino")},
        "int8": {"include": ("onnx", "openvino"), "int8": True, "data": calibration},
    }
    files = {
        precision: export(weights, imgsz=imgsz, project=scratch.name, name=precision, **options)
        for precision, options in exports.items()
    }
    backends = {}
    for row, (precision, weights_format, half) in _DEPLOY_VARIANTS:
        if half and not cpu_has_native_bf16():
            continue
        path = files[precision][weights_format]
        backends[row] = format_for_path(path)().load(path, torch.device("cpu"), half)
    images = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    for backend in backends.values():
        backend(images)  # first-call allocations outside the timing
    rounds = iter(range(1_000_000))

    def time_each() -> dict[str, float]:
        start = next(rounds) % len(backends)
        order = list(backends)[start:] + list(backends)[:start]  # a different variant first in every round
        figures = {}
        for row in order:
            began = time.perf_counter()
            for _ in range(_DEPLOY_RUNS_PER_ROUND):
                backends[row](images)
            figures[row] = (time.perf_counter() - began) * 1e3 / _DEPLOY_RUNS_PER_ROUND
        _ = scratch  # keep the exported files as long as the benchmark runs
        ratios = {f"{row}/onnx-fp32": figures[row] / figures["onnx-fp32"] for row in _DEPLOY_RATIOS if row in figures}
        return {**{row: figures[row] for row in backends}, **ratios}

    return time_each


# each against ONNX Runtime fp32 in the same round
_DEPLOY_RATIOS = ("onnx-int8", "openvino-bf16", "openvino-int8", "openvino-int8-bf16")
_DEPLOY_UNITS = {row: "ms" for row, _ in _DEPLOY_VARIANTS} | {f"{row}/onnx-fp32": "x" for row in _DEPLOY_RATIOS}


@benchmark("deploy", "yolov5n-b1-320", unit="ms", units=_DEPLOY_UNITS)
def deploy_320() -> Callable[[], Any]:
    """yolov5n batch 1 at 320x320 on CPU: ONNX Runtime in fp32 and int8, OpenVINO in fp32, bf16 and int8."""
    return _deploy_setup(320)


@benchmark("deploy", "yolov5n-b1-640", unit="ms", units=_DEPLOY_UNITS)
def deploy_640() -> Callable[[], Any]:
    """The same at 640x640 (the acceptance size: int8 latency against ONNX Runtime fp32)."""
    return _deploy_setup(640)


if __name__ == "__main__":
    sys.exit(main())
