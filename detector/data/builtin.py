"""The built-in dataset: synthetic shapes on cluttered backgrounds, generated on first use, in YOLO format.

``python train.py`` and ``python val.py`` without ``--data`` use it, so a fresh machine can train and validate with
no download. It is a real detection problem, not a toy: 8 classes told apart only by SHAPE (colour and texture are
random and shared with non-object clutter), sizes from 10 px to half the image, aspect ratios and rotations per
class, overlaps up to 70 % occlusion (the box stays the object's full extent, as in COCO), textured and cluttered
backgrounds, and images of 240-480 px with varied aspect ratios. An untrained model scores ~0 mAP.

Layout (``cache_dir()/datasets/shapes-v1``)::

    shapes.yaml                         dataset YAML (path: ., train: images/train, val: images/val, names: [...])
    images/{train,val}/NNNNNN.jpg       JPEG quality 90
    labels/{train,val}/NNNNNN.txt       YOLO rows: class x_center y_center width height (normalised 0-1)
    annotations/instances_val.json      the val labels as COCO JSON (category_id = class index) for pycocotools

Generation is deterministic: one seed gives byte-identical files (each image draws from its own
``np.random.default_rng((seed, split, index))``). It writes into a hidden temporary folder renamed into place at
the end, so an interrupted run is never mistaken for a finished one; the version in the folder name makes a
changed generator produce a new folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from detector.errors import DataError
from detector.utils.files import cache_dir

LOGGER = logging.getLogger(__name__)

BUILTIN_VERSION = "shapes-v1"  # bump when the generator's output changes, so caches regenerate
BUILTIN_CLASSES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "star", "cross", "ring", "diamond", "arrow")
BUILTIN_SEED = 0
NUM_TRAIN_IMAGES = 400
NUM_VAL_IMAGES = 100
VAL_ID_OFFSET = 100_000  # val image stems start here, so train and val image ids never collide

IMAGE_SIDE_RANGE = (240, 480)  # height and width drawn independently: aspect ratios 1:2 to 2:1
OBJECTS_PER_IMAGE = (1, 10)
MIN_OBJECT_SIZE = 10  # px, longer side; the largest is half the image's shorter side
MIN_VISIBLE_FRACTION = 0.3  # an object may be at most 70 % hidden by objects drawn over it
MIN_CONTRAST = 90.0  # Euclidean RGB distance between an object's main colour and the background under it
JPEG_QUALITY = 90
_PLACEMENT_TRIES = 12
_STALE_PARTIAL_S = 3600  # unfinished generations older than this are removed


# --------------------------------------------------------------------------------------------------------------------
# Public entry points


def builtin_dataset_dir(
    num_train: int = NUM_TRAIN_IMAGES, num_val: int = NUM_VAL_IMAGES, seed: int = BUILTIN_SEED
) -> Path:
    """Cache folder of the built-in dataset; non-default sizes or seeds get their own folder."""
    name = BUILTIN_VERSION
    if (num_train, num_val, seed) != (NUM_TRAIN_IMAGES, NUM_VAL_IMAGES, BUILTIN_SEED):
        name = f"{BUILTIN_VERSION}-n{num_train}-{num_val}-seed{seed}"
    return cache_dir() / "datasets" / name


def ensure_builtin_dataset(
    root: str | Path | None = None,
    *,
    num_train: int = NUM_TRAIN_IMAGES,
    num_val: int = NUM_VAL_IMAGES,
    seed: int = BUILTIN_SEED,
    progress: bool = True,
) -> Path:
    """Path of the built-in dataset's ``shapes.yaml``, generating the dataset first if it is not there yet.

    Args:
        root: dataset folder; default :func:`builtin_dataset_dir` (under ``$DETECTOR_CACHE`` or ``~/.cache``).
        num_train, num_val: number of images per split (tests use a handful).
        seed: generator seed; the same seed gives byte-identical files.
    """
    root = Path(root) if root is not None else builtin_dataset_dir(num_train, num_val, seed)
    yaml_path = root / "shapes.yaml"
    if yaml_path.is_file():
        return yaml_path
    if root.exists():
        raise DataError(f"{root}: exists but holds no shapes.yaml (not a finished built-in dataset); remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    partial = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.partial-"))
    try:
        LOGGER.info("generating the built-in dataset (%d train + %d val images) in %s", num_train, num_val, root)
        generate_builtin_dataset(partial, num_train=num_train, num_val=num_val, seed=seed, progress=progress)
        try:
            partial.rename(root)
        except OSError:
            if not yaml_path.is_file():  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return yaml_path


def generate_builtin_dataset(
    out_dir: str | Path,
    *,
    num_train: int = NUM_TRAIN_IMAGES,
    num_val: int = NUM_VAL_IMAGES,
    seed: int = BUILTIN_SEED,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the dataset into ``out_dir`` (not atomically; see :func:`ensure_builtin_dataset`). Returns the YAML.

    ``workers`` threads render images in parallel (default: the CPU count, at most 8). The output does not depend
    on it: every image has its own random generator and file.
    """
    out_dir = Path(out_dir)
    jobs = [("train", i, i) for i in range(num_train)] + [("val", i, VAL_ID_OFFSET + i) for i in range(num_val)]
    for split in ("train", "val"):
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        (out_dir / "labels" / split).mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    # Threads, not processes: NumPy and OpenCV release the GIL in the heavy calls, and nothing needs pickling.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda job: _write_image(out_dir, seed, *job), jobs)
        records = list(tqdm(results, total=len(jobs), desc="built-in dataset", unit="img", disable=not progress))
    coco = _CocoWriter(BUILTIN_CLASSES)
    for (split, _, image_id), record in zip(jobs, records, strict=True):
        if split == "val":
            coco.add_image(image_id, *record)
    (out_dir / "annotations").mkdir(exist_ok=True)
    (out_dir / "annotations" / "instances_val.json").write_text(json.dumps(coco.to_dict()))
    return _write_yaml(out_dir, seed)


