"""Write a YOLO-format benchmark dataset of large images with small objects, for tiled training (--train-tile).

Each image (default 3000x2000) has a textured, cluttered background and 5-15 objects of 12-20 px: filled ellipses,
rectangles and triangles (the built-in dataset's shapes, :func:`detector.data.builtin.shape_mask`), each class in
its own saturated colour on a muted background. Shrunk whole to --img 640 those objects are 3-4 px and mostly
vanish; tiles at the original resolution keep them. Objects never overlap.

Usage::

    python scripts/make_large_images.py --out datasets/large                  # 60 train + 20 val, 3000x2000
    python scripts/make_large_images.py --out /tmp/large --train 4 --val 2 --width 1200 --height 800
    python train.py --data datasets/large/large.yaml --img 640 --train-tile 640 --weights yolov5n.pt --epochs 30
    python val.py --data datasets/large/large.yaml --img 640 --tile 640 --weights runs/train/exp/weights/best.pt

Layout::

    large.yaml                      path: ., train: images/train, val: images/val, names: [ellipse, rectangle, ...]
    images/{train,val}/NNNNNN.jpg   JPEG quality 90
    labels/{train,val}/NNNNNN.txt   YOLO rows: class x_center y_center width height (normalised)

Deterministic: one --seed gives identical files (image i of a split draws from ``default_rng((seed, split, i))``),
whatever --workers. Never imported by the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import yaml

from detector.data.builtin import BUILTIN_CLASSES, paint, shape_mask, texture, yolo_label_text

CLASS_NAMES = ("ellipse", "rectangle", "triangle")
BUILTIN_IDS = tuple(BUILTIN_CLASSES.index(name) for name in CLASS_NAMES)  # shape_mask's class indices
CLASS_COLOURS_BGR = ((40, 40, 230), (230, 90, 30), (30, 220, 240))  # red ellipses, blue rectangles, yellow triangles
COLOUR_JITTER = 20  # +/- per channel, so a class is one hue, not one exact colour
MARGIN = 3  # px kept free between objects
JPEG_QUALITY = 90
_PLACEMENT_TRIES = 50


def render_large_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    objects: tuple[int, int],
    object_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: (H, W, 3) uint8 BGR, (n, 4) float32 xyxy pixel boxes (tight around each object), (n,) int64 classes.

    The number of objects is drawn from ``objects`` (inclusive), each object's longer side from ``object_size``.
    """
    canvas = _background(rng, height, width)
    boxes: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        class_id = int(rng.integers(len(CLASS_NAMES)))
        mask = shape_mask(BUILTIN_IDS[class_id], float(rng.uniform(object_size[0], object_size[1])), rng)
        h, w = mask.shape
        for _ in range(_PLACEMENT_TRIES):
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if not any(_near((x, y, x + w, y + h), box) for box in boxes):
                break
        else:
            continue  # no free place: leave this object out
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        colour = np.clip(np.asarray(CLASS_COLOURS_BGR[class_id]) + jitter, 0, 255).astype(np.uint8)
        paint(canvas, mask, x, y, np.broadcast_to(colour, (h, w, 3)))
        boxes.append((x, y, x + w, y + h))
        classes.append(class_id)
    grain = rng.standard_normal((height, width, 1), np.float32) * np.float32(rng.uniform(2, 6))
    image = np.clip(canvas + grain, 0, 255).astype(np.uint8)
    return image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)


