"""``detect.py``: YOLOv5's detection flags -> DetectConfig -> :func:`detector.engine.predictor.run_detect`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from detector.cli.common import OneOrMany, default_help, given_flags, new_parser, run_cli
from detector.config import DetectConfig, build_config
from detector.engine.sources import open_source

DESCRIPTION = """Detect objects in images, videos, folders, webcams and streams; YOLOv5's flags.

sources:
  --source img.jpg | folder/ | 'images/*.jpg' | list.txt | video.mp4 | 0 (webcam) | rtsp://... | list.streams
examples:
  python detect.py --weights yolov5n.pt --source data/images            # annotated copies in runs/detect/exp
  python detect.py --weights best.onnx --source video.mp4 --vid-stride 2  # every 2nd frame, re-encoded mp4
  python detect.py --weights best.pt --source img.jpg --save-txt --save-conf --nosave   # YOLO label files only
  python detect.py --weights yolov5n_openvino_model --source 0 --view-img            # webcam, on screen
  python detect.py --weights best.pt --source 4k_photos/ --tile 640 --tile-full   # small objects in big images
"""

DEFAULTS = DetectConfig()
_default = default_help(DEFAULTS)  # " (default: X)" in each flag's help


def build_parser() -> argparse.ArgumentParser:
    """The detect.py parser: every flag shows its default; absent flags do not override the config."""
    parser = new_parser("detect.py", DESCRIPTION)
    add = parser.add_argument
    add(
        "--weights",
        nargs="+",
        action=OneOrMany,
        help="model: .pt (ours or YOLOv5's), .torchscript, .onnx, *_openvino_model/, .engine; several = an ensemble, "
        "their boxes joined before NMS" + _default("weights"),
    )
    add(
        "--source",
        type=str,
        help="image, folder, glob, .txt list, video, webcam index, rtsp/rtmp/http URL or .streams list"
        + _default("source"),
    )
    add("--data", type=str, help="dataset YAML for class names when the weights store none" + _default("data"))
    add(
        "--imgsz",
        "--img",
        "--img-size",
        nargs="+",
        type=int,
        dest="imgsz",
        help="inference size: one number, or height width" + _default("imgsz"),
    )
    add("--conf-thres", type=float, dest="conf_thres", help="confidence threshold" + _default("conf_thres"))
    add("--iou-thres", type=float, dest="iou_thres", help="NMS IoU threshold" + _default("iou_thres"))
    add("--max-det", type=int, dest="max_det", help="maximum detections per image" + _default("max_det"))
    add("--device", type=str, help="cuda device, i.e. 0 or cpu; '' = CUDA 0 if present, else CPU" + _default("device"))
    add("--view-img", action="store_true", dest="view_img", help="show results in a window" + _default("view_img"))
    add("--save-txt", action="store_true", dest="save_txt", help="save YOLO label files" + _default("save_txt"))
    add(
        "--save-conf",
        action="store_true",
        dest="save_conf",
        help="add confidences to --save-txt labels" + _default("save_conf"),
    )
    add(
        "--save-crop",
        action="store_true",
        dest="save_crop",
        help="save each detection's crop to crops/<class>/" + _default("save_crop"),
    )
    add(
        "--save-format",
        type=int,
        choices=[0, 1],
        dest="save_format",
        help="--save-txt boxes: 0 = YOLO (x_center y_center width height), 1 = Pascal-VOC corners (x1 y1 x2 y2), "
        "both normalised 0-1" + _default("save_format"),
    )
    add(
        "--save-csv",
        action="store_true",
        dest="save_csv",
        help="save every detection to predictions.csv (image, frame, class, confidence, x1 y1 x2 y2 pixels)"
        + _default("save_csv"),
    )
    add("--nosave", action="store_true", help="do not save annotated images/videos" + _default("nosave"))
    add(
        "--classes",
        nargs="+",
        type=int,
        help="keep only these class ids, e.g. --classes 0 or --classes 0 2 3 (default: all)",
    )
    add(
        "--agnostic-nms",
        action="store_true",
        dest="agnostic_nms",
        help="class-agnostic NMS" + _default("agnostic_nms"),
    )
    add("--augment", action="store_true", help="test-time augmentation (scales + flip)" + _default("augment"))
    add(
        "--visualize",
        action="store_true",
        help="save each layer's feature maps (first 32 channels as PNG, all as .npy) per image in <run>/<image>/; "
        ".pt models" + _default("visualize"),
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
        "--line-thickness",
        type=int,
        dest="line_thickness",
        help="bounding box thickness in pixels" + _default("line_thickness"),
    )
    add("--hide-labels", action="store_true", dest="hide_labels", help="draw boxes only" + _default("hide_labels"))
    add(
        "--hide-conf",
        action="store_true",
        dest="hide_conf",
        help="labels without confidences" + _default("hide_conf"),
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
    add(
        "--vid-stride",
        type=int,
        dest="vid_stride",
        help="keep every n-th video/stream frame" + _default("vid_stride"),
    )
    add_tile_flags(parser, _default)
    return parser


def add_tile_flags(parser: argparse.ArgumentParser, default: Callable[[str], str]) -> None:
    """--tile and its companions, the same in detect.py and val.py; ``default(name)`` is the help's default text."""
    add = parser.add_argument
    add(
        "--tile",
        type=int,
        metavar="SIZE",
        help="predict each image at its original resolution in overlapping SIZE x SIZE pixel tiles, each at --imgsz "
        "(small objects in large images); 0 = off" + default("tile"),
    )
    add(
        "--tile-overlap",
        type=float,
        dest="tile_overlap",
        help="overlap of neighbouring tiles, as a fraction of the tile in [0, 1)" + default("tile_overlap"),
    )
    add(
        "--tile-full",
        action="store_true",
        dest="tile_full",
        help="with --tile: also predict on the whole downscaled image, for objects larger than a tile"
        + default("tile_full"),
    )
    add(
        "--tile-merge",
        choices=["nms", "nmm"],
        dest="tile_merge",
        help="joining the tiles' boxes: nms keeps the best of matching boxes, nmm merges them into their union box"
        + default("tile_merge"),
    )
    add(
        "--tile-match",
        choices=["iou", "ios"],
        dest="tile_match",
        help="boxes of one class match by IoU, or by ios = intersection over the smaller box (pairs a box cut at a "
        "tile border with its whole neighbour)" + default("tile_match"),
    )
    add(
        "--tile-match-thres",
        type=float,
        dest="tile_match_thres",
        help="boxes match above this IoU/IoS" + default("tile_match_thres"),
    )


def build_detect_config(argv: Sequence[str] | None = None) -> DetectConfig:
    """DetectConfig from defaults <- the flags typed on the command line."""
    return build_config(DetectConfig, ("command line", given_flags(build_parser(), argv)))


def main(argv: Sequence[str] | None = None) -> int:
    def detect() -> int:
        config = build_detect_config(argv)
        # The source is opened before torch is even imported, so a mistyped path fails in a fraction of a second.
        source = open_source(config.source, config.vid_stride)
        from detector.engine.predictor import run_detect

        run_detect(config, source)
        return 0

    return run_cli(detect)
