"""Results of the Python API: summaries, JSON, YOLO label files, plots, saved images and crops."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.engine.results import Results
from detector.utils.drawing import class_color


def _results(image: np.ndarray | None = None) -> Results:
    return Results(
        boxes=np.array([[10, 20, 50, 60], [0, 0, 100, 80], [60, 10, 90, 30]], dtype=np.float32),
        confidences=np.array([0.9, 0.5, 0.25], dtype=np.float32),
        class_ids=np.array([5, 0, 0], dtype=np.int64),
        names=("person", "bicycle", "car", "motorcycle", "airplane", "bus"),
        orig_shape=(80, 100),
        path="street.jpg",
        image=image,
    )


def test_summary_counts_in_class_order() -> None:
    assert _results().summary() == "2 persons, 1 bus"
    empty = Results(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), ("a",), (5, 5))
    assert empty.summary() == "(no detections)" and len(empty) == 0 and empty.to_json() == []


def test_to_json_plain_types() -> None:
    records = _results().to_json()
    assert records[0] == {
        "name": "bus",
        "class": 5,
        "confidence": 0.9,
        "box": {"x1": 10.0, "y1": 20.0, "x2": 50.0, "y2": 60.0},
    }
    assert all(type(r["confidence"]) is float and type(r["class"]) is int for r in records)
    assert _results().tojson() == records


def test_yolo_lines_hand_computed(tmp_path: Path) -> None:
    result = _results()
    # box 0: centre (30, 40), size 40x40 in a 100x80 image -> 0.3 0.5 0.4 0.5
    assert result.yolo_lines()[0] == "5 0.3 0.5 0.4 0.5"
    assert result.yolo_lines(save_conf=True)[2] == "0 0.75 0.25 0.3 0.25 0.25"
    path = result.save_txt(tmp_path / "labels" / "street.txt", save_conf=True)
    table = np.loadtxt(path, ndmin=2)
    assert table.shape == (3, 6)
    np.testing.assert_allclose(table[:, 5], result.confidences, atol=1e-6)
    empty = Results(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), ("a",), (5, 5))
    assert empty.save_txt(tmp_path / "empty.txt").read_text() == ""
    # detect.py --save-format 1: corners, normalised - box 2 (60, 10, 90, 30) in 100x80 -> 0.6 0.125 0.9 0.375
    assert result.yolo_lines(save_conf=True, xyxy=True)[2] == "0 0.6 0.125 0.9 0.375 0.25"
    corners = result.save_txt(tmp_path / "voc.txt", xyxy=True).read_text().splitlines()
    assert corners == ["5 0.1 0.25 0.5 0.75", "0 0 0 1 1", "0 0.6 0.125 0.9 0.375"]


def test_plot_copy_inplace_and_save(tmp_path: Path) -> None:
    image = np.zeros((80, 100, 3), dtype=np.uint8)
    result = _results(image)
    plotted = result.plot(line_thickness=1, hide_labels=True)
    assert not image.any(), "plot() must not draw on the original unless inplace=True"
    assert tuple(plotted[40, 10]) == class_color(5)  # left edge of the bus box
    assert tuple(plotted[10, 75]) == class_color(0)  # top edge of the third box (a person)
    path = result.save(tmp_path / "out" / "street.png", line_thickness=1, hide_labels=True)
    np.testing.assert_array_equal(cv2.imread(str(path)), plotted)
    result.plot(inplace=True)
    assert image.any()


def test_crops_and_their_files(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    result = _results(image)
    crops = result.crops()
    # crop half sizes are (side * 1.02 + 10) / 2: box 0 (40x40 at 30,40) -> x int(4.6)..int(55.4) = 51 px wide;
    # box 2 (30x20 at 75,20) -> x int(54.7)..int(95.3) = 41, y int(4.8)..int(35.2) = 31; box 1 is clipped
    assert [c.shape[:2] for c in crops] == [(51, 51), (80, 100), (31, 41)]
    np.testing.assert_array_equal(crops[0], image[14:65, 4:55])
    paths = result.save_crops(tmp_path / "crops")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "crops/bus/street_0.jpg",
        "crops/person/street_1.jpg",
        "crops/person/street_2.jpg",
    ]
    assert cv2.imread(str(paths[1])).shape == (80, 100, 3)


def test_crops_of_classes_named_like_paths_stay_in_their_folder(tmp_path: Path) -> None:
    """Class names come from checkpoints and dataset YAMLs; '../x' or 'a/b' must not become folders elsewhere."""
    image = np.zeros((80, 100, 3), dtype=np.uint8)
    names = ("../../escaped", "a/b", "..", "ok")
    result = Results(
        boxes=np.array([[10, 20, 50, 60]] * 4, dtype=np.float32),
        confidences=np.full(4, 0.5, dtype=np.float32),
        class_ids=np.arange(4),
        names=names,
        orig_shape=(80, 100),
        path="im.jpg",
        image=image,
    )
    paths = result.save_crops(tmp_path / "run" / "crops")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "run/crops/.._.._escaped/im_0.jpg",
        "run/crops/a_b/im_1.jpg",
        "run/crops/class2/im_2.jpg",
        "run/crops/ok/im_3.jpg",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and all(p.is_file() for p in paths)


def test_plot_without_image_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs the original image"):
        _results().plot()
