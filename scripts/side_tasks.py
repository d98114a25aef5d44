"""The measuring tasks both sides of ``scripts/benchmark.py --compare-yolov5`` take, with the same flags:
``scripts/detector_side.py`` (ours) and ``scripts/yolov5_side.py`` (YOLOv5's interpreter). Imports only argparse,
so YOLOv5's side stays free of ``detector``."""

from __future__ import annotations

import argparse


def add_measuring_tasks(tasks: argparse._SubParsersAction, *, weights_help: str, out_help: str, classes: bool) -> None:
    """train, loader, forward, onnx and cache. ``classes``: loader and cache take ``--classes`` (the data set's
    class count; our loader checks labels against it and keys its scan cache with it)."""
    train = tasks.add_parser("train", help="train.py's command with the epoch timed")
    train.add_argument("flags", nargs=argparse.REMAINDER)
    loader = tasks.add_parser("loader", help="training loader images/s")
    loader.add_argument("--images", required=True, help="training images folder (labels in ../labels)")
    loader.add_argument("--img", type=int, required=True)
    loader.add_argument("--workers", type=int, required=True)
    if classes:
        loader.add_argument("--classes", type=int, required=True, help="the data set's class count")
    loader.add_argument("--batch", type=int, default=16)
    loader.add_argument("--batches", type=int, default=20, help="timed batches")
    loader.add_argument("--warmup-batches", type=int, default=2)
    for name in ("forward", "onnx"):
        task = tasks.add_parser(name, help=f"{name} latency")
        source = task.add_mutually_exclusive_group(required=True)
        source.add_argument("--weights", help=weights_help)
        source.add_argument("--cfg", help="a model YAML, e.g. yolov5s.yaml: random weights (seed 0)")
        task.add_argument("--img", type=int, required=True)
        task.add_argument("--batch", type=int, default=1)
        task.add_argument("--iters", type=int, default=20, help="timed calls; the figure is their median")
        task.add_argument("--warmup-iters", type=int, default=3)
        task.add_argument("--threads", type=int, default=0, help="torch (and ONNX Runtime) threads; 0 = default")
        task.add_argument("--out", required=True, help=out_help)
    cache = tasks.add_parser("cache", help="build the label caches of --images folders")
    cache.add_argument("--images", nargs="+", required=True)
    if classes:
        cache.add_argument("--classes", type=int, required=True, help="the data set's class count (part of the key)")
