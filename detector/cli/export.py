"""``python export.py``: YOLOv5's export flags -> ExportConfig -> Exporter (detector.export)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from detector.cli.common import given_flags, new_parser, run_cli
from detector.config import ExportConfig, build_config

DESCRIPTION = """\
Export a model to TorchScript, ONNX, OpenVINO IR and TensorRT, then load every file with the loader detect.py
and val.py use and check it against the PyTorch model on real validation images (--data's, else the built-in
dataset's): raw predictions within 1e-3 in fp32; --nms outputs equal to our single-label Python NMS, on images
with detections. A failed check exits non-zero and deletes the bad file; a format whose runtime or device is
missing (TensorRT without CUDA) is skipped with one line and the others are still written. The results table
says what each file holds: its precision, whether NMS is in the graph, and any option it could not apply
(--nms for TorchScript/OpenVINO, --int8 for TorchScript/TensorRT or without nncf).

Files go to --project/--name (runs/export/exp, exp2, ...), named after the weights (yolov5n.onnx,
yolov5n.torchscript, yolov5n_openvino_model/, yolov5n.engine), never beside the weights.

examples:
  python export.py --weights yolov5n.pt --include onnx openvino --img 640
  python export.py --weights best.pt --include onnx --dynamic --simplify --nms --topk-all 100
  python export.py --weights yolov5n.pt --include onnx openvino --int8 --data coco128.yaml
  python export.py --weights best.pt --include engine --device 0 --half --dynamic --batch-size 8 --nms
"""


# (flags, argparse options, help) in --help order; the default is appended to the help from ExportConfig.
FLAGS: list[tuple[tuple[str, ...], dict[str, Any], str]] = [
    (("--weights",), {"type": str}, "model weights to export: our .pt or a YOLOv5 release .pt"),
    (("--imgsz", "--img", "--img-size"), {"nargs": "+", "type": int}, "input size: one number or height width"),
    (("--batch-size",), {"type": int}, "input batch size (with --dynamic: TensorRT's largest batch)"),
    (("--device",), {"type": str}, "'cpu' or a CUDA index like 0 (TensorRT builds on CUDA 0 when this is cpu)"),
    (
        ("--half",),
        {"action": "store_true"},
        "fp16: TorchScript/ONNX compute in half precision, OpenVINO stores fp16 weights, TensorRT builds FP16 kernels",
    ),
    (("--inplace",), {"action": "store_true"}, "accepted for YOLOv5 compatibility; has no effect"),
    (("--optimize",), {"action": "store_true"}, "TorchScript: optimise for mobile (CPU; needs PyTorch with XNNPACK)"),
    (
        ("--int8",),
        {"action": "store_true"},
        "ONNX (ONNX Runtime static quantization) and OpenVINO (NNCF, pip install nncf): int8 convolutions "
        "calibrated on --data's val images, the Detect decode (and for OpenVINO the first convolution) kept in "
        "float; other formats, or no nncf: the table "
        "says int8 skipped, and why",
    ),
    (
        ("--data",),
        {"type": str},
        "dataset YAML: its val images feed the checks and calibrate --int8 ('' = the built-in dataset's val images)",
    ),
    (
        ("--dynamic",),
        {"action": "store_true"},
        "ONNX/OpenVINO: free batch, height and width; TensorRT: a profile for batch 1..--batch-size and sizes up "
        "to --imgsz",
    ),
    (("--simplify",), {"action": "store_true"}, "ONNX: simplify the graph with onnxslim"),
    (("--opset",), {"type": int}, "ONNX opset version (11..20)"),
    (("--workspace",), {"type": float}, "TensorRT builder workspace in GiB"),
    (
        ("--nms",),
        {"action": "store_true"},
        "ONNX/TensorRT: single-label NMS inside the graph (detect.py's), outputs num_dets, det_boxes, det_scores, "
        "det_classes; TorchScript/OpenVINO stay raw ('not in graph' in the table)",
    ),
    (("--agnostic-nms",), {"action": "store_true"}, "with --nms: one NMS over all classes (best class per box)"),
    (("--topk-per-class",), {"type": int}, "with --nms: at most this many boxes per class and image (ONNX)"),
    (("--topk-all",), {"type": int}, "with --nms: detections per image (the fixed size of the outputs)"),
    (("--iou-thres",), {"type": float}, "with --nms: NMS IoU threshold"),
    (("--conf-thres",), {"type": float}, "with --nms: confidence threshold (objectness x class score)"),
    (("--include",), {"nargs": "+", "type": str}, "formats to write: torchscript onnx openvino engine"),
    (("--project",), {"type": str}, "parent folder of export run folders"),
    (("--name",), {"type": str}, "run folder name; exp, exp2, ... unless --exist-ok"),
    (("--exist-ok",), {"action": "store_true"}, "write into an existing --project/--name folder"),
]


def _default_text(field: str) -> str:
    value = getattr(ExportConfig(), field)
    if isinstance(value, tuple):
        value = " ".join(map(str, value))
    return f"(default: {value!r})" if value == "" else f"(default: {value})"


def build_parser() -> argparse.ArgumentParser:
    """The export.py flags: YOLOv5's names, each with its help text and ExportConfig default."""
    parser = new_parser("export.py", DESCRIPTION)
    for flags, options, help_text in FLAGS:
        field = flags[0].lstrip("-").replace("-", "_")
        parser.add_argument(*flags, dest=field, help=f"{help_text} {_default_text(field)}", **options)
    return parser


def _split_formats(include: Sequence[str]) -> list[str]:
    """--include onnx openvino, or --include onnx,openvino (both accepted)."""
    return [name.strip() for item in include for name in item.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    flags = given_flags(parser, argv)
    if "include" in flags:
        flags["include"] = _split_formats(flags["include"])

    def run() -> int:
        from detector.export import Exporter

        config = build_config(ExportConfig, ("command line", flags))
        results = Exporter(config).run()
        written = [str(r.path) for r in results if r.ok]
        print("exported: " + ", ".join(written))
        return 0

    return run_cli(run)
