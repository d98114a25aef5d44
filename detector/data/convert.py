"""Label converters to YOLO format: COCO JSON boxes and PASCAL VOC XML.

COCO (``python -m detector.cli.convert coco annotations/instances_val2017.json datasets/mycoco [--images DIR]``)
writes ``<out_dir>/labels/<split>/<image stem>.txt`` (``split`` is the JSON name without ``instances_``, e.g.
``val2017``), ``<out_dir>/<split>.yaml`` (a dataset YAML for train.py/val.py) and ``<out_dir>/<split>_categories.json``
(the mapping from contiguous class index to COCO category id, needed to write COCO results back).
COCO category ids (1..90 with gaps for COCO itself) become contiguous 0..n-1 in increasing id order.
Crowd annotations (``iscrowd: 1``) and boxes without area are skipped.

VOC (``python -m detector.cli.convert voc ../datasets/VOC``, and the ``convert: voc`` step of a dataset YAML's
download) lays out an unpacked ``VOCdevkit`` as ``images/<set><year>`` and ``labels/<set><year>``.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from detector.errors import DataError

LOGGER = logging.getLogger(__name__)

# (year, image set) pairs of PASCAL VOC, as YOLOv5's VOC.yaml lays them out: images/<set><year>, labels/<set><year>.
VOC_SPLITS = (("2012", "train"), ("2012", "val"), ("2007", "train"), ("2007", "val"), ("2007", "test"))


# --------------------------------------------------------------------------------------------------------------------
# COCO JSON -> YOLO labels


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


# --------------------------------------------------------------------------------------------------------------------
# PASCAL VOC XML -> YOLO labels


def convert_voc(root: str | Path, names: Sequence[str], *, progress: bool = True) -> dict[str, int]:
    """Lay out an unpacked ``<root>/VOCdevkit`` as YOLO data: ``images/<set><year>`` and ``labels/<set><year>``.

    Objects marked ``difficult`` are left out (as in YOLOv5's labels; VOC's own evaluation ignores them).
    VOC boxes are 1-based inclusive pixel indices: ``xmin..xmax`` covers the continuous span ``[xmin - 1, xmax]``.

    Returns:
        counts: ``images``, ``objects``, ``difficult`` (left out), ``unknown_class`` and ``bad_xml`` (files skipped).
    """
    root = Path(root)
    devkit = root / "VOCdevkit"
    if not devkit.is_dir():
        raise DataError(f"{root}: no VOCdevkit folder to convert (unpack the VOC archives here first)")
    class_ids = {name: i for i, name in enumerate(names)}
    counts = dict.fromkeys(("images", "objects", "difficult", "unknown_class", "bad_xml"), 0)
    for year, image_set in VOC_SPLITS:
        voc = devkit / f"VOC{year}"
        list_file = voc / "ImageSets" / "Main" / f"{image_set}.txt"
        if not list_file.is_file():
            continue
        images_dir = root / "images" / f"{image_set}{year}"
        labels_dir = root / "labels" / f"{image_set}{year}"
        images_dir.mkdir(parents=True, exist_ok=True)
        labels_dir.mkdir(parents=True, exist_ok=True)
        image_ids = list_file.read_text().split()
        for image_id in tqdm(image_ids, desc=f"{image_set}{year}", disable=not progress):
            rows = _voc_rows(voc / "Annotations" / f"{image_id}.xml", class_ids, counts)
            if rows is None:
                continue
            (labels_dir / f"{image_id}.txt").write_text("".join(f"{row}\n" for row in rows))
            source = voc / "JPEGImages" / f"{image_id}.jpg"
            if source.is_file():
                source.replace(images_dir / source.name)
            counts["images"] += 1
    if counts["bad_xml"] or counts["unknown_class"]:
        LOGGER.warning("VOC conversion skipped %d unreadable XML files and %d objects of unknown classes",
                       counts["bad_xml"], counts["unknown_class"])  # fmt: skip
    LOGGER.info("VOC conversion: %s", counts)
    return counts


def _voc_rows(xml_file: Path, class_ids: dict[str, int], counts: dict[str, int]) -> list[str] | None:
    """YOLO label rows of one VOC annotation, or None (warned and counted) when the XML is unusable."""
    try:
        tree = ET.parse(xml_file)
        size = tree.find("size")
        width = float(size.findtext("width"))  # type: ignore[union-attr, arg-type]
        height = float(size.findtext("height"))  # type: ignore[union-attr, arg-type]
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height}")
        rows = []
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in class_ids:
                counts["unknown_class"] += 1
                continue
            if int(obj.findtext("difficult") or 0) == 1:
                counts["difficult"] += 1
                continue
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr, arg-type]
            x1, y1 = max(xmin - 1.0, 0.0), max(ymin - 1.0, 0.0)
            x2, y2 = min(xmax, width), min(ymax, height)
            if x2 <= x1 or y2 <= y1:
                raise ValueError(f"empty box {xmin, ymin, xmax, ymax}")
            cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
            w, h = (x2 - x1) / width, (y2 - y1) / height
            rows.append(f"{class_ids[name]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            counts["objects"] += 1
        return rows
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError) as e:
        LOGGER.warning("%s: skipped, unreadable VOC annotation (%s)", xml_file, e)
        counts["bad_xml"] += 1
        return None
