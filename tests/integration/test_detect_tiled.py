"""val.py --tile end to end: small people on large canvases, missed by the downscaled pass and found tile by tile,
with our matcher agreeing with pycocotools on the tiled detections (in original-image pixels)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.cli.val import build_val_config
from detector.data.dataset_config import COCO_NAMES
from detector.engine.validator import run_validation

CANVAS = (768, 1280)  # height, width
BUS_SCALE = 0.2  # bus.jpg's people become 90-100 px tall, ~24 px when the canvas is shrunk to 320
BUS_CORNERS = ((300, 400),)  # where bus.jpg goes on each canvas (x, y of its top-left corner)
COCO_LINE = re.compile(
    r"pycocotools mAP50 ([\d.]+) mAP50-95 ([\d.]+) \(detector's own matcher on the YOLO labels: ([\d.]+) ([\d.]+)\)"
)


@pytest.fixture
def canvas_dataset(tmp_path: Path, shared_images: Path, reference_detections: Path) -> Path:
    """Two grey canvases with a small bus.jpg pasted on each, labelled with YOLOv5's own boxes for bus.jpg."""
    bus = cv2.imread(str(shared_images / "bus.jpg"))
    small = cv2.resize(bus, None, fx=BUS_SCALE, fy=BUS_SCALE, interpolation=cv2.INTER_AREA)
    rows = np.loadtxt(reference_detections / "bus.txt", ndmin=2)  # class x y w h conf, normalised to bus.jpg
    height, width = CANVAS
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, (x0, y0) in enumerate(BUS_CORNERS):
        canvas = np.full((height, width, 3), 114, np.uint8)
        canvas[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
        cv2.imwrite(str(tmp_path / "images" / f"canvas{i}.png"), canvas)
        x = (x0 + rows[:, 1] * small.shape[1]) / width
        y = (y0 + rows[:, 2] * small.shape[0]) / height
        w, h = rows[:, 3] * small.shape[1] / width, rows[:, 4] * small.shape[0] / height
        labels = np.stack([rows[:, 0], x, y, w, h], 1)
        np.savetxt(tmp_path / "labels" / f"canvas{i}.txt", labels, fmt=["%d"] + ["%.6f"] * 4)
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(COCO_NAMES))
    yaml_path = tmp_path / "canvas.yaml"
    yaml_path.write_text(f"path: {tmp_path}\ntrain: images\nval: images\nnames:\n{names}")
    return yaml_path


def test_val_tile_finds_what_the_downscaled_pass_misses(
    tmp_path: Path, canvas_dataset: Path, yolov5n_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flags = ["--data", str(canvas_dataset), "--weights", str(yolov5n_weights), "--img", "320", "--device", "cpu"]
    flags += ["--workers", "0", "--project", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    untiled = run_validation(build_val_config(flags))
    assert untiled.map50 < 0.1  # people of ~24 px at 320: next to nothing found

    with caplog.at_level(logging.INFO, logger="detector"):
        tiled = run_validation(build_val_config([*flags, "--tile", "320", "--save-json"]))
    assert tiled.source == "pycocotools" and tiled.num_images == len(BUS_CORNERS)
    assert tiled.map50 > 0.5  # the tiled boxes land on the labels, in the canvases' own pixels
    assert tiled.recall > 0.5
    # Our matcher on the YOLO labels agrees with pycocotools on the same detections.
    coco_map50, coco_map, our_map50, our_map = (float(v) for v in COCO_LINE.search(caplog.text).groups())
    assert (coco_map50, coco_map) == pytest.approx((tiled.map50, tiled.map), abs=5e-4)
    assert (our_map50, our_map) == pytest.approx((coco_map50, coco_map), abs=0.01)
    assert "whole images in 320 px tiles at 320" in caplog.text  # the speed line says how the images were predicted
