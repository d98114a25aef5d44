"""COCO-format JSON for predictions and ground truth, and evaluation with pycocotools' ``COCOeval``.

Result format (one dict per detection, what ``COCO.loadRes`` reads):
``{"image_id": 42 or "name", "category_id": int, "bbox": [x_left, y_top, width, height], "score": float}``
with the box in original-image pixels and the score rounded to 5 decimals.

Image ids: the file stem as an int when it is a number (COCO's ``000000000042.jpg`` -> 42), else the stem.
Category ids: COCO's 80 -> 91 id map when the dataset is COCO's, else the class index.

Crowd labels: COCO's annotations mark crowds with ``iscrowd: 1`` and pycocotools ignores detections that land on
them; YOLO label files have no crowds (YOLOv5's COCO labels leave them out). :func:`crowd_regions` reads them
from the COCO JSON so that the validator's own matcher ignores the same detections. Ground truth written here
from YOLO labels has ``iscrowd: 0`` everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.errors import DataError

LOGGER = logging.getLogger(__name__)

# COCOeval.stats: 12 numbers in this order.
COCO_STAT_NAMES = (
    "AP50-95",
    "AP50",
    "AP75",
    "AP50-95 small",
    "AP50-95 medium",
    "AP50-95 large",
    "AR1",
    "AR10",
    "AR100",
    "AR small",
    "AR medium",
    "AR large",
)


def image_id_from_path(path: str | Path) -> int | str:
    """COCO's image id for an image file: the stem as an int when it is all digits, else the stem itself."""
    stem = Path(path).stem
    return int(stem) if stem.isdigit() else stem


def predictions_to_coco(
    detections: np.ndarray, image_id: int | str, category_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """COCO result dicts for one image.

    Args:
        detections: (n, 6) ``[x1, y1, x2, y2, conf, class]`` in original-image pixels.
        image_id: the image's id (see :func:`image_id_from_path`).
        category_ids: category id of each class index (e.g. COCO80_TO_COCO91); None = the class index.
    """
    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 6)
    results = []
    for x1, y1, x2, y2, conf, cls in detections.tolist():
        category = int(cls) if category_ids is None else int(category_ids[int(cls)])
        box = [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]
        results.append({"image_id": image_id, "category_id": category, "bbox": box, "score": round(conf, 5)})
    return results


