"""AutoAnchor: metrics on hand-made boxes, refitting on badly fitting labels, leaving good anchors alone."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from detector.models.autoanchor import anchor_metrics, check_anchors, dataset_box_sizes, kmean_anchors

P5_ANCHORS_PX = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))


class StandInHead(nn.Module):
    def __init__(self, strides=(8, 16, 32)) -> None:
        super().__init__()
        self.nl, self.na, self.nc = 3, 3, 1
        stride = torch.tensor(strides, dtype=torch.float32)
        anchors = torch.tensor(P5_ANCHORS_PX, dtype=torch.float32).view(3, 3, 2)
        if strides[0] > strides[-1]:
            anchors = anchors.flip(0)  # a model listing its levels coarse to fine keeps anchors matched
        self.register_buffer("stride", stride)
        self.register_buffer("anchors", anchors / stride.view(-1, 1, 1))


def make_dataset(sizes_wh: np.ndarray, image_shape=(640, 480)) -> SimpleNamespace:
    """Square-ish images of ``image_shape`` (w, h), one box per image of the given pixel size at 640."""
    width, height = image_shape
    labels = [np.array([[0, 0.5, 0.5, w / width, h / height]], np.float32) for w, h in sizes_wh]
    return SimpleNamespace(labels=labels, shapes=np.tile([width, height], (len(labels), 1)))


def test_anchor_metrics_on_hand_computed_boxes():
    anchors = np.array([[10.0, 10.0]])
    boxes = np.array([[20.0, 20.0], [100.0, 10.0], [10.0, 10.0], [41.0, 10.0]])
    # ratios: 0.5 (fits at thr 4), 0.1 (no), 1.0 (fits), 10/41 < 0.25 (no)
    metrics = anchor_metrics(anchors, boxes, thr=4.0)
    assert metrics.bpr == pytest.approx(0.5)
    assert metrics.anchors_above == pytest.approx(0.5)
    assert metrics.fitness == pytest.approx((0.5 + 1.0) / 4, rel=1e-6)
    two = anchor_metrics(np.array([[10.0, 10.0], [20.0, 20.0]]), boxes, thr=4.0)
    # (20,20) and (10,10) fit both anchors; (41,10) fits (20,20) only (worst side 20/41 > 0.25); (100,10) none.
    assert two.anchors_above == pytest.approx((2 + 0 + 2 + 1) / 4)
    assert two.bpr == pytest.approx(0.75)


def test_dataset_box_sizes_scale_by_letterbox_and_jitter():
    dataset = SimpleNamespace(
        labels=[np.array([[0, 0.5, 0.5, 0.5, 0.25]], np.float32), np.zeros((0, 5), np.float32)],
        shapes=np.array([[1280, 640], [100, 100]]),
    )
    sizes = dataset_box_sizes(dataset, imgsz=640)
    assert np.allclose(sizes, [[320.0, 80.0]])  # 1280x640 letterboxed to 640x320
    jittered = dataset_box_sizes(dataset, imgsz=640, rng=np.random.default_rng(0))
    scale = jittered[0] / sizes[0]
    assert 0.9 <= scale[0] <= 1.1 and scale[0] == pytest.approx(scale[1])


def test_dataset_box_sizes_of_tiled_training_keep_the_original_pixels():
    # --train-tile 640 at --img 320: a 4000x3000 image is cut into 640-pixel tiles scaled by 1/2, so a box of
    # 0.01 x 0.01 (40 x 30 original pixels) trains at 20 x 15, not at the whole-image letterbox's 3.2 x 2.4.
    dataset = SimpleNamespace(
        labels=[np.array([[0, 0.5, 0.5, 0.01, 0.01]], np.float32)], shapes=np.array([[4000, 3000]]), train_tile=640
    )
    assert np.allclose(dataset_box_sizes(dataset, imgsz=320), [[20.0, 15.0]])


def test_check_anchors_refits_thin_tall_boxes():
    rng = np.random.default_rng(1)
    sizes = np.stack([rng.uniform(3, 8, 300), rng.uniform(150, 400, 300)], axis=1)  # 1:20-1:130 boxes
    dataset = make_dataset(sizes)
    head = StandInHead()
    before = head.anchors.clone()
    assert check_anchors(dataset, head, thr=4.0, imgsz=640, generations=100, seed=0) is True
    assert not torch.equal(head.anchors, before)
    new_px = (head.anchors * head.stride.view(-1, 1, 1)).view(-1, 2)
    assert anchor_metrics(new_px, dataset_box_sizes(dataset, 640), 4.0).bpr > 0.98
    areas = new_px.prod(dim=1)
    assert torch.equal(areas, areas.sort().values)  # smallest anchors on the finest level


def test_check_anchors_respects_reversed_level_order():
    rng = np.random.default_rng(1)
    dataset = make_dataset(np.stack([rng.uniform(3, 8, 200), rng.uniform(150, 400, 200)], axis=1))
    head = StandInHead(strides=(32, 16, 8))
    assert check_anchors(dataset, head, generations=50)
    new_px = head.anchors * head.stride.view(-1, 1, 1)
    level_areas = new_px.prod(dim=2).mean(dim=1)
    assert level_areas[0] > level_areas[1] > level_areas[2]  # stride 32 level holds the largest anchors


def test_check_anchors_leaves_fitting_anchors_alone():
    rng = np.random.default_rng(2)
    anchors = np.array(P5_ANCHORS_PX, np.float64).reshape(-1, 2)
    sizes = anchors[rng.integers(0, 9, 400)] * rng.uniform(0.7, 1.4, (400, 2))
    head = StandInHead()
    before = head.anchors.clone()
    assert check_anchors(make_dataset(sizes), head, generations=10) is False
    assert torch.equal(head.anchors, before)


def test_check_anchors_without_boxes_keeps_anchors():
    dataset = SimpleNamespace(labels=[np.zeros((0, 5), np.float32)], shapes=np.array([[640, 480]]))
    assert check_anchors(dataset, StandInHead()) is False


def test_kmean_anchors_is_deterministic_sorted_and_drops_tiny_boxes():
    rng = np.random.default_rng(3)
    sizes = np.concatenate([rng.uniform(10, 300, (200, 2)), np.full((50, 2), 1.0)])  # 50 boxes of 1 px dropped
    first = kmean_anchors(sizes, n=6, generations=30, seed=7, verbose=False)
    second = kmean_anchors(sizes, n=6, generations=30, seed=7, verbose=False)
    assert first.shape == (6, 2) and first.dtype == np.float32
    assert np.array_equal(first, second)
    assert np.all(np.diff(first.prod(axis=1)) >= 0)
    assert first.min() >= 2.0


def test_kmean_anchors_with_fewer_boxes_than_anchors_falls_back_to_random_start():
    anchors = kmean_anchors(np.array([[20.0, 30.0], [40.0, 50.0]]), n=4, generations=5, verbose=False)
    assert anchors.shape == (4, 2) and np.isfinite(anchors).all()


def coco128_like_dataset(root) -> SimpleNamespace:
    """labels/shapes of coco128 read straight from its files (image sizes from the JPEG headers)."""
    from PIL import Image

    images = sorted((root / "images" / "train2017").glob("*.jpg"))
    labels, shapes = [], []
    for image in images:
        label_file = root / "labels" / "train2017" / f"{image.stem}.txt"
        rows = np.loadtxt(label_file, ndmin=2, dtype=np.float32) if label_file.exists() else np.zeros((0, 5))
        labels.append(rows.reshape(-1, 5))
        with Image.open(image) as im:
            shapes.append(im.size)
    return SimpleNamespace(labels=labels, shapes=np.array(shapes))


def test_default_anchors_fit_coco128(coco128_dir):
    from detector.models.yolo import DetectionModel

    dataset = coco128_like_dataset(coco128_dir)
    model = DetectionModel("yolov5n.yaml")
    before = model.detect.anchors.clone()
    assert check_anchors(dataset, model, thr=4.0, imgsz=640) is False
    assert torch.equal(model.detect.anchors, before)
    # YOLOv5 logs about 4.27 anchors/target and 0.994 BPR for its default anchors on coco128 (jitter makes it vary).
    anchors_px = (before * model.detect.stride.view(-1, 1, 1)).view(-1, 2)
    metrics = anchor_metrics(anchors_px, dataset_box_sizes(dataset, 640), 4.0)
    assert 0.99 < metrics.bpr < 1.0
    assert 4.1 < metrics.anchors_above < 4.5
