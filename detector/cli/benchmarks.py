"""``detector benchmarks`` / ``python -m detector.cli.benchmarks``: YOLOv5's benchmarks.py flags ->
BenchmarkConfig -> :func:`detector.export.benchmarks.run_benchmarks`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from detector.cli.common import default_help, given_flags, new_parser, run_cli
from detector.config import BenchmarkConfig, build_config

DESCRIPTION = """Export a .pt to each deployment format, validate every file and time it on this machine: one table of
format, precision, size, mAP50, mAP50-95, inference ms/image and export time (YOLOv5's benchmarks.py).

examples:
  python -m detector.cli.benchmarks --weights yolov5n.pt --data coco128.yaml --img 640     # fp32, batch 1
  detector benchmarks --weights best.pt --data mydata.yaml --int8 --include onnx openvino   # int8 files
  detector benchmarks --weights best.pt --data mydata.yaml --batch-size 16                  # throughput
"""

DEFAULTS = BenchmarkConfig()
_default = default_help(DEFAULTS)  # " (default: X)" in each flag's help


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("detector benchmarks", DESCRIPTION)
    add = parser.add_argument
    add("--weights", type=str, help="the .pt to export: ours or YOLOv5's" + _default("weights"))
    add("--data", type=str, help="dataset YAML to validate on; '' = the built-in dataset" + _default("data"))
    add("--imgsz", "--img", "--img-size", type=int, dest="imgsz", help="image size in pixels" + _default("imgsz"))
    add(
        "--batch-size",
        type=int,
        dest="batch_size",
        help="export and validation batch: 1 times latency, more times throughput" + _default("batch_size"),
    )
    add("--device", type=str, help="cpu, or a CUDA device such as 0" + _default("device"))
    add(
        "--half",
        action="store_true",
        help="fp16 exports, each run as val.py --half runs it (OpenVINO in bf16 on CPUs with native bf16); "
        "the .pt row stays fp32" + _default("half"),
    )
    add(
        "--int8",
        action="store_true",
        help="int8 exports (ONNX Runtime, OpenVINO), calibrated on --data" + _default("int8"),
    )
    add("--include", nargs="+", type=str, help="formats to export" + _default("include"))
    add(
        "--hard-fail",
        action="store_true",
        dest="hard_fail",
        help="stop at the first format that cannot be exported or validated" + _default("hard_fail"),
    )
    add("--project", type=str, help="save results to project/name" + _default("project"))
    add("--name", type=str, help="save results to project/name" + _default("name"))
    add("--exist-ok", action="store_true", dest="exist_ok", help="reuse project/name" + _default("exist_ok"))
    return parser


def build_benchmark_config(argv: Sequence[str] | None = None) -> BenchmarkConfig:
    return build_config(BenchmarkConfig, ("command line", given_flags(build_parser(), argv)))


def main(argv: Sequence[str] | None = None) -> int:
    def run() -> int:
        config = build_benchmark_config(argv)
        from detector.export.benchmarks import run_benchmarks

        run_benchmarks(config)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
