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

Keep set-up functions free of work at import time (import torch and build models inside them): this module is
imported by nothing else, and pytest never collects it (``testpaths = ["tests"]``). Timings on a shared machine
are noisy: compare runs from one session, and quote the command shown in each row.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import platform
import shlex
import statistics
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="GROUP/NAME", help="benchmarks to run (shell patterns allowed)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per benchmark")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results and environment as JSON")
    parser.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
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


if __name__ == "__main__":
    sys.exit(main())
