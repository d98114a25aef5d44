"""YOLOv5's side of ``scripts/benchmark.py --compare-yolov5``: one measurement of YOLOv5's own code per process.

Run with YOLOv5's interpreter (``--yolov5-python``), never ours: it imports nothing from ``detector``, and
``detector`` never imports YOLOv5. ``--yolov5 PATH`` is a YOLOv5 checkout (``models/``, ``utils/``, ``train.py``,
...) or the folder of an installed pip ``yolov5`` package; the same code runs in both, only the import names differ
(``utils.dataloaders`` or ``yolov5.utils.dataloaders``). Tasks (``scripts/detector_side.py`` has the same ones for
our side)::

    script NAME -- FLAGS   YOLOv5's NAME.py (train, val, detect, export) run as its command line runs it
    train -- FLAGS         train.py's command, timing the training part of each epoch (first step to last step)
    loader                 create_dataloader (mosaic, hyp.scratch-low, shuffled): images/s over --batches batches
    forward                DetectMultiBackend (fused) on a random batch: milliseconds per image
    onnx                   export.py's ONNX file of --weights in ONNX Runtime: milliseconds per batch
    cache                  build the label caches of --images folders (so timed runs do not scan)

Measuring tasks print one line ``BENCHMARK-RESULT {json}`` on stdout; the harness reads it and measures the
process's wall time and peak memory from outside. The harness also sets the environment that keeps YOLOv5 offline
(its font in ``YOLOV5_CONFIG_DIR``, no pip auto-install) and lets torch load YOLOv5's pickled release weights.

Compatibility with newer libraries than the YOLOv5 release knew, as YOLOv5's later commits do it: ``np.trapz``
(removed in NumPy 2.4) is ``np.trapezoid`` and Pillow's removed ``FreeTypeFont.getsize`` is measured with
``getbbox``. YOLOv5's pip package also imports ``roboflow`` and ``huggingface_hub`` for its upload and
hub-download extras; where they are missing (a ``--no-deps`` install) this script stands in for them: the hub
look-up answers "not on the hub" for local files (what huggingface_hub answers for a path) and the Roboflow
connector refuses to be used. Nothing else of YOLOv5 is changed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import runpy
import shutil
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

from side_tasks import add_measuring_tasks  # scripts/, this script's folder

RESULT_PREFIX = "BENCHMARK-RESULT "


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    yolov5 = import_yolov5(Path(args.yolov5))
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    if args.task == "script":
        return run_script(yolov5, args.name, args.flags)
    result = TASKS[args.task](yolov5, args)
    if result is not None:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--yolov5", required=True, help="YOLOv5 checkout or pip package folder")
    tasks = parser.add_subparsers(dest="task", required=True)
    script = tasks.add_parser("script", help="run YOLOv5's NAME.py with FLAGS")
    script.add_argument("name", choices=("train", "val", "detect", "export"))
    script.add_argument("flags", nargs=argparse.REMAINDER)
    add_measuring_tasks(
        tasks,
        weights_help="a YOLOv5 .pt file",
        out_help="scratch folder (weights copies, exported files)",
        classes=False,
    )
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Importing YOLOv5 from a checkout or a pip package


class Yolov5:
    """Where YOLOv5 is and how its modules are named: ``module("utils.dataloaders")``."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.root = root
        self.prefix = prefix  # "" for a checkout, "yolov5." for the pip package

    def module(self, name: str) -> types.ModuleType:
        return importlib.import_module(self.prefix + name)


