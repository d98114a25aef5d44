"""Shared test fixtures. Real data lives in ../shared beside the checkout; tests needing it skip visibly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DETECTOR_SHARED", REPO_ROOT.parent / "shared"))

# Two cores: at most two torch threads so DataLoader workers do not oversubscribe the CPU; one per pytest-xdist
# worker process (``pytest -n 2``, as CI runs), where the processes themselves share the cores.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _XDIST_WORKERS)))


def _shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"real-data fixture {path} is absent (it ships in ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def coco128_dir() -> Path:
    """../shared/datasets/coco128: 128 COCO images, YOLO labels, coco128.yaml, annotations/instances_train2017.json."""
    return _shared_path("datasets/coco128")


@pytest.fixture(scope="session")
def yolov5n_weights() -> Path:
    """../shared/weights/yolov5n.pt: the official YOLOv5n release checkpoint (a pickled YOLOv5 module)."""
    return _shared_path("weights/yolov5n.pt")


@pytest.fixture(scope="session")
def shared_images() -> Path:
    """../shared/images with bus.jpg and zidane.jpg."""
    return _shared_path("images")


@pytest.fixture(scope="session")
def reference_detections() -> Path:
    """YOLOv5's own detect.py output for yolov5n.pt on ../shared/images (YOLO txt: cls x y w h conf)."""
    return _shared_path("reference/yolov5n_detect_labels")
