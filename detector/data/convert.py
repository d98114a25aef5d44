"""Convert COCO-JSON box annotations to YOLO label files.

    python -m detector.data.convert coco annotations/instances_val2017.json datasets/mycoco [--images DIR]

writes ``<out_dir>/labels/<split>/<image stem>.txt`` (``split`` is the JSON name without ``instances_``, e.g.
``val2017``), ``<out_dir>/<split>.yaml`` (a dataset YAML for train.py/val.py) and ``<out_dir>/<split>_categories.json``
(the mapping from contiguous class index to COCO category id, needed to write COCO results back).
COCO category ids (1..90 with gaps for COCO itself) become contiguous 0..n-1 in increasing id order.
Crowd annotations (``iscrowd: 1``) and boxes without area are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detector.errors import DataError

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert_coco_json` wrote."""

    label_dir: Path
    dataset_yaml: Path
    names: tuple[str, ...]
    category_ids: tuple[int, ...]  # category_ids[class_index] = COCO category id
    images: int
    boxes: int
    crowd_skipped: int


def load_coco_json(json_path: str | Path) -> dict[str, Any]:
    """Read a COCO annotation file, with a one-line DataError when it is missing or not COCO-shaped."""
    path = Path(json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: COCO annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(f"{path}: not a COCO detection file (missing list(s): {', '.join(missing)})")
    return data


def coco_box_to_yolo(box_xywh: list[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO ``[x_left, y_top, w, h]`` pixels -> normalised ``(x_center, y_center, w, h)``, clipped to the image.

    None for a box with no area inside the image.
    """
    x1, y1 = max(box_xywh[0], 0.0), max(box_xywh[1], 0.0)
    x2, y2 = min(box_xywh[0] + box_xywh[2], width), min(box_xywh[1] + box_xywh[3], height)
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height


def convert_coco_json(
    json_path: str | Path, out_dir: str | Path, images_dir: str | Path | None = None
) -> ConversionResult:
    """Write YOLO labels, a dataset YAML and the category mapping for one COCO JSON file (see module docstring).

    ``images_dir`` (optional) is where the images are; the YAML then points at it and at the label folder.
    Without it the YAML expects the images in ``<out_dir>/images/<split>``, where YOLOv5's rule finds the labels.
    """
    json_path, out_dir = Path(json_path), Path(out_dir)
    data = load_coco_json(json_path)
    split = json_path.stem.removeprefix("instances_")
    categories = sorted(data["categories"], key=lambda c: int(c["id"]))
    category_ids = tuple(int(c["id"]) for c in categories)
    to_class = {category_id: index for index, category_id in enumerate(category_ids)}
    names = tuple(str(c.get("name", c["id"])) for c in categories)

    per_image: dict[int, list[str]] = defaultdict(list)
    images = {int(image["id"]): image for image in data["images"]}
    boxes = crowd = 0
    for annotation in data["annotations"]:
        if annotation.get("iscrowd", 0):
            crowd += 1
            continue
        image = images.get(int(annotation["image_id"]))
        category = int(annotation["category_id"])
        if image is None or category not in to_class:
            raise DataError(
                f"{json_path}: annotation {annotation.get('id')} refers to an unknown "
                f"{'image' if image is None else 'category'} ({annotation['image_id']}, {category})"
            )
        box = coco_box_to_yolo(annotation["bbox"], int(image["width"]), int(image["height"]))
        if box is None:
            continue
        per_image[int(image["id"])].append(f"{to_class[category]} " + " ".join(f"{v:.6f}" for v in box))
        boxes += 1

    label_dir = out_dir / "labels" / split
    label_dir.mkdir(parents=True, exist_ok=True)
    for image_id, image in images.items():
        rows = per_image.get(image_id, [])
        (label_dir / Path(image["file_name"]).with_suffix(".txt").name).write_text(
            "".join(f"{row}\n" for row in rows), encoding="utf-8"
        )

    mapping = {"names": list(names), "category_ids": list(category_ids)}
    (out_dir / f"{split}_categories.json").write_text(json.dumps(mapping, indent=1), encoding="utf-8")
    dataset_yaml = out_dir / f"{split}.yaml"
    description: dict[str, Any] = {"path": str(out_dir.resolve())}
    if images_dir is not None:
        source = str(Path(images_dir).resolve())
        description.update(train=source, val=source, labels=f"labels/{split}")
    else:
        description.update(train=f"images/{split}", val=f"images/{split}")
    description.update(names=dict(enumerate(names)), annotations=str(json_path.resolve()))
    dataset_yaml.write_text(yaml.safe_dump(description, sort_keys=False, allow_unicode=True), encoding="utf-8")
    LOGGER.info(
        "%s: %d images, %d boxes (%d crowd skipped), %d classes -> %s",
        json_path,
        len(images),
        boxes,
        crowd,
        len(names),
        label_dir,
    )
    return ConversionResult(label_dir, dataset_yaml, names, category_ids, len(images), boxes, crowd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detector.data.convert", description=__doc__.splitlines()[0])
    formats = parser.add_subparsers(dest="format", required=True)
    coco = formats.add_parser("coco", help="COCO instances JSON -> YOLO labels")
    coco.add_argument("json", help="COCO annotation file, e.g. annotations/instances_val2017.json")
    coco.add_argument("out_dir", help="output dataset folder")
    coco.add_argument("--images", default=None, help="folder holding the images (the YAML points at it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = convert_coco_json(args.json, args.out_dir, args.images)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {result.label_dir} and {result.dataset_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