def import_yolov5(root: Path) -> Yolov5:
    root = root.resolve()
    if not (root / "models" / "yolo.py").is_file() or not (root / "utils" / "dataloaders.py").is_file():
        raise SystemExit(f"error: --yolov5 {root}: not a YOLOv5 checkout or pip package (no models/yolo.py)")
    if (root / "__init__.py").is_file():  # the pip package: its modules import each other as yolov5.utils...
        installed = importlib.util.find_spec(root.name)
        if installed is None or Path(installed.origin).parent != root:  # not this interpreter's own package
            sys.path.insert(0, str(root.parent))
        yolov5 = Yolov5(root, root.name + ".")
    else:  # a checkout: its scripts put the checkout on sys.path and import models, utils
        sys.path.insert(0, str(root))
        yolov5 = Yolov5(root, "")
    if yolov5.prefix:
        _stand_in_for_missing_extras(yolov5)
    import numpy as np

    if not hasattr(np, "trapz"):  # NumPy 2.4 removed it; YOLOv5's later commits call np.trapezoid instead
        np.trapz = np.trapezoid
    from PIL import ImageFont

    if not hasattr(ImageFont.FreeTypeFont, "getsize"):  # Pillow 10 removed it; later YOLOv5 measures with getbbox
        ImageFont.FreeTypeFont.getsize = lambda font, text: tuple(font.getbbox(text)[2:])
    return yolov5


def _stand_in_for_missing_extras(yolov5: Yolov5) -> None:
    """See the module docstring: stand-ins for the pip package's hub and Roboflow imports when not installed."""
    if importlib.util.find_spec("huggingface_hub") is None:
        downloads = yolov5.module("utils.downloads")

        def not_on_the_hub(repo_id: Any, hf_token: Any = None, revision: Any = None) -> None:
            if not Path(str(repo_id)).exists():
                raise FileNotFoundError(f"{repo_id}: not found (huggingface_hub is not installed: local files only)")
            return None

        downloads.attempt_download_from_hub = not_on_the_hub
        yolov5.module("models.common").attempt_download_from_hub = not_on_the_hub
    if importlib.util.find_spec("roboflow") is None:
        stand_in = types.ModuleType(yolov5.prefix + "utils.roboflow")

        class RoboflowConnector:
            def __getattr__(self, name: str) -> Any:
                raise RuntimeError("roboflow is not installed")

        stand_in.RoboflowConnector = RoboflowConnector()
        sys.modules[stand_in.__name__] = stand_in


# --------------------------------------------------------------------------------------------------------------------
# Tasks


