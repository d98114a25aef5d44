"""``python -m detector.prune`` (or ``detector prune``): network slimming's channel pruning (:mod:`detector.prune`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from detector.cli.common import program, run_cli
from detector.prune import MIN_CHANNELS, MIN_FRACTION

DESCRIPTION = """\
Remove the channels with the smallest BatchNorm scales |gamma| (network slimming, Liu et al. 2017): one global
threshold over every prunable channel (Conv, C3 and its bottlenecks, SPPF; residual streams pruned jointly), each
layer keeping at least --min-channels and --min-fraction of its channels. Train with --sparsity first so that
many gammas are near zero, then fine-tune the pruned model. Writes pruned.pt (a checkpoint that train.py, val.py,
detect.py and export.py take like any other) and pruned.yaml (its architecture, with explicit widths) into --out,
and prints the channels removed, parameters, GFLOPs and CPU latency before and after.

examples:
  python train.py --weights yolov5n.pt --data coco128.yaml --sparsity 1e-4 --epochs 30 --img 320
  python -m detector.prune --weights runs/train/exp/weights/best.pt --ratio 0.5 --img 320
  python train.py --weights runs/prune/exp/pruned.pt --data coco128.yaml --epochs 30 --img 320
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program("python -m detector.prune"),
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--weights", required=True, help="weights to prune: our .pt (EMA weights when present) or YOLOv5's"
    )
    parser.add_argument(
        "--ratio", type=float, default=0.5, help="fraction of the prunable channels to remove, in [0, 1) (default: 0.5)"
    )
    parser.add_argument(
        "--out",
        default="",
        help="output folder for pruned.pt and pruned.yaml (default: '' = runs/prune/exp, exp2, ...)",
    )
    parser.add_argument(
        "--min-channels",
        type=int,
        default=MIN_CHANNELS,
        help=f"channels every layer keeps at least (all when it has fewer) (default: {MIN_CHANNELS})",
    )
    parser.add_argument(
        "--min-fraction",
        type=float,
        default=MIN_FRACTION,
        help=f"fraction of its channels every layer keeps at least (default: {MIN_FRACTION})",
    )
    parser.add_argument(
        "--imgsz",
        "--img",
        "--img-size",
        type=int,
        default=640,
        help="image size of the GFLOPs and latency figures (default: 640)",
    )
    parser.add_argument(
        "--latency-runs",
        type=int,
        default=10,
        help="timed CPU forwards (batch 1, fused) of each model for the latency figures; 0 = skip (default: 10)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0 when pruned.pt is written, 2 with one ``error:`` line otherwise."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from detector.prune import prune_weights

        path, _ = prune_weights(
            args.weights,
            args.ratio,
            out=args.out,
            min_channels=args.min_channels,
            min_fraction=args.min_fraction,
            imgsz=args.imgsz,
            latency_runs=args.latency_runs,
        )
        print(f"pruned: {path}")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