def _write_image(
    out_dir: Path, seed: int, split: str, index: int, image_id: int
) -> tuple[str, int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Render and save image ``index`` of ``split``; returns (file name, width, height, boxes, classes, areas)."""
    rng = np.random.default_rng((seed, 0 if split == "train" else 1, index))
    height, width = (int(v) for v in rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1, size=2))
    image, boxes_xyxy, classes, areas = render_image(rng, height, width)
    stem = f"{image_id:06d}"
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok, "OpenCV failed to encode a JPEG"  # an internal invariant: the array is always valid uint8 BGR
    (out_dir / "images" / split / f"{stem}.jpg").write_bytes(encoded.tobytes())
    (out_dir / "labels" / split / f"{stem}.txt").write_text(yolo_label_text(boxes_xyxy, classes, width, height))
    return f"{stem}.jpg", width, height, boxes_xyxy, classes, areas


def yolo_label_text(boxes_xyxy: np.ndarray, classes: np.ndarray, width: int, height: int) -> str:
    """YOLO label file content: one ``class xc yc w h`` row per box, normalised, 6 decimals."""
    rows = []
    for (x1, y1, x2, y2), c in zip(boxes_xyxy.tolist(), classes.tolist(), strict=True):
        xc, yc = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        rows.append(f"{c} {xc:.6f} {yc:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
    return "".join(rows)


# --------------------------------------------------------------------------------------------------------------------
# One image


def render_image(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image with its objects.

    Returns:
        image: (H, W, 3) uint8 BGR.
        boxes_xyxy: (n, 4) float32 pixel boxes, each the full extent of its object (occluded parts included).
        classes: (n,) int64 indices into :data:`BUILTIN_CLASSES`.
        areas: (n,) float32 object areas in pixels (the whole shape, for COCO's small/medium/large).
    """
    canvas = _background(rng, height, width)
    owner = np.full((height, width), -1, np.int32)  # index of the object visible at each pixel, -1 = background
    areas: list[int] = []
    boxes: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    max_size = min(height, width) / 2
    for _ in range(int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))):
        class_id = int(rng.integers(len(BUILTIN_CLASSES)))
        size = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(max_size)))
        mask = shape_mask(class_id, size, rng)
        position = _place(mask, owner, areas, rng)
        if position is None:  # every try would hide an earlier object too much: leave this one out
            continue
        x, y = position
        h, w = mask.shape
        paint(canvas, mask, x, y, _fill_for(canvas, mask, x, y, rng))
        owner[y : y + h, x : x + w][mask] = len(areas)
        areas.append(int(mask.sum()))
        boxes.append((x, y, x + w, y + h))
        classes.append(class_id)
    visible = np.bincount(owner.ravel() + 1, minlength=len(areas) + 1)[1:]
    keep = [i for i, area in enumerate(areas) if visible[i] >= MIN_VISIBLE_FRACTION * area]
    image = _camera(canvas, rng)
    return (
        image,
        np.asarray([boxes[i] for i in keep], np.float32).reshape(-1, 4),
        np.asarray([classes[i] for i in keep], np.int64),
        np.asarray([areas[i] for i in keep], np.float32),
    )


