"""COCO JSON writing and agreement of our mAP with pycocotools' COCOeval on synthetic predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detector.engine.coco_eval import (
    crowd_regions,
    evaluate_coco,
    find_coco_annotations,
    image_id_from_path,
    labels_to_coco,
    predictions_to_coco,
)
from detector.errors import DataError
from detector.ops.boxes import xywhn2xyxy
from detector.ops.metrics import DetectionStats


def _synthetic_set(seed: int, num_images: int = 30, nc: int = 5):
    """YOLO labels for images of varied sizes, and predictions made from them with the usual failure modes.

    Predictions: jittered copies of labels, misses (15%), duplicates, wrong classes (10%), false positives
    (including a class that has no labels at all), and every seventh image has no labels.
    """
    rng = np.random.default_rng(seed)
    files, sizes, labels, detections = [], [], [], []
    for i in range(num_images):
        width, height = (int(v) for v in rng.integers(160, 640, 2))
        count = 0 if i % 7 == 0 else int(rng.integers(1, 12))
        classes = rng.integers(0, nc, count)
        centres, sides = rng.uniform(0.1, 0.9, (count, 2)), rng.uniform(0.03, 0.4, (count, 2))
        image_labels = np.concatenate([classes[:, None], centres, sides], 1)
        boxes = xywhn2xyxy(image_labels[:, 1:], width, height)
        rows = []
        for box, cls in zip(boxes, classes, strict=True):
            if rng.random() < 0.15:
                continue
            size = np.r_[box[2:] - box[:2], box[2:] - box[:2]]
            for _ in range(int(rng.integers(1, 3))):
                wrong_class = rng.random() < 0.1
                rows.append(
                    [*(box + rng.normal(0, 0.08, 4) * size), rng.random(), rng.integers(0, nc) if wrong_class else cls]
                )
        for _ in range(int(rng.integers(0, 5))):
            x1, y1 = rng.uniform(0, width - 20), rng.uniform(0, height - 20)
            rows.append(
                [x1, y1, x1 + rng.uniform(5, 100), y1 + rng.uniform(5, 100), rng.random(), rng.integers(0, nc + 1)]
            )
        image_detections = np.array(rows, dtype=np.float64).reshape(-1, 6)
        image_detections[:, 4] = np.round(image_detections[:, 4], 5)  # as written to JSON, so both see the same
        files.append(f"images/{1000 + i}.jpg" if seed % 2 else f"images/frame_{i}.jpg")
        sizes.append((width, height))
        labels.append(image_labels)
        detections.append(image_detections)
    return files, np.array(sizes), labels, detections


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_agrees_with_pycocotools(seed: int) -> None:
    names = [f"class{i}" for i in range(6)]  # class 5 is predicted but never labelled: both must ignore it
    files, sizes, labels, detections = _synthetic_set(seed)
    stats = DetectionStats()
    for (width, height), image_labels, image_detections in zip(sizes, labels, detections, strict=True):
        label_boxes = xywhn2xyxy(image_labels[:, 1:], width, height)
        stats.update(
            image_detections[:, :4], image_detections[:, 4], image_detections[:, 5], label_boxes, image_labels[:, 0]
        )
    ours = stats.compute(names)
    ground_truth = labels_to_coco(files, sizes, labels, names)
    results = [r for f, d in zip(files, detections, strict=True) for r in predictions_to_coco(d, image_id_from_path(f))]
    # Same detection limit on both sides: no image here has more than 100 detections of one class.
    theirs = evaluate_coco(ground_truth, results, max_dets=100)
    assert ours.map50 == pytest.approx(theirs.map50, abs=0.002)
    assert ours.map == pytest.approx(theirs.map, abs=0.002)
    assert 0.2 < ours.map < ours.map50 < 0.9  # a non-trivial case, not two zeros agreeing
    assert theirs.stats[0] == pytest.approx(theirs.map)  # at 100 detections COCOeval's summary says the same


def test_crowd_regions_are_ignored_as_pycocotools_does() -> None:
    names = [f"class{i}" for i in range(6)]
    files, sizes, labels, detections = _synthetic_set(3)
    ground_truth = labels_to_coco(files, sizes, labels, names)
    rng = np.random.default_rng(3)
    for file, (width, height), image_detections in zip(files, sizes, detections, strict=True):
        for _ in range(int(rng.integers(0, 3))):  # crowds, half of them under an existing prediction
            cls = int(rng.integers(0, 5))
            if len(image_detections) and rng.random() < 0.5:
                x1, y1, x2, y2, _, cls = image_detections[int(rng.integers(len(image_detections)))]
                cls = int(cls)
                box = [x1 - 5, y1 - 5, x2 - x1 + 10, y2 - y1 + 10]
            else:
                x, y = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
                box = [x, y, rng.uniform(20, width / 2), rng.uniform(20, height / 2)]
            annotation = {"image_id": image_id_from_path(file), "category_id": cls, "bbox": box, "iscrowd": 1}
            ground_truth["annotations"].append(
                {**annotation, "id": len(ground_truth["annotations"]) + 1, "area": box[2] * box[3]}
            )
    crowds = crowd_regions(ground_truth, files)
    assert sum(len(c) for _, c in crowds.values()) > 5
    with_crowds, without_crowds = DetectionStats(), DetectionStats()
    for file, (width, height), image_labels, d in zip(files, sizes, labels, detections, strict=True):
        label_boxes = xywhn2xyxy(image_labels[:, 1:], width, height)
        crowd_boxes, crowd_classes = crowds.get(file, (None, None))
        with_crowds.update(d[:, :4], d[:, 4], d[:, 5], label_boxes, image_labels[:, 0], crowd_boxes, crowd_classes)
        without_crowds.update(d[:, :4], d[:, 4], d[:, 5], label_boxes, image_labels[:, 0])
    results = [r for f, d in zip(files, detections, strict=True) for r in predictions_to_coco(d, image_id_from_path(f))]
    theirs = evaluate_coco(ground_truth, results)
    ours = with_crowds.compute(names)
    assert (ours.map50, ours.map) == pytest.approx((theirs.map50, theirs.map), abs=0.002)
    assert without_crowds.compute(names).map < ours.map  # the crowds did change something


def test_prediction_json_format_and_category_map() -> None:
    detections = np.array([[10.0, 20.0, 40.0, 60.0, 0.123456789, 2.0]])
    (result,) = predictions_to_coco(detections, 42, category_ids=[1, 2, 3, 4])
    assert result == {"image_id": 42, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.12346}
    (identity,) = predictions_to_coco(detections, "frame")
    assert identity["category_id"] == 2 and identity["image_id"] == "frame"
    assert image_id_from_path("/data/images/000000000042.jpg") == 42
    assert image_id_from_path("frame_7.png") == "frame_7"


def test_ground_truth_from_labels() -> None:
    labels = [np.array([[1, 0.5, 0.5, 0.5, 0.25]]), np.zeros((0, 5))]
    gt = labels_to_coco(["a/7.jpg", "a/x.jpg"], np.array([[200, 100], [50, 50]]), labels, ["p", "q"])
    assert gt["images"][0] == {"id": 7, "file_name": "7.jpg", "width": 200, "height": 100}
    (annotation,) = gt["annotations"]
    assert annotation["id"] == 1  # pycocotools needs ids >= 1
    assert annotation["bbox"] == pytest.approx([50.0, 37.5, 100.0, 25.0])
    assert annotation["area"] == pytest.approx(2500.0)
    assert (annotation["category_id"], annotation["iscrowd"]) == (1, 0)
    assert gt["categories"] == [{"id": 0, "name": "p"}, {"id": 1, "name": "q"}]


def test_perfect_predictions_score_one_and_no_predictions_zero(tmp_path: Path) -> None:
    labels = [np.array([[0, 0.5, 0.5, 0.5, 0.5], [1, 0.2, 0.2, 0.1, 0.1]])]
    gt = labels_to_coco(["1.jpg"], np.array([[100, 100]]), labels, ["a", "b"])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    perfect = [
        {"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]
    ]
    assert evaluate_coco(path, perfect).map == pytest.approx(1.0)
    assert evaluate_coco(path, []).map == 0.0


def test_unknown_image_id_is_a_one_line_error(tmp_path: Path) -> None:
    gt = labels_to_coco(["1.jpg"], np.array([[100, 100]]), [np.zeros((0, 5))], ["a"])
    with pytest.raises(DataError, match="no image with id 2"):
        evaluate_coco(gt, [], image_ids=[1, 2])
    with pytest.raises(DataError, match="not found"):
        evaluate_coco(tmp_path / "missing.json", [])


def test_find_coco_annotations(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    images = [tmp_path / "images" / "val2017" / "1.jpg"]
    assert find_coco_annotations(tmp_path, images) is None
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    assert find_coco_annotations(tmp_path, images) == tmp_path / "annotations" / "instances_train2017.json"
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    assert find_coco_annotations(tmp_path, images) == tmp_path / "annotations" / "instances_val2017.json"
