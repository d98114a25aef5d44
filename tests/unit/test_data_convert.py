"""COCO JSON and VOC XML -> YOLO labels (COCO checked against coco128's own YOLO labels), the convert command,
and the labels.jpg statistics plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.cli.convert import main
from detector.data.convert import coco_box_to_yolo, convert_coco_json, convert_voc
from detector.data.dataset import YOLODataset
from detector.errors import DataError
from detector.utils.plots import label_statistics, plot_labels


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
    assert main(["coco", str(tmp_path / "bad.json"), str(tmp_path / "out2")]) == 2
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


# --------------------------------------------------------------------------------------------------------------------
# VOC XML -> YOLO


def _voc_xml(width: int, height: int, objects: list[tuple[str, int, tuple[int, int, int, int]]]) -> str:
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, difficult, (xmin, ymin, xmax, ymax) in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def test_convert_voc_writes_yolo_labels(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n000003\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000004\n")
    for image_id in ("000001", "000002", "000003", "000004"):
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"jpeg")
    # 1-based inclusive pixels: xmin=1..xmax=100 covers the whole 100 px width.
    (voc / "Annotations" / "000001.xml").write_text(
        _voc_xml(100, 50, [("dog", 0, (1, 1, 100, 50)), ("cat", 1, (10, 10, 20, 20)), ("unicorn", 0, (1, 1, 5, 5))])
    )
    (voc / "Annotations" / "000002.xml").write_text(_voc_xml(200, 100, [("cat", 0, (51, 26, 100, 75))]))
    (voc / "Annotations" / "000003.xml").write_text("<annotation><size>")  # broken XML
    (voc / "Annotations" / "000004.xml").write_text(_voc_xml(10, 10, []))

    counts = convert_voc(tmp_path, ["cat", "dog"], progress=False)

    assert counts == {"images": 3, "objects": 2, "difficult": 1, "unknown_class": 1, "bad_xml": 1}
    labels = tmp_path / "labels" / "train2007"
    assert (labels / "000001.txt").read_text() == "1 0.500000 0.500000 1.000000 1.000000\n"
    # x: pixels 51..100 -> span [50, 100] of 200 -> centre 75/200, width 50/200; y: [25, 75] of 100.
    assert (labels / "000002.txt").read_text() == "0 0.375000 0.500000 0.250000 0.500000\n"
    assert not (labels / "000003.txt").exists()
    assert (tmp_path / "labels" / "test2007" / "000004.txt").read_text() == ""
    assert (tmp_path / "images" / "train2007" / "000002.jpg").is_file()
    assert (tmp_path / "images" / "test2007" / "000004.jpg").is_file()
    assert not (voc / "JPEGImages" / "000002.jpg").exists()  # moved, not copied


def test_convert_voc_without_devkit_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no VOCdevkit folder to convert"):
        convert_voc(tmp_path, ["cat"], progress=False)


def test_convert_command_for_voc_uses_voc_class_ids(tmp_path: Path) -> None:
    """`python -m detector.cli.convert voc ROOT` (and `detector convert voc ROOT`) numbers classes as VOC.yaml."""
    from detector.cli import main as detector_main

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    (voc / "JPEGImages" / "a.jpg").write_bytes(b"jpeg")
    # dog is class 11 of VOC.yaml's 20; pixels 1..50 x 1..20 of 100x40 -> span [0, 50] x [0, 20].
    (voc / "Annotations" / "a.xml").write_text(_voc_xml(100, 40, [("dog", 0, (1, 1, 50, 20))]))
    assert detector_main(["convert", "voc", str(tmp_path)]) == 0
    assert (tmp_path / "labels" / "val2012" / "a.txt").read_text() == "11 0.250000 0.250000 0.500000 0.500000\n"
    assert main(["voc", str(tmp_path / "nothing")]) == 2  # one error line, exit status 2
