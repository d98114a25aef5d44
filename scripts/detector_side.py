"""Our side of ``scripts/benchmark.py --compare-yolov5``: one measurement of ``detector`` per process.

The twin of ``scripts/yolov5_side.py`` (same tasks, flags and output), run with our interpreter; val.py and
detect.py are measured as the whole commands themselves, so they need no task here::

    train -- FLAGS   train.py's command (train.py's own code path), timing the training part of each epoch
    loader           create_dataloader (mosaic, hyp.scratch-low, shuffled): images/s over --batches batches
    forward          load_backend(weights), what detect.py, val.py and the Python API use, on a random batch
    onnx             export.py's ONNX file of --weights in ONNX Runtime: milliseconds per batch
    cache            build the label scan caches of --images folders (so timed runs do not scan)

Measuring tasks print one line ``BENCHMARK-RESULT {json}`` on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from side_tasks import add_measuring_tasks  # scripts/, this script's folder

RESULT_PREFIX = "BENCHMARK-RESULT "


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    result = TASKS[args.task](args)
    if result is not None:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    add_measuring_tasks(
        tasks,
        weights_help="a .pt file (ours or YOLOv5's)",
        out_help="scratch folder (random weights, exported files)",
        classes=True,
    )
    return parser


def train(args: argparse.Namespace) -> dict[str, float]:
    """What ``python train.py FLAGS`` runs (detector.cli.train), plus a hook that clocks each epoch's steps."""
    from detector.cli.common import given_flags, run_cli
    from detector.cli.train import build_parser as train_parser
    from detector.config import resolve_train_config
    from detector.engine.callbacks import Callback
    from detector.engine.trainer import Trainer

    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    epochs: list[dict[str, float]] = []

    class EpochClock(Callback):
        def on_epoch_start(self, trainer: Trainer) -> None:
            now = time.perf_counter()
            epochs.append({"start": now, "end": now, "images": 0})

        def on_step_end(self, trainer: Trainer) -> None:
            epochs[-1]["end"] = time.perf_counter()
            epochs[-1]["images"] += int(trainer.last_batch[0].shape[0])

    def fit() -> int:
        config = resolve_train_config(given_flags(train_parser(), flags))
        Trainer(config, callbacks=[EpochClock()]).fit()
        return 0

    status = run_cli(fit)
    if status:
        raise SystemExit(status)
    seconds = sum(e["end"] - e["start"] for e in epochs)
    images = sum(e["images"] for e in epochs)
    return {"train_s": seconds, "img/s": images / seconds if seconds > 0 else 0.0, "images": images}


def loader(args: argparse.Namespace) -> dict[str, float]:
    """create_dataloader as the trainer builds it (augment, hyp.scratch-low, shuffle), batches drawn and dropped."""
    from detector.config import load_hyp
    from detector.data.loader import create_dataloader

    train_loader, _ = create_dataloader(
        args.images,
        imgsz=args.img,
        batch_size=args.batch,
        hyp=load_hyp("hyp.scratch-low.yaml"),
        augment=True,
        shuffle=True,
        workers=args.workers,
        num_classes=args.classes,
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


def _weights(args: argparse.Namespace) -> Path:
    """--weights, or a random --cfg model (seed 0) saved as our checkpoint in --out."""
    if args.weights:
        return Path(args.weights)
    import torch

    from detector.models.loading import checkpoint_model_entries
    from detector.models.yolo import DetectionModel
    from detector.utils.checkpoint import save_checkpoint

    path = Path(args.out) / f"{Path(args.cfg).stem}-random.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_checkpoint(checkpoint_model_entries(DetectionModel(args.cfg)), path)
    return path


def forward(args: argparse.Namespace) -> dict[str, float]:
    """The default inference path: load_backend (fused model) called on a random batch."""
    import torch

    from detector.engine.backends import load_backend

    backend = load_backend(_weights(args), "cpu")
    images = torch.rand(args.batch, 3, args.img, args.img, generator=torch.Generator().manual_seed(0))
    return {"ms/img": _median_ms(lambda: backend(images), args) / args.batch}


def onnx(args: argparse.Namespace) -> dict[str, float]:
    """export.py's ONNX file (exported once into --out) in ONNX Runtime's CPU provider, fixed input."""
    import numpy as np
    import onnxruntime
    import torch

    out = Path(args.out)
    exported = sorted(out.glob("**/*.onnx"))
    if not exported:
        from detector import export

        files = export(_weights(args), include=("onnx",), imgsz=args.img, batch_size=args.batch, project=str(out))
        exported = [files["onnx"]]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(exported[0]), options, providers=["CPUExecutionProvider"])
    array = np.random.default_rng(0).random((args.batch, 3, args.img, args.img), np.float32)
    feed = {session.get_inputs()[0].name: array}
    return {"ms": _median_ms(lambda: session.run(None, feed), args)}


def _median_ms(call: Callable[[], Any], args: argparse.Namespace) -> float:
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


def cache(args: argparse.Namespace) -> None:
    """Scan each folder once as the loaders do: writes the .detector.cache files beside the labels."""
    from detector.data.loader import create_dataloader

    for images in args.images:
        create_dataloader(images, imgsz=320, batch_size=16, workers=0, num_classes=args.classes)


TASKS = {"train": train, "loader": loader, "forward": forward, "onnx": onnx, "cache": cache}

if __name__ == "__main__":
    sys.exit(main())
