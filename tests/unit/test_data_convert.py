"""COCO JSON -> YOLO labels (checked against coco128's own YOLO labels) and the labels.jpg statistics plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.data.convert import coco_box_to_yolo, convert_coco_json, main
from detector.data.dataset import YOLODataset
from detector.data.stats import label_statistics, plot_labels
from detector.errors import DataError


def small_coco(path: Path) -> Path:
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
            {"id": 2, "file_name": "b.jpg", "width": 10, "height": 10},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [90, 40, 20, 20], "iscrowd": 0},  # clipped at the edge
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 1},  # crowd: skipped
            {"id": 4, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 4], "iscrowd": 0},  # no area: skipped
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_coco_box_conversion_hand_computed() -> None:
    assert coco_box_to_yolo([10, 5, 20, 10], 100, 50) == (0.2, 0.2, 0.2, 0.2)
    assert coco_box_to_yolo([90, 40, 20, 20], 100, 50) == (0.95, 0.9, 0.1, 0.2)
    assert coco_box_to_yolo([120, 0, 5, 5], 100, 50) is None


def test_category_ids_become_contiguous_and_crowds_are_skipped(tmp_path: Path) -> None:
    result = convert_coco_json(small_coco(tmp_path / "instances_val.json"), tmp_path / "out")
    assert result.names == ("dog", "cat") and result.category_ids == (3, 7)  # sorted by COCO id
    assert (result.boxes, result.crowd_skipped, result.images) == (2, 1, 2)
    rows = [line.split() for line in (tmp_path / "out/labels/val/a.txt").read_text().splitlines()]
    np.testing.assert_allclose(np.array(rows, float), [[1, 0.2, 0.2, 0.2, 0.2], [0, 0.95, 0.9, 0.1, 0.2]])
    assert (tmp_path / "out/labels/val/b.txt").read_text() == ""  # an image without boxes: background
    mapping = json.loads((tmp_path / "out/val_categories.json").read_text())
    assert mapping == {"names": ["dog", "cat"], "category_ids": [3, 7]}


def test_converted_coco128_matches_its_yolo_labels(coco128_dir: Path, tmp_path: Path) -> None:
    """pycocotools-free independent reference: coco128 ships both formats of the same annotations."""
    json_path = coco128_dir / "annotations" / "instances_train2017.json"
    result = convert_coco_json(json_path, tmp_path, images_dir=coco128_dir / "images" / "train2017")
    assert len(result.names) == 80 and result.names[0] == "person" and result.category_ids[-1] == 90
    compared = 0
    for image in sorted((coco128_dir / "images" / "train2017").glob("*.jpg")):
        reference = coco128_dir / "labels" / "train2017" / f"{image.stem}.txt"
        if not reference.is_file():  # coco128's two background images have no label file
            assert (result.label_dir / reference.name).read_text() == ""
            continue
        ours = np.loadtxt(result.label_dir / reference.name, ndmin=2)
        theirs = np.loadtxt(reference, ndmin=2)
        assert ours.shape == theirs.shape, reference.name
        ours, theirs = ours[np.lexsort(ours.T[::-1])], theirs[np.lexsort(theirs.T[::-1])]
        np.testing.assert_allclose(ours, theirs, atol=2e-3, err_msg=reference.name)
        compared += len(theirs)
    assert compared == 929


def test_cli_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["coco", str(small_coco(tmp_path / "instances_x.json")), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "x.yaml").is_file()
    (tmp_path / "bad.json").write_text('{"images": []}')
    assert main(["coco", str(tmp_path / "bad.json"), str(tmp_path / "out2")]) == 1
    assert "not a COCO detection file" in capsys.readouterr().err
    with pytest.raises(DataError, match="not found"):
        convert_coco_json(tmp_path / "missing.json", tmp_path)


def test_converted_labels_load_through_the_label_override(tmp_path: Path) -> None:
    images = tmp_path / "pics"
    images.mkdir()
    Image.new("RGB", (100, 50), (90, 90, 90)).save(images / "a.jpg")
    Image.new("RGB", (10, 10), (90, 90, 90)).save(images / "b.jpg")
    result = convert_coco_json(small_coco(tmp_path / "instances_val.json"), tmp_path / "out", images_dir=images)
    dataset = YOLODataset(images, label_dir=tmp_path / "out" / "labels" / "val", num_classes=len(result.names))
    assert [len(lb) for lb in dataset.labels] == [2, 0]


# --------------------------------------------------------------------------------------------------------------------
# Statistics plot


def test_plot_labels_writes_a_readable_jpg(tmp_path: Path) -> None:
    labels = [np.array([[0, 0.5, 0.5, 0.2, 0.3], [2, 0.1, 0.9, 0.05, 0.05]], np.float32), np.zeros((0, 5), np.float32)]
    labels.append(np.array([[2, 0.7, 0.2, 0.4, 0.1]], np.float32))
    stats = label_statistics(labels, 3)
    assert stats["counts"].tolist() == [1, 0, 2] and stats["boxes_xywhn"].shape == (3, 4)
    path = plot_labels(labels, ["person", "car", "dog"], tmp_path / "run")
    assert path == tmp_path / "run" / "labels.jpg"
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == (900, 900)
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 100 and pixels.max() > 200  # drawn content, not a blank canvas