def labels_to_coco(
    image_files: Sequence[str | Path],
    image_sizes: np.ndarray,
    labels: Sequence[np.ndarray],
    names: Sequence[str],
    category_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A COCO ground-truth dict (``instances_*.json`` layout) from YOLO labels, so pycocotools can evaluate any set.

    Args:
        image_files: the images, whose stems give the image ids (:func:`image_id_from_path`).
        image_sizes: (N, 2) original ``(width, height)`` of each image in pixels.
        labels: per image an (n, 5) array ``[class, xc, yc, w, h]`` normalised to 0-1.
        names: class names; category_ids: as in :func:`predictions_to_coco`.
    """
    images, annotations = [], []
    for file, (width, height), image_labels in zip(image_files, np.asarray(image_sizes), labels, strict=True):
        image_id = image_id_from_path(file)
        images.append({"id": image_id, "file_name": Path(file).name, "width": int(width), "height": int(height)})
        for cls, xc, yc, w, h in np.asarray(image_labels, dtype=np.float64).reshape(-1, 5).tolist():
            box_w, box_h = w * width, h * height
            box = [(xc - w / 2) * width, (yc - h / 2) * height, box_w, box_h]
            category = int(cls) if category_ids is None else int(category_ids[int(cls)])
            # Ids start at 1: pycocotools treats a matched id of 0 as "unmatched".
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": box}
            annotations.append({**annotation, "area": box_w * box_h, "iscrowd": 0})
    ids = range(len(names)) if category_ids is None else category_ids[: len(names)]
    categories = [{"id": int(i), "name": name} for i, name in zip(ids, names, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


def find_coco_annotations(dataset_root: str | Path, image_files: Sequence[str | Path]) -> Path | None:
    """COCO JSON ground truth beside a dataset: ``<root>/annotations/instances_<split>.json`` for these images.

    The split is read from the images' folder name (``images/val2017`` -> ``instances_val2017.json``); when
    there is exactly one ``instances_*.json`` it is used whatever its name. Returns None when nothing fits.
    """
    folder = Path(dataset_root) / "annotations"
    if not folder.is_dir() or not image_files:
        return None
    splits = {Path(f).parent.name for f in image_files}
    for split in sorted(splits):
        if (candidate := folder / f"instances_{split}.json").is_file():
            return candidate
    candidates = sorted(folder.glob("instances_*.json"))
    return candidates[0] if len(candidates) == 1 else None


def crowd_regions(
    annotations: str | Path | dict[str, Any],
    image_files: Sequence[str | Path],
    category_ids: Sequence[int] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Crowd boxes of each image from a COCO instances JSON: ``{image file: (boxes xyxy (n, 4), class ids (n,))}``.

    Boxes are in original-image pixels; categories become class indices through ``category_ids`` (None: the
    category id is the class index); crowds of other categories, and images not in the JSON, are left out.
    """
    if not isinstance(annotations, dict):
        path = Path(annotations)
        try:
            annotations = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read COCO annotations ({e})") from e
    to_class = {int(c): i for i, c in enumerate(category_ids)} if category_ids is not None else None
    files_by_id = {image_id_from_path(f): str(f) for f in image_files}
    crowds: dict[str, list[tuple[list[float], int]]] = {}
    for annotation in annotations.get("annotations", []):
        if not annotation.get("iscrowd") or annotation.get("image_id") not in files_by_id:
            continue
        category = int(annotation["category_id"])
        cls = category if to_class is None else to_class.get(category)
        if cls is None:
            continue
        x, y, w, h = annotation["bbox"]
        crowds.setdefault(files_by_id[annotation["image_id"]], []).append(([x, y, x + w, y + h], cls))
    return {
        file: (np.array([b for b, _ in rows], dtype=np.float64), np.array([c for _, c in rows], dtype=np.int64))
        for file, rows in crowds.items()
    }


@dataclass
class CocoResult:
    """pycocotools' results: mAP50-95 and mAP50 at the requested detection limit, and COCOeval's own summary.

    ``stats`` are COCOeval's 12 numbers (see COCO_STAT_NAMES), which it always reads at 100 detections.
    """

    map: float  # mAP50-95 at max_dets
    map50: float  # mAP50 at max_dets
    stats: tuple[float, ...]
    summary: str  # COCOeval.summarize()'s printed table


def evaluate_coco(
    ground_truth: str | Path | dict[str, Any],
    predictions: str | Path | list[dict[str, Any]],
    image_ids: Sequence[int | str] | None = None,
    max_dets: int = 100,
) -> CocoResult:
    """Run pycocotools' bbox COCOeval.

    Args:
        ground_truth: an ``instances_*.json`` path or the dict itself.
        predictions: a result JSON path or the list of result dicts.
        image_ids: evaluate only these images (e.g. the validated subset); None = every ground-truth image.
        max_dets: detection limit per image (and class, as pycocotools applies it) for AP; COCO's is 100.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        gt = _load_ground_truth(ground_truth, COCO)
    if isinstance(predictions, (str, Path)):
        predictions = json.loads(Path(predictions).read_text(encoding="utf-8"))
    ids = list(gt.getImgIds()) if image_ids is None else list(image_ids)
    if missing := set(ids) - set(gt.getImgIds()):
        example = sorted(missing, key=str)[0]
        raise DataError(f"COCO ground truth has no image with id {example!r} ({len(missing)} validated images missing)")
    if not predictions:
        LOGGER.warning("no detections to evaluate with pycocotools: mAP is 0")
        return CocoResult(0.0, 0.0, tuple([0.0] * len(COCO_STAT_NAMES)), "")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        detections = gt.loadRes(predictions)
        evaluator = COCOeval(gt, detections, "bbox")
        evaluator.params.imgIds = ids
        # summarize() reads its AP lines at 100 detections whatever the limit, so 100 stays in the list.
        evaluator.params.maxDets = sorted({1, 10, 100, max_dets})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = tuple(float(s) for s in evaluator.stats)
    summary = "\n".join(line for line in output.getvalue().splitlines() if "Average" in line)
    # precision: (T, R, K, area ranges, max dets); -1 marks classes without ground truth, which COCO skips.
    precision = evaluator.eval["precision"][:, :, :, 0, evaluator.params.maxDets.index(max_dets)]
    map50_95 = float(precision[precision > -1].mean()) if (precision > -1).any() else 0.0
    at_50 = precision[0]
    map50 = float(at_50[at_50 > -1].mean()) if (at_50 > -1).any() else 0.0
    return CocoResult(map=map50_95, map50=map50, stats=stats, summary=summary)


def _load_ground_truth(ground_truth: str | Path | dict[str, Any], coco_class: type) -> Any:
    if isinstance(ground_truth, dict):
        gt = coco_class()
        gt.dataset = ground_truth
        gt.createIndex()
        return gt
    path = Path(ground_truth)
    if not path.is_file():
        raise DataError(f"{path}: COCO annotations file not found")
    try:
        return coco_class(str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO instances JSON ({e})") from e


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON (compact) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path