def _place(mask: np.ndarray, owner: np.ndarray, areas: list[int], rng: np.random.Generator) -> tuple[int, int] | None:
    """A top-left corner where ``mask`` fits inside the image and leaves every earlier object >= 30 % visible."""
    height, width = owner.shape
    h, w = mask.shape
    for _ in range(_PLACEMENT_TRIES):
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        covered = owner[y : y + h, x : x + w][mask]
        covered = covered[covered >= 0]
        if covered.size == 0:
            return x, y
        lost = np.bincount(covered, minlength=len(areas))
        visible = np.bincount(owner.ravel() + 1, minlength=len(areas) + 1)[1:]
        if np.all(visible - lost >= MIN_VISIBLE_FRACTION * np.asarray(areas)):
            return x, y
    return None


def paint(canvas: np.ndarray, mask: np.ndarray, x: int, y: int, fill: np.ndarray) -> None:
    """Copy ``fill`` (h, w, 3) uint8 into ``canvas`` (H, W, 3) where ``mask`` (h, w) bool is set, at (x, y)."""
    h, w = mask.shape
    region = canvas[y : y + h, x : x + w]
    region[mask] = fill[mask]


# --------------------------------------------------------------------------------------------------------------------
# Shapes: a tight boolean mask per class


@dataclass(frozen=True)
class _ShapeSpec:
    """How one class varies: its outline(s) in unit coordinates, aspect-ratio range and rotation range."""

    outline: Callable[[np.random.Generator], list[tuple[np.ndarray, bool]]]  # [(points (k, 2), filled?)]
    aspect: tuple[float, float]  # y-stretch drawn log-uniformly in this range
    rotation: float  # max |rotation| in degrees (180 = any)


def _circle(radius: float = 1.0, points: int = 72) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return radius * np.stack([np.cos(angles), np.sin(angles)], 1)


def _star(rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    inner = rng.uniform(0.38, 0.55)
    angles = np.arange(10) * np.pi / 5 - np.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return [(np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1), True)]