def _near(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two xyxy boxes overlap or come closer than MARGIN pixels."""
    return a[0] < b[2] + MARGIN and b[0] < a[2] + MARGIN and a[1] < b[3] + MARGIN and b[1] < a[3] + MARGIN


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted (low-saturation) smooth colour noise with textured patches and lines: clutter at every scale."""
    cells = rng.uniform(70, 180, (int(rng.integers(3, 12)), int(rng.integers(3, 12)), 1)).astype(np.float32)
    tint = rng.uniform(-15, 15, (1, 1, 3)).astype(np.float32)
    base = cv2.resize(cells, (width, height), interpolation=cv2.INTER_CUBIC)[..., None] + tint
    canvas = np.clip(base, 0, 255).astype(np.uint8)
    patches = int(rng.integers(20, 60) * height * width / 6e6)  # about 20-60 per 3000x2000
    for _ in range(patches):
        h, w = (int(v) for v in rng.integers(20, max(21, min(height, width) // 6), size=2))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        grey_a, grey_b = rng.uniform(60, 190, 1).repeat(3), rng.uniform(60, 190, 1).repeat(3)
        canvas[y : y + h, x : x + w] = texture(rng, h, w, grey_a + rng.uniform(-10, 10, 3), grey_b)
    for _ in range(int(rng.integers(10, 40))):
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        p2 = (int(rng.integers(width)), int(rng.integers(height)))
        grey = float(rng.uniform(40, 210))
        cv2.line(canvas, p1, p2, (grey, grey, grey), int(rng.integers(1, 4)), cv2.LINE_AA)
    return canvas


def _write_image(out: Path, args: argparse.Namespace, split: str, index: int) -> int:
    """Render and save image ``index`` of ``split``; returns its number of objects."""
    rng = np.random.default_rng((args.seed, 0 if split == "train" else 1, index))
    image, boxes, classes = render_large_image(
        rng, args.height, args.width, tuple(args.objects), tuple(args.object_size)
    )
    stem = f"{index:06d}"
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode image {split}/{stem}")
    (out / "images" / split / f"{stem}.jpg").write_bytes(encoded.tobytes())
    (out / "labels" / split / f"{stem}.txt").write_text(yolo_label_text(boxes, classes, args.width, args.height))
    return len(boxes)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; files inside are replaced)")
    parser.add_argument("--train", type=int, default=60, help="training images (default: 60)")
    parser.add_argument("--val", type=int, default=20, help="validation images (default: 20)")
    parser.add_argument("--width", type=int, default=3000, help="image width in pixels (default: 3000)")
    parser.add_argument("--height", type=int, default=2000, help="image height in pixels (default: 2000)")
    parser.add_argument(
        "--objects",
        type=int,
        nargs=2,
        default=(5, 15),
        metavar=("MIN", "MAX"),
        help="objects per image (default: 5 15)",
    )
    parser.add_argument(
        "--object-size",
        type=int,
        nargs=2,
        default=(12, 20),
        metavar=("MIN", "MAX"),
        help="longer side of an object in pixels (default: 12 20)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed: the same seed writes the same files (default: 0)"
    )
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads (default: CPUs, at most 8)"
    )
    args = parser.parse_args(argv)
    if min(args.train, args.val) < 0 or min(args.width, args.height) < 1 or args.workers < 1:
        parser.error("--train/--val must be >= 0, --width/--height/--workers >= 1")
    low, high = args.object_size
    if not 2 <= low <= high <= min(args.width, args.height) or not 0 <= args.objects[0] <= args.objects[1]:
        parser.error("--object-size MIN MAX: 2 <= MIN <= MAX <= the image's shorter side; --objects MIN <= MAX")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    start = time.perf_counter()
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    jobs = [("train", i) for i in range(args.train)] + [("val", i) for i in range(args.val)]
    # Threads: NumPy and OpenCV release the GIL in the heavy calls, and each image has its own generator.
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        counts = list(pool.map(lambda job: _write_image(out, args, *job), jobs))
    body = {"path": ".", "train": "images/train", "val": "images/val", "names": list(CLASS_NAMES)}
    header = (
        f"# Large-image benchmark dataset (scripts/make_large_images.py --seed {args.seed}): {args.width}x"
        f"{args.height} images with {args.objects[0]}-{args.objects[1]} objects of "
        f"{args.object_size[0]}-{args.object_size[1]} px each.\n"
    )
    yaml_path = out / "large.yaml"
    yaml_path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    print(
        f"{len(jobs)} images ({args.train} train, {args.val} val), {sum(counts)} objects, "
        f"in {time.perf_counter() - start:.1f} s: {yaml_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
