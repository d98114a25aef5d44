"""``val.py``: YOLOv5's validation flags -> ValConfig -> :func:`detector.engine.validator.run_validation`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from detector.cli.common import CACHE_DIR_HELP, OneOrMany, default_help, given_flags, new_parser, run_cli
from detector.cli.detect import add_tile_flags
from detector.config import ValConfig, build_config

DESCRIPTION = """Validate a model on a dataset: precision, recall, mAP50 and mAP50-95 (COCO's matching and
101-point AP), per-class results, speed, plots and optional COCO JSON evaluated with pycocotools; YOLOv5's flags.

examples:
  python val.py --weights runs/train/exp/weights/best.pt          # on the built-in dataset
  python val.py --weights yolov5n.pt --data coco128.yaml --img 640 --save-json   # + pycocotools
  python val.py --weights best.onnx --data mydata.yaml --task test --verbose     # any exported format
  python val.py --weights best.pt --data mydata.yaml --task speed                # timing at conf 0.25, IoU 0.45
  python val.py --weights best.pt --data mydata.yaml --task study --img 1024     # mAP and speed for 256..1024
  python val.py --weights best.pt --data drone.yaml --tile 640 --tile-full      # whole images, tiled as detect.py

Results go to runs/val/exp, exp2, ...: val.log, confusion_matrix.png, PR/F1/P/R curves, val_batch*_labels.jpg
and val_batch*_pred.jpg, labels/*.txt (--save-txt), *_predictions.json (--save-json), study.csv/png (study).
"""

DEFAULTS = ValConfig()
_default = default_help(DEFAULTS)  # " (default: X)" in each flag's help


def build_parser() -> argparse.ArgumentParser:
    """The val.py parser: every flag shows its default; flags not typed do not override the config."""
    parser = new_parser("val.py", DESCRIPTION)
    add = parser.add_argument
    add("--data", type=str, help="dataset YAML; '' = the built-in synthetic dataset" + _default("data"))
    add(
        "--weights",
        nargs="+",
        action=OneOrMany,
        help="model: .pt (ours or YOLOv5's), .torchscript, .onnx, *_openvino_model/, .engine; several = an ensemble, "
        "their boxes joined before NMS; '' = the newest runs/train/*/weights/best.pt" + _default("weights"),
    )
    add("--batch-size", type=int, dest="batch_size", help="images per batch" + _default("batch_size"))
    add(
        "--imgsz",
        "--img",
        "--img-size",
        type=int,
        dest="imgsz",
        help="inference size in pixels (long side; rounded up to a stride multiple)" + _default("imgsz"),
    )
    add("--conf-thres", type=float, dest="conf_thres", help="confidence threshold" + _default("conf_thres"))
    add("--iou-thres", type=float, dest="iou_thres", help="NMS IoU threshold" + _default("iou_thres"))
    add("--max-det", type=int, dest="max_det", help="maximum detections per image" + _default("max_det"))
    add(
        "--task",
        choices=["train", "val", "test", "speed", "study"],
        help="train/val/test: validate that split; speed: time it at conf 0.25, IoU 0.45; study: mAP and speed at "
        "image sizes 256, 384, ... up to --imgsz, as study.csv and study.png" + _default("task"),
    )
    add("--device", type=str, help="cuda device, i.e. 0 or cpu; '' = CUDA 0 if present, else CPU" + _default("device"))
    add(
        "--workers",
        type=int,
        help="max dataloader workers (capped by CPU count; on the CPU by the cores the "
        "forward leaves: with none left, batches load on threads in the main process)" + _default("workers"),
    )
    add("--single-cls", action="store_true", dest="single_cls", help="treat as single-class" + _default("single_cls"))
    add(
        "--cache-dir",
        type=str,
        dest="cache_dir",
        help=CACHE_DIR_HELP + _default("cache_dir"),
    )
    add("--augment", action="store_true", help="test-time augmentation (scales + flip)" + _default("augment"))
    add("--verbose", action="store_true", help="report mAP per class" + _default("verbose"))
    add(
        "--save-txt",
        action="store_true",
        dest="save_txt",
        help="save predictions as YOLO label files in labels/" + _default("save_txt"),
    )
    add(
        "--save-hybrid",
        action="store_true",
        dest="save_hybrid",
        help="save labels + the predictions they do not overlap to labels/ (metrics are unaffected)"
        + _default("save_hybrid"),
    )
    add(
        "--save-conf",
        action="store_true",
        dest="save_conf",
        help="add confidences to --save-txt labels" + _default("save_conf"),
    )
    add(
        "--save-json",
        action="store_true",
        dest="save_json",
        help="save a COCO-format results JSON and evaluate it with pycocotools (against the dataset's "
        "annotations/instances_*.json or the YAML's 'annotations:', else ground truth written from the labels)"
        + _default("save_json"),
    )
    add("--project", type=str, help="save results to project/name" + _default("project"))
    add("--name", type=str, help="save results to project/name" + _default("name"))
    add(
        "--exist-ok",
        action="store_true",
        dest="exist_ok",
        help="reuse an existing project/name, do not increment" + _default("exist_ok"),
    )
    add(
        "--half",
        action="store_true",
        help="half precision: FP16 on CUDA; bf16 for a .pt or OpenVINO model on CPUs with native bf16 (AVX512-BF16/AMX)"
        + _default("half"),
    )
    add(
        "--dnn",
        action="store_true",
        help="run .onnx weights with OpenCV's DNN module instead of ONNX Runtime (no onnxruntime needed)"
        + _default("dnn"),
    )
    add_tile_flags(parser, _default)
    return parser


def build_val_config(argv: Sequence[str] | None = None) -> ValConfig:
    """ValConfig from the defaults <- the flags typed on the command line."""
    return build_config(ValConfig, ("command line", given_flags(build_parser(), argv)))


def main(argv: Sequence[str] | None = None) -> int:
    def run() -> int:
        config = build_val_config(argv)  # before torch is imported: --help and a mistyped flag answer at once
        from detector.engine.validator import run_validation

        run_validation(config)
        return 0

    return run_cli(run)