def _cross(rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    t = rng.uniform(0.22, 0.38)  # half the arm thickness
    points = [
        (-t, -1),
        (t, -1),
        (t, -t),
        (1, -t),
        (1, t),
        (t, t),
        (t, 1),
        (-t, 1),
        (-t, t),
        (-1, t),
        (-1, -t),
        (-t, -t),
    ]
    return [(np.asarray(points, float), True)]


def _triangle(rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    return [(np.asarray([(rng.uniform(-0.6, 0.6), -1.0), (1.0, 1.0), (-1.0, 1.0)]), True)]


def _arrow(rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    shaft, head, neck = rng.uniform(0.15, 0.28), rng.uniform(0.5, 0.75), rng.uniform(0.0, 0.35)
    points = [(-1, -shaft), (neck, -shaft), (neck, -head), (1, 0), (neck, head), (neck, shaft), (-1, shaft)]
    return [(np.asarray(points, float), True)]


_SHAPES: dict[str, _ShapeSpec] = {
    "ellipse": _ShapeSpec(lambda rng: [(_circle(), True)], (0.5, 2.0), 180),
    "rectangle": _ShapeSpec(
        lambda rng: [(np.asarray([(-1, -1), (1, -1), (1, 1), (-1, 1)], float), True)], (0.33, 3.0), 15
    ),
    "triangle": _ShapeSpec(_triangle, (0.6, 1.6), 180),
    "star": _ShapeSpec(_star, (0.8, 1.25), 180),
    "cross": _ShapeSpec(_cross, (0.75, 1.33), 180),
    "ring": _ShapeSpec(lambda rng: [(_circle(), True), (_circle(rng.uniform(0.45, 0.68)), False)], (0.6, 1.6), 180),
    # Diamonds stay near vertex-up and rectangles near axis-aligned: a square is a diamond only when turned 35-55 deg.
    "diamond": _ShapeSpec(lambda rng: [(np.asarray([(0, -1), (1, 0), (0, 1), (-1, 0)], float), True)], (0.45, 2.2), 10),
    "arrow": _ShapeSpec(_arrow, (0.7, 1.4), 180),
}
assert tuple(_SHAPES) == BUILTIN_CLASSES


def shape_mask(class_id: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """A tight (h, w) bool mask of one object of class ``class_id`` whose longer side is about ``size`` pixels.

    Tight means the first and last row and column each hold a set pixel, so the object's box in an image is
    exactly ``(x, y, x + w, y + h)`` where it is painted at (x, y).
    """
    spec = _SHAPES[BUILTIN_CLASSES[class_id]]
    outlines = spec.outline(rng)
    stretch = math.exp(rng.uniform(math.log(spec.aspect[0]), math.log(spec.aspect[1])))
    angle = math.radians(rng.uniform(-spec.rotation, spec.rotation))
    rotation = np.asarray([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    transformed = [((points * (1.0, stretch)) @ rotation.T, filled) for points, filled in outlines]
    every_point = np.concatenate([points for points, _ in transformed])
    low, high = every_point.min(0), every_point.max(0)
    scale = (size - 1) / max(high - low)
    subpixel = 16  # cv2.fillPoly with shift=4 draws at 1/16-pixel precision, so small shapes keep their form
    w, h = (np.ceil((high - low) * scale).astype(int) + 1).tolist()
    mask = np.zeros((h + 2, w + 2), np.uint8)
    for points, filled in transformed:
        pixels = np.round(((points - low) * scale + 0.5) * subpixel).astype(np.int32)
        cv2.fillPoly(mask, [pixels], 1 if filled else 0, lineType=cv2.LINE_8, shift=4)
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(bool)


# --------------------------------------------------------------------------------------------------------------------
# Colours, textures, backgrounds


def _random_colour(rng: np.random.Generator, away_from: np.ndarray, min_distance: float) -> np.ndarray:
    """A random BGR colour at least ``min_distance`` from ``away_from`` (its complement when none is found)."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - away_from) >= min_distance:
            return colour
    return 255.0 - away_from


def texture(rng: np.random.Generator, h: int, w: int, colour_a: np.ndarray, colour_b: np.ndarray) -> np.ndarray:
    """An (h, w, 3) uint8 fill: solid, stripes, checker, noise or gradient, mixing two BGR colours."""
    kind = rng.integers(5)
    ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    if kind == 0:  # solid
        weight = np.zeros((h, w), np.float32)
    elif kind == 1:  # stripes at a random angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        weight = (((xs * np.cos(angle) + ys * np.sin(angle)) / period) % 1.0 < 0.5).astype(np.float32)
    elif kind == 2:  # checker
        cell = int(rng.integers(3, 9))
        weight = ((xs // cell + ys // cell) % 2).astype(np.float32)
    elif kind == 3:  # per-pixel noise around colour a
        fill = colour_a.astype(np.float32) + rng.standard_normal((h, w, 3), np.float32) * rng.uniform(10, 30)
        return np.clip(fill, 0, 255).astype(np.uint8)
    else:  # linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        weight = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    weight = weight[..., None]
    fill = colour_a.astype(np.float32) * (1 - weight) + colour_b.astype(np.float32) * weight
    return np.clip(fill, 0, 255).astype(np.uint8)


def _fill_for(canvas: np.ndarray, mask: np.ndarray, x: int, y: int, rng: np.random.Generator) -> np.ndarray:
    """A texture for an object at (x, y) whose colours stand out from the background under it."""
    h, w = mask.shape
    under = canvas[y : y + h, x : x + w][mask].mean(0)
    colour_a = _random_colour(rng, under, MIN_CONTRAST)
    colour_b = _random_colour(rng, under, MIN_CONTRAST * 0.6)
    return texture(rng, h, w, colour_a, colour_b)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 BGR: a gradient or smooth colour noise, fine noise, then lines, curves and blobs.

    The clutter reuses the objects' textures and colours so that only shape tells an object from the background.
    """
    if rng.random() < 0.5:
        ys, xs = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        weight = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0))[..., None]
        start, stop = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        base = start * (1 - weight) + stop * weight
    else:
        cells = rng.uniform(0, 255, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3)).astype(np.float32)
        base = cv2.resize(cells, (width, height), interpolation=cv2.INTER_CUBIC)
    canvas = np.clip(base, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 6))):
        _draw_blob(canvas, rng)
    for _ in range(int(rng.integers(0, 4))):
        _draw_curve(canvas, rng)
    for _ in range(int(rng.integers(0, 12))):
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        p2 = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.line(canvas, p1, p2, rng.uniform(0, 255, 3).tolist(), int(rng.integers(1, 4)), cv2.LINE_AA)
    return canvas


def _draw_blob(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """An irregular wavy blob (radius varying with low harmonics): not any class's outline."""
    height, width = canvas.shape[:2]
    radius = rng.uniform(0.05, 0.3) * min(height, width)
    angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    wobble = sum(rng.uniform(0.15, 0.3) * np.sin(k * angles + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    wobble = wobble + rng.uniform(0.05, 0.12) * np.sin(int(rng.integers(4, 7)) * angles + rng.uniform(0, 2 * np.pi))
    r = radius * (1 + wobble)
    centre = rng.uniform((0, 0), (width, height))
    points = np.stack([centre[0] + r * np.cos(angles), centre[1] + r * np.sin(angles) * rng.uniform(0.5, 1.0)], 1)
    x1, y1 = np.floor(points.min(0)).astype(int)
    x2, y2 = np.ceil(points.max(0)).astype(int) + 1
    local = np.zeros((y2 - y1, x2 - x1), np.uint8)
    cv2.fillPoly(local, [np.round(points - (x1, y1)).astype(np.int32)], 1)
    fill = texture(rng, *local.shape, rng.uniform(0, 255, 3), rng.uniform(0, 255, 3))
    # Clip the blob's box to the canvas; blobs may run off the edges.
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if cx2 <= cx1 or cy2 <= cy1:
        return
    crop = (slice(cy1 - y1, cy2 - y1), slice(cx1 - x1, cx2 - x1))
    region = canvas[cy1:cy2, cx1:cx2]
    region[local[crop].astype(bool)] = fill[crop][local[crop].astype(bool)]


def _draw_curve(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A thick smooth random curve (a sine-modulated polyline)."""
    height, width = canvas.shape[:2]
    start, end = rng.uniform((0, 0), (width, height)), rng.uniform((0, 0), (width, height))
    t = np.linspace(0, 1, 40)[:, None]
    normal = np.asarray([-(end - start)[1], (end - start)[0]]) / (np.linalg.norm(end - start) + 1e-6)
    bend = rng.uniform(10, 60) * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 2 * np.pi))
    points = start + (end - start) * t + normal * bend
    thickness = int(rng.integers(2, 7))
    cv2.polylines(
        canvas, [np.round(points).astype(np.int32)], False, rng.uniform(0, 255, 3).tolist(), thickness, cv2.LINE_AA
    )


def _camera(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild blur and sensor noise on the finished picture, as a real camera adds."""
    image = canvas
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 0.9))
    # One noise value per pixel for all three channels: sensor-like grain at a third of the cost.
    noise = rng.standard_normal((*image.shape[:2], 1), np.float32) * np.float32(rng.uniform(1, 10))
    return np.clip(image + noise, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Files


class _CocoWriter:
    """Collects images and boxes into a COCO detection JSON (bbox = [x, y, w, h] pixels)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(names)]

    def add_image(
        self,
        image_id: int,
        file_name: str,
        width: int,
        height: int,
        boxes: np.ndarray,
        classes: np.ndarray,
        areas: np.ndarray,
    ) -> None:
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for (x1, y1, x2, y2), c, area in zip(boxes.tolist(), classes.tolist(), areas.tolist(), strict=True):
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": c,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": area,
                    "iscrowd": 0,
                }
            )

    def to_dict(self) -> dict:
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}


def _write_yaml(out_dir: Path, seed: int) -> Path:
    header = (
        f"# Built-in synthetic detection dataset {BUILTIN_VERSION} (seed {seed}), generated by detector.data.builtin.\n"
        "# COCO JSON category_id = class index (0-based).\n"
    )
    body = {
        "path": ".",
        "train": "images/train",
        "val": "images/val",
        "annotations": "annotations/instances_val.json",
        "names": list(BUILTIN_CLASSES),
    }
    path = out_dir / "shapes.yaml"
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return path


def _remove_stale_partials(root: Path) -> None:
    """Delete unfinished generations of ``root`` left by killed processes (older than an hour)."""
    now = time.time()
    for partial in root.parent.glob(f".{root.name}.partial-*"):
        try:
            if now - partial.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            continue


__all__ = [
    "BUILTIN_CLASSES",
    "BUILTIN_VERSION",
    "builtin_dataset_dir",
    "ensure_builtin_dataset",
    "generate_builtin_dataset",
    "render_image",
    "shape_mask",
    "texture",
    "yolo_label_text",
]
