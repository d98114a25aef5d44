"""How far one model's raw predictions lie from another's on a dataset's images: the error an export adds (int8,
fp16, bf16, a pruned or distilled copy), measured without labels and far less noisy than mAP on a few hundred images.

    python scripts/compare_outputs.py --reference yolov5n.onnx --candidate int8/yolov5n.onnx --data coco128.yaml
    python scripts/compare_outputs.py --reference yolov5n.pt --candidate yolov5n_openvino_model --half --img 320

Both models run on the same letterboxed validation images (square, --img, as --int8 calibrates) and must give raw
predictions with the same anchors (no NMS in the graph). An anchor counts where the reference's score (objectness x
its best class probability) exceeds --min-score; for those it prints the mean and largest |difference| of the score
and the mean |difference| of the box (x, y, w, h in input pixels). The README's int8 figures ("score error") are
these numbers at --min-score 0.05 on coco128's 128 images.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from detector.cli.common import run_cli
from detector.errors import ConfigError

DEFAULT_MIN_SCORE = 0.05


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare_outputs.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", required=True, help="weights whose predictions are the reference (any format)")
    parser.add_argument("--candidate", required=True, help="weights compared with them (any format)")
    parser.add_argument("--data", default="", help="dataset YAML whose validation images are used (default: built-in)")
    parser.add_argument("--img", type=int, default=640, help="square input size in pixels (default: 640)")
    parser.add_argument("--limit", type=int, default=128, help="at most this many images (default: 128)")
    parser.add_argument(
        "--min-score",
        type=float,
        default=DEFAULT_MIN_SCORE,
        help=f"anchors whose reference score exceeds this are compared (default: {DEFAULT_MIN_SCORE})",
    )
    parser.add_argument("--half", action="store_true", help="run the candidate in half precision (bf16 on a CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, 0, ... (default: cpu)")
    return parser


def scores(predictions: Tensor) -> Tensor:
    """(..., 5 + nc) raw predictions -> (...) objectness times the best class probability."""
    return predictions[..., 4] * predictions[..., 5:].amax(-1)


def prediction_errors(reference: Tensor, candidate: Tensor, min_score: float) -> dict[str, float]:
    """Sums over the anchors where ``reference`` (B, N, 5 + nc) scores above ``min_score``: ``anchors`` (their
    count), ``score`` (sum of |Δ score|), ``box`` (sum of the mean |Δ| of x, y, w, h), ``max_score`` (largest
    |Δ score|); :func:`summary` turns sums of several batches into means."""
    if reference.shape != candidate.shape:
        raise ConfigError(
            f"the models predict different shapes on the same input: {tuple(reference.shape)} and "
            f"{tuple(candidate.shape)} (same anchors and classes needed, no NMS in the graph)"
        )
    reference_scores = scores(reference)
    kept = reference_scores > min_score
    score_difference = (reference_scores - scores(candidate)).abs()[kept]
    box_difference = (reference[..., :4] - candidate[..., :4]).abs().mean(-1)[kept]
    return {
        "anchors": float(kept.sum()),
        "score": float(score_difference.sum()),
        "box": float(box_difference.sum()),
        "max_score": float(score_difference.max()) if len(score_difference) else 0.0,
    }


def summary(totals: dict[str, float]) -> dict[str, float]:
    """Means per compared anchor from the sums of :func:`prediction_errors`."""
    count = max(totals["anchors"], 1.0)
    return {
        "anchors": totals["anchors"],
        "score": totals["score"] / count,
        "box": totals["box"] / count,
        "max_score": totals["max_score"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.img <= 0 or args.limit <= 0 or not 0 <= args.min_score < 1:
        raise ConfigError("--img and --limit must be positive and --min-score in [0, 1)")
    from detector.engine.backends import load_backend
    from detector.export.base import letterboxed_input, validation_images

    reference = load_backend(args.reference, args.device)
    candidate = load_backend(args.candidate, args.device, half=args.half)
    for model in (reference, candidate):
        if model.end2end:
            raise ConfigError(f"{model.weights}: its graph ends in NMS; compare exports without --nms")
    stride = max(reference.stride, candidate.stride)
    if args.img % stride:
        raise ConfigError(f"--img {args.img} is not a multiple of the models' stride {stride}")
    totals = {"anchors": 0.0, "score": 0.0, "box": 0.0, "max_score": 0.0}
    images = validation_images(args.data, args.limit)
    for image in images:
        batch = torch.from_numpy(letterboxed_input(image, (args.img, args.img), stride))[None]
        errors = prediction_errors(reference(batch).cpu(), candidate(batch).cpu(), args.min_score)
        totals = {
            key: max(totals[key], value) if key == "max_score" else totals[key] + value for key, value in errors.items()
        }
    means = summary(totals)
    print(
        f"{len(images)} images at {args.img}, {int(means['anchors'])} anchors scoring over {args.min_score} in "
        f"{args.reference}: score mean |Δ| {means['score']:.5f} (max {means['max_score']:.4f}), "
        f"box mean |Δ| {means['box']:.3f} px ({args.candidate})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
