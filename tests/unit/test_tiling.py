"""Tiled inference: the tile grid on hand-computed cases, nms/nmm merging against hand-built boxes, a brute-force
greedy oracle and torchvision's batched_nms, and real YOLOv5n weights finding people too small for an untiled pass."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from detector.cli.detect import build_detect_config
from detector.config import DetectConfig, ValConfig, build_config
from detector.engine.tiling import (
    TileOptions,
    box_ios,
    match_owners,
    merge_detections,
    nmm_merge,
    nms_merge,
    predict_tiled,
    tile_grid,
)
from detector.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------------
# (a) the grid


def test_tile_grid_hand_computed() -> None:
    # 720 wide, 1000 high, 400 px tiles, overlap 0.2 -> 80 px, step 320: x starts 0, 320 (= 720 - 400, the border);
    # y starts 0, 320 and then 600 (= 1000 - 400: the last row shifted up to end at the border).
    expected = [
        [0, 0, 400, 400],
        [320, 0, 720, 400],
        [0, 320, 400, 720],
        [320, 320, 720, 720],
        [0, 600, 400, 1000],
        [320, 600, 720, 1000],
    ]
    assert tile_grid(1000, 720, 400, 0.2).tolist() == expected


def test_tile_grid_exact_fit_and_small_images() -> None:
    quarters = [[0, 0, 320, 320], [320, 0, 640, 320], [0, 320, 320, 640], [320, 320, 640, 640]]
    assert tile_grid(640, 640, 320, 0.0).tolist() == quarters  # no overlap: the tiles just meet
    assert tile_grid(200, 300, 640).tolist() == [[0, 0, 300, 200]]  # smaller than a tile: one tile, the whole image
    assert tile_grid(640, 640, 640).tolist() == [[0, 0, 640, 640]]
    # A side shorter than the tile keeps its length; the other is tiled: 500 - 320 = 180 is the last start.
    assert tile_grid(200, 500, 320, 0.25).tolist() == [[0, 0, 320, 200], [180, 0, 500, 200]]


@pytest.mark.parametrize(("height", "width", "size", "overlap"), [(1080, 1920, 640, 0.2), (333, 999, 128, 0.5)])
def test_tile_grid_covers_the_image_with_the_overlap(height: int, width: int, size: int, overlap: float) -> None:
    windows = tile_grid(height, width, size, overlap)
    covered = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in windows.tolist():
        assert (x2 - x1, y2 - y1) == (min(size, width), min(size, height))
        assert min(x1, y1) >= 0 and x2 <= width and y2 <= height
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    starts = sorted(set(windows[:, 0].tolist()))
    assert starts[0] == 0 and starts[-1] == width - size
    overlaps = [size - (b - a) for a, b in itertools.pairwise(starts)]
    assert min(overlaps) >= int(size * overlap)
    assert overlaps[:-1] == [int(size * overlap)] * (len(overlaps) - 1)  # only the shifted last one overlaps more


# --------------------------------------------------------------------------------------------------------------------
# (b) merging

# An object at x 200..400 cut by tiles [0, 320) and [256, 576): each tile sees a piece of it.
OBJECT = [200.0, 100.0, 400.0, 140.0]
LEFT_PIECE = [200.0, 100.0, 320.0, 140.0, 0.8, 0.0]  # IoS 64/120 = 0.53 with the right piece, IoU 2560/8000 = 0.32
RIGHT_PIECE = [256.0, 100.0, 400.0, 140.0, 0.7, 0.0]


def test_box_ios_hand_computed() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 25.0, 10.0], [2.0, 2.0, 4.0, 4.0], [50.0, 50, 60, 60]])
    ios = box_ios(boxes[:1], boxes)
    torch.testing.assert_close(ios, torch.tensor([[1.0, 50 / 100, 1.0, 0.0]]))
    assert box_ios(torch.tensor([[1.0, 1, 1, 1]]), boxes[:1]).item() == 0.0  # zero area: no division by zero


def test_nmm_with_ios_merges_a_cut_object_into_its_union_box() -> None:
    merged = nmm_merge(torch.tensor([RIGHT_PIECE, LEFT_PIECE]), match="ios", thres=0.5)
    assert merged.tolist() == [[*OBJECT, pytest.approx(0.8), 0.0]]
    # By IoU the pieces do not match: both stay (why ios is the default).
    assert len(nmm_merge(torch.tensor([LEFT_PIECE, RIGHT_PIECE]), match="iou", thres=0.5)) == 2


def test_nms_keeps_the_higher_scoring_piece() -> None:
    kept = nms_merge(torch.tensor([RIGHT_PIECE, LEFT_PIECE]), match="ios", thres=0.5)
    assert kept.tolist() == [pytest.approx(LEFT_PIECE)]


@pytest.mark.parametrize("merge", ["nms", "nmm"])
def test_different_classes_are_not_merged_unless_agnostic(merge: str) -> None:
    other_class = [*RIGHT_PIECE[:5], 1.0]
    detections = torch.tensor([LEFT_PIECE, other_class])
    assert merge_detections(detections, merge, "ios", 0.5).tolist() == [
        pytest.approx(LEFT_PIECE),
        pytest.approx(other_class),
    ]
    assert len(merge_detections(detections, merge, "ios", 0.5, agnostic=True)) == 1


def test_nmm_is_greedy_an_absorbed_box_absorbs_nothing() -> None:
    # A matches B (IoU 8/12), B matches C (8/12), A does not match C (6/14): A takes B; C stays on its own.
    a, b, c = [0.0, 0, 10, 10, 0.9, 0], [2.0, 0, 12, 10, 0.8, 0], [4.0, 0, 14, 10, 0.7, 0]
    merged = nmm_merge(torch.tensor([c, b, a]), match="iou", thres=0.5)
    assert merged.tolist() == [pytest.approx([0.0, 0, 12, 10, 0.9, 0]), pytest.approx(c)]


def _random_detections(count: int, classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=generator) * 200
    wh = torch.rand(count, 2, generator=generator) * 60 + 5
    scores = torch.randperm(count, generator=generator).float() / count + 0.01  # distinct: one greedy order
    labels = torch.randint(0, classes, (count,), generator=generator).float()
    return torch.cat([xy, xy + wh, scores[:, None], labels[:, None]], 1)


def _greedy_nmm_oracle(detections: torch.Tensor, match: str, thres: float) -> list[list[float]]:
    """Plain-Python greedy NMM (SAHI's greedy_nmm): by score, a free box takes the free boxes of its class matching
    it, and becomes their union."""
    rows = sorted(detections.tolist(), key=lambda row: -row[4])
    used = [False] * len(rows)
    merged = []
    for i, row in enumerate(rows):
        if used[i]:
            continue
        used[i] = True
        box = list(row)
        for j in range(i + 1, len(rows)):
            if used[j] or rows[j][5] != row[5]:
                continue
            pair = torch.tensor([row[:4], rows[j][:4]])
            value = (box_ios if match == "ios" else torchvision.ops.box_iou)(pair[:1], pair[1:]).item()
            if value > thres:
                used[j] = True
                other = rows[j]
                box[:4] = [min(box[0], other[0]), min(box[1], other[1]), max(box[2], other[2]), max(box[3], other[3])]
        merged.append(box)
    return merged


@pytest.mark.parametrize("match", ["iou", "ios"])
def test_nmm_matches_a_brute_force_greedy_oracle(match: str) -> None:
    detections = _random_detections(120, 3, seed=1)
    merged = nmm_merge(detections, match=match, thres=0.4)
    expected = _greedy_nmm_oracle(detections, match, 0.4)
    torch.testing.assert_close(merged, torch.tensor(expected))


def test_greedy_matching_keeps_what_batched_nms_keeps() -> None:
    detections = _random_detections(300, 4, seed=2)
    boxes, scores, labels = detections[:, :4], detections[:, 4], detections[:, 5].long()
    expected = torchvision.ops.batched_nms(boxes, scores, labels, 0.45)
    owners = match_owners(boxes, scores, labels, "iou", 0.45)
    kept = (owners == torch.arange(len(owners))).nonzero().flatten()
    assert sorted(kept.tolist()) == sorted(expected.tolist())
    # Both merges keep exactly those boxes (nmm grows them), in descending score order.
    nms_rows, nmm_rows = nms_merge(detections, "iou", 0.45), nmm_merge(detections, "iou", 0.45)
    torch.testing.assert_close(nms_rows, detections[expected])
    torch.testing.assert_close(nmm_rows[:, 4:], detections[expected][:, 4:])


@pytest.mark.parametrize(("merge", "match"), [("nms", "ios"), ("nmm", "ios"), ("nmm", "iou")])
def test_max_det_stops_early_with_the_same_head(merge: str, match: str) -> None:
    detections = _random_detections(200, 2, seed=3)
    full = merge_detections(detections, merge, match, 0.3)
    assert len(full) > 20
    torch.testing.assert_close(merge_detections(detections, merge, match, 0.3, max_det=20), full[:20])


def test_merging_nothing_gives_nothing() -> None:
    for merge in ("nms", "nmm"):
        assert merge_detections(torch.zeros((0, 6)), merge).shape == (0, 6)


def test_predict_tiled_moves_boxes_to_image_pixels_and_merges() -> None:
    """A fake detector that 'sees' the object clipped to each tile: the merged result is the object itself."""
    object_box = np.array([250.0, 40.0, 390.0, 90.0])
    image = np.zeros((128, 576, 3), np.uint8)
    windows = iter(tile_grid(128, 576, 320, 0.2).tolist())  # tiles [0, 320) and [256, 576) along x
    calls = []

    def detect(crops: list[np.ndarray]) -> list[torch.Tensor]:
        calls.append(len(crops))
        found = []
        for _ in crops:
            x1, y1, x2, y2 = next(windows)
            clipped = np.clip(object_box, [x1, y1, x1, y1], [x2, y2, x2, y2]) - [x1, y1, x1, y1]
            found.append(torch.tensor([[*clipped, 0.9 - 0.1 * len(found), 2.0]], dtype=torch.float32))
        return found

    merged = predict_tiled(image, TileOptions(320, merge="nmm"), detect, batch_size=1)
    assert calls == [1, 1]  # two tiles, one per call
    assert merged.tolist() == [[*object_box, pytest.approx(0.9), 2.0]]


# --------------------------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": 16}, r"--tile must be a tile size of at least 32"),
        ({"size": 320, "overlap": 1.0}, r"--tile-overlap must be a fraction of the tile in \[0, 1\), got 1.0"),
        ({"size": 320, "merge": "wbf"}, r"--tile-merge must be one of \['nms', 'nmm'\], got 'wbf'"),
        ({"size": 320, "match": "giou"}, r"--tile-match must be one of \['iou', 'ios'\]"),
        ({"size": 320, "match_thres": 1.5}, r"--tile-match-thres must be between 0 and 1, got 1.5"),
    ],
)
def test_bad_tile_options_are_one_line_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TileOptions(**options)


def test_tile_flags_reach_the_configs() -> None:
    config = build_detect_config(["--tile", "640", "--tile-overlap", "0.3", "--tile-full", "--tile-merge", "nmm"])
    assert TileOptions.from_config(config) == TileOptions(640, overlap=0.3, full=True, merge="nmm")
    assert TileOptions.from_config(DetectConfig()) is None and TileOptions.from_config(ValConfig()) is None
    with pytest.raises(ConfigError, match=r"val\.yaml: key 'tile_match' must be one of \['iou', 'ios'\], got 'giou'"):
        build_config(ValConfig, ("val.yaml", {"tile_match": "giou"}))


# --------------------------------------------------------------------------------------------------------------------
# (c) real weights: people too small for the downscaled image, found tile by tile

CANVAS = (768, 1280)  # height, width: 3 x 5 tiles of 320
BUS_SCALE = 0.2  # the people of bus.jpg become 90-100 px tall: ~24 px after an untiled 1280 -> 320 downscale
BUS_AT = (300, 400)  # top-left corner of the pasted bus.jpg


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    return torchvision.ops.box_iou(torch.as_tensor(box[None]), torch.as_tensor(boxes))[0].numpy()


def test_tiles_find_people_too_small_for_the_untiled_pass(
    yolov5n_weights: Path, shared_images: Path, reference_detections: Path
) -> None:
    from detector.engine.predictor import Detector, Predictor

    bus = cv2.imread(str(shared_images / "bus.jpg"))
    small = cv2.resize(bus, None, fx=BUS_SCALE, fy=BUS_SCALE, interpolation=cv2.INTER_AREA)
    canvas = np.full((*CANVAS, 3), 114, np.uint8)
    x0, y0 = BUS_AT
    canvas[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    # YOLOv5's own detections on bus.jpg, mapped to the canvas: the people it is confident about (conf > 0.75).
    rows = np.loadtxt(reference_detections / "bus.txt", ndmin=2)
    people = rows[(rows[:, 0] == 0) & (rows[:, 5] > 0.75)]
    height, width = small.shape[:2]
    centre_x, centre_y = x0 + people[:, 1] * width, y0 + people[:, 2] * height
    half_w, half_h = people[:, 3] * width / 2, people[:, 4] * height / 2
    expected = np.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], 1)

    detector = Detector(yolov5n_weights, device="cpu", imgsz=320, tile=320)
    untiled = Predictor(detector.backend, imgsz=320).predict_images([canvas])[0]  # the same model, loaded once
    assert not (untiled.class_ids == 0).any()

    tiled = detector(canvas)[0]
    found = tiled.boxes[tiled.class_ids == 0]
    assert tiled.orig_shape == CANVAS and tiled.input_shape == (320, 320)
    for box in expected:
        assert _iou(box, found).max() > 0.5, (box, found)
    pasted = np.array([x0, y0, x0 + width, y0 + height])
    assert (found[:, :2] >= pasted[:2] - 5).all() and (found[:, 2:] <= pasted[2:] + 5).all()  # none elsewhere