def run_script(yolov5: Yolov5, name: str, flags: list[str]) -> int:
    """YOLOv5's ``name``.py as ``python name.py FLAGS`` runs it (``__main__``), with this process's argv."""
    flags = flags[1:] if flags[:1] == ["--"] else flags
    sys.argv = [str(yolov5.root / f"{name}.py"), *flags]
    if yolov5.prefix:
        runpy.run_module(yolov5.prefix + name, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(str(yolov5.root / f"{name}.py"), run_name="__main__")
    return 0


def train(yolov5: Yolov5, args: argparse.Namespace) -> dict[str, float]:
    """train.py's main() with two callbacks: the clock at each epoch's start and at each training step's end."""
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    sys.argv = [str(yolov5.root / "train.py"), *flags]
    train_module = yolov5.module("train")
    callbacks = yolov5.module("utils.callbacks").Callbacks()
    epochs: list[dict[str, float]] = []

    def epoch_start(*_: Any, **__: Any) -> None:
        now = time.perf_counter()
        epochs.append({"start": now, "end": now, "images": 0})

    def step_end(model: Any, ni: int, imgs: Any, *_: Any, **__: Any) -> None:
        epochs[-1]["end"] = time.perf_counter()
        epochs[-1]["images"] += int(imgs.shape[0])

    callbacks.register_action("on_train_epoch_start", "benchmark", epoch_start)
    callbacks.register_action("on_train_batch_end", "benchmark", step_end)
    train_module.main(train_module.parse_opt(), callbacks)
    seconds = sum(e["end"] - e["start"] for e in epochs)
    images = sum(e["images"] for e in epochs)
    return {"train_s": seconds, "img/s": images / seconds if seconds > 0 else 0.0, "images": images}


def loader(yolov5: Yolov5, args: argparse.Namespace) -> dict[str, float]:
    """create_dataloader as train.py builds it (augment, hyp.scratch-low, shuffle), batches drawn and dropped."""
    import yaml

    hyp = yaml.safe_load((yolov5.root / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    create_dataloader = yolov5.module("utils.dataloaders").create_dataloader
    train_loader, _ = create_dataloader(
        args.images, args.img, args.batch, 32, hyp=hyp, augment=True, workers=args.workers, shuffle=True, seed=0
    )
    state = {"batches": iter(train_loader)}

    def next_batch() -> None:
        try:
            next(state["batches"])
        except StopIteration:  # a new epoch (small data sets only)
            state["batches"] = iter(train_loader)
            next(state["batches"])

    for _ in range(args.warmup_batches):
        next_batch()
    started = time.perf_counter()
    for _ in range(args.batches):
        next_batch()
    seconds = time.perf_counter() - started
    return {"img/s": args.batches * args.batch / seconds}


def _weights(yolov5: Yolov5, args: argparse.Namespace) -> Path:
    """--weights copied into --out (exports write beside the weights), or a random --cfg model saved there."""
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.weights:
        copy = out / Path(args.weights).name
        if not copy.exists():
            shutil.copy2(args.weights, copy)
        return copy
    path = out / f"{Path(args.cfg).stem}-random.pt"
    if not path.exists():
        cfg = Path(args.cfg) if Path(args.cfg).is_file() else yolov5.root / "models" / args.cfg
        torch.manual_seed(0)
        model = yolov5.module("models.yolo").Model(str(cfg))
        torch.save({"model": model, "epoch": -1}, path)  # the release checkpoints' layout
    return path


def forward(yolov5: Yolov5, args: argparse.Namespace) -> dict[str, float]:
    """DetectMultiBackend (what detect.py and val.py use: the fused model) on a random batch, inference mode."""
    import torch

    model = yolov5.module("models.common").DetectMultiBackend(
        str(_weights(yolov5, args)), device=torch.device("cpu"), fuse=True
    )
    images = torch.rand(args.batch, 3, args.img, args.img, generator=torch.Generator().manual_seed(0))
    return {"ms/img": _median_ms(lambda: model(images), args) / args.batch}


def onnx(yolov5: Yolov5, args: argparse.Namespace) -> dict[str, float]:
    """export.py's ONNX file (exported once into --out) in ONNX Runtime's CPU provider, fixed input."""
    import numpy as np
    import onnxruntime
    import torch

    weights = _weights(yolov5, args)
    path = weights.with_suffix(".onnx")
    if not path.exists():
        export = yolov5.module("export")
        # torch >= 2.9 exports with torch.export (dynamo, needs onnxscript) unless told otherwise; YOLOv5 was
        # written for the TorchScript-based exporter, which is also the one ours uses
        torch_export = torch.onnx.export
        torch.onnx.export = lambda *a, **k: torch_export(*a, **{"dynamo": False, **k})
        export.run(weights=str(weights), include=("onnx",), imgsz=(args.img, args.img), batch_size=args.batch)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    array = np.random.default_rng(0).random((args.batch, 3, args.img, args.img), np.float32)
    feed = {session.get_inputs()[0].name: array}
    return {"ms": _median_ms(lambda: session.run(None, feed), args)}


def _median_ms(call: Any, args: argparse.Namespace) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(args.warmup_iters):
            call()
        times = []
        for _ in range(args.iters):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def cache(yolov5: Yolov5, args: argparse.Namespace) -> None:
    """LoadImagesAndLabels over each folder: writes YOLOv5's labels/*.cache beside the labels."""
    dataset_class = yolov5.module("utils.dataloaders").LoadImagesAndLabels
    for images in args.images:
        dataset_class(images, 320, 16)


TASKS = {"train": train, "loader": loader, "forward": forward, "onnx": onnx, "cache": cache}

if __name__ == "__main__":
    sys.exit(main())
