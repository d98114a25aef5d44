"""Tiled training (--train-tile): tile placement, crop and box clipping, the tiled dataset, one training step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from detector.config import TrainConfig, check_train_config, load_hyp
from detector.data.augment import Sample
from detector.data.dataset import ImageStore, YOLODataset
from detector.data.tiles import OBJECT_TILE_PROBABILITY, TileSource, TileWindow, crop_tile, place_tile
from detector.errors import ConfigError

# Pure BGR colours per class; the background is grey (B = G = R), so a class's pixels are found by colour alone.
CLASS_COLOURS_BGR = ((0, 0, 255), (0, 255, 0), (255, 0, 0))


def write_noise_image(
    root: Path, split: str, name: str, width: int, height: int, boxes: list[tuple[int, int, int, int, int]], seed: int
) -> np.ndarray:
    """A PNG of grey noise (every pixel's grey drawn anew, so any 4x4 patch gives away its position) with solid
    ``(class, x1, y1, x2, y2)`` rectangles in their class colour, and its YOLO label file. Returns the image."""
    rng = np.random.default_rng(seed)
    image = np.repeat(rng.integers(0, 200, (height, width, 1), dtype=np.uint8), 3, axis=2)
    rows = []
    for cls, x1, y1, x2, y2 in boxes:
        image[y1:y2, x1:x2] = CLASS_COLOURS_BGR[cls]
        rows.append(f"{cls} {(x1 + x2) / 2 / width} {(y1 + y2) / 2 / height} {(x2 - x1) / width} {(y2 - y1) / height}")
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / "images" / split / f"{name}.png"), image)
    (root / "labels" / split / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return image


def find_window(original_bgr: np.ndarray, tile_bgr: np.ndarray) -> tuple[int, int]:
    """(x0, y0) where ``tile_bgr`` appears verbatim in ``original_bgr``: located by its first row, which is longer
    than any object and so holds noise pixels that give its place away, then compared whole."""
    height, width = tile_bgr.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(original_bgr[..., 0], (1, width))
    ys, xs = np.nonzero((windows == tile_bgr[:1, :, 0]).all(axis=(2, 3)))
    assert len(ys) == 1, f"the tile's first row matches {len(ys)} places in the image"
    x0, y0 = int(xs[0]), int(ys[0])
    np.testing.assert_array_equal(original_bgr[y0 : y0 + height, x0 : x0 + width], tile_bgr)
    return x0, y0


def colour_extent(image_bgr: np.ndarray, cls: int) -> tuple[np.ndarray, int]:
    """The xyxy pixel-edge box around the pixels of class ``cls``'s colour, and how many there are."""
    ys, xs = np.nonzero((image_bgr == CLASS_COLOURS_BGR[cls]).all(axis=2))
    if len(xs) == 0:
        return np.zeros(4), 0
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64), len(xs)


def item_boxes_xyxy(labels: torch.Tensor, size: int) -> dict[int, np.ndarray]:
    """{class: xyxy pixels} of an item's ``[0, class, x, y, w, h]`` rows (one box per class in these tests)."""
    boxes = {}
    for _, cls, x, y, w, h in labels.tolist():
        boxes[int(cls)] = np.array([x - w / 2, y - h / 2, x + w / 2, y + h / 2]) * size
    assert len(boxes) == len(labels), "one box per class expected"
    return boxes


def to_bgr(chw_rgb: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(chw_rgb.permute(1, 2, 0).numpy()[..., ::-1])


# --------------------------------------------------------------------------------------------------------------------
# Pure functions


def test_crop_tile_shifts_inside_boxes_clips_partial_ones_and_drops_hidden_ones():
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    boxes = np.array(
        [
            [120, 100, 140, 130],  # inside the tile
            [180, 90, 220, 110],  # half outside on the right: clipped to exactly its left half
            [190, 150, 230, 170],  # 10 of 40 px wide inside: 25 % < 30 %, dropped
            [0, 0, 10, 10],  # outside
            [193, 60, 203, 100],  # 7 of 10 px wide inside, and 20 of 40 px tall: 35 % of it, kept
            [197, 120, 207, 130],  # 3 of 10 px inside: exactly 30 %, kept
            [193, 60, 203, 90],  # 7 of 10 px wide and 10 of 30 px tall inside: 23 %, dropped
        ],
        np.float32,
    )
    sample = Sample.create(image, boxes, np.arange(7))
    tile, kept = crop_tile(sample, TileWindow(x0=100, y0=80, width=100, height=100), min_visibility=0.3)
    np.testing.assert_array_equal(tile.image, image[80:180, 100:200])
    np.testing.assert_array_equal(kept, [0, 1, 4, 5])
    np.testing.assert_array_equal(tile.classes, [0, 1, 4, 5])
    np.testing.assert_allclose(
        tile.boxes_xyxy, [[20, 20, 40, 50], [80, 10, 100, 30], [93, 0, 100, 20], [97, 40, 100, 50]]
    )
    assert tile.boxes_xyxy.dtype == np.float32 and tile.image.flags.c_contiguous


def test_place_tile_around_an_object_covers_every_position_containing_its_centre():
    box = np.array([[492, 30, 508, 42]], np.float32)  # centre (500, 36): near the top edge
    windows = [
        place_tile((600, 1000), 100, box, np.random.default_rng(seed), object_probability=1.0) for seed in range(3000)
    ]
    x0 = np.array([w.x0 for w in windows])
    y0 = np.array([w.y0 for w in windows])
    assert {(w.width, w.height) for w in windows} == {(100, 100)}
    # x0 <= 500 <= x0 + 100 gives 400..500; y0 <= 36 <= y0 + 100 inside the image gives 0..36.
    assert (x0.min(), x0.max(), y0.min(), y0.max()) == (400, 500, 0, 36)
    assert len(np.unique(x0)) == 101 and len(np.unique(y0)) == 37


def test_place_tile_uniform_placement_and_images_smaller_than_the_tile():
    windows = [place_tile((110, 120), 100, np.zeros((0, 4)), np.random.default_rng(seed)) for seed in range(500)]
    assert {w.x0 for w in windows} == set(range(21)) and {w.y0 for w in windows} == set(range(11))
    # smaller than the tile on one side: that side whole; on both: the whole image
    assert place_tile((60, 300), 100, np.zeros((0, 4)), np.random.default_rng(1))[1:] == (0, 100, 60)
    box = np.array([[5, 5, 20, 20]], np.float32)
    assert place_tile((60, 80), 100, box, np.random.default_rng(1)) == TileWindow(0, 0, 80, 60)


def test_object_favouring_tiles_contain_an_object_as_often_as_expected():
    # One 16 px object; with p = 0.8 a tile contains its centre with probability p + (1 - p) * u, where u is the
    # chance of a uniform tile doing so: 201 of the 1801 corners per axis (the object is away from the edges).
    box = np.array([[992, 592, 1008, 608]], np.float32)
    uniform_chance = (201 / 1801) ** 2
    expected = OBJECT_TILE_PROBABILITY + (1 - OBJECT_TILE_PROBABILITY) * uniform_chance
    hits = 0
    trials = 2000
    for seed in range(trials):
        x0, y0, width, height = place_tile((2000, 2000), 200, box, np.random.default_rng(seed))
        hits += x0 <= 1000 <= x0 + width and y0 <= 600 <= y0 + height
    tolerance = 4 * np.sqrt(expected * (1 - expected) / trials)  # 4 standard deviations of a binomial fraction
    assert abs(hits / trials - expected) < tolerance


def test_same_seed_gives_the_same_tile():
    boxes = np.array([[100, 100, 116, 116], [900, 500, 916, 516]], np.float32)
    first = [place_tile((1000, 1500), 256, boxes, np.random.default_rng(seed)) for seed in range(20)]
    again = [place_tile((1000, 1500), 256, boxes, np.random.default_rng(seed)) for seed in range(20)]
    assert first == again and len(set(first)) > 10


# --------------------------------------------------------------------------------------------------------------------
# The tiled dataset


@pytest.fixture()
def large_images(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """Two 'large' images (400x300, 250x200) with one box per class, one box on the first image's border."""
    root = tmp_path / "large"
    first = write_noise_image(
        root, "train", "a", 400, 300, [(0, 100, 80, 120, 96), (1, 300, 200, 330, 214), (2, 380, 10, 400, 40)], seed=1
    )
    second = write_noise_image(root, "train", "b", 250, 200, [(0, 30, 150, 44, 170), (2, 200, 20, 216, 40)], seed=2)
    return root, [first, second]


def test_tiled_dataset_items_are_crops_of_the_original_with_matching_labels(large_images):
    root, originals = large_images
    # min_visibility 0.6: the boxes dropped below it are wide enough that the later steps would keep them
    hyp = dataclasses.replace(load_hyp("hyp.no-augmentation.yaml"), min_visibility=0.6)
    dataset = YOLODataset(root / "images" / "train", imgsz=64, augment=True, hyp=hyp, train_tile=64, workers=1)
    assert dataset.store.full_resolution and [Path(f).name for f in dataset.im_files] == ["a.png", "b.png"]
    seen = {"whole": 0, "clipped": 0, "dropped": 0}
    for seed in range(24):
        image, labels, _, shapes = dataset[(seed % 2, seed)]
        assert image.shape == (3, 64, 64) and shapes is None
        tile, original = to_bgr(image), originals[seed % 2]
        find_window(original, tile)  # the item is a 64 px window of the full-resolution image, not shrunk
        boxes = item_boxes_xyxy(labels, 64)
        for cls in range(3):
            extent, visible = colour_extent(tile, cls)
            full_area = colour_extent(original, cls)[1]
            if visible == 0:
                assert cls not in boxes
                continue
            fraction = visible / full_area
            seen["whole" if fraction == 1 else "clipped" if fraction >= 0.6 else "dropped"] += 1
            assert (cls in boxes) == (fraction >= 0.6)
            if cls in boxes:  # labelled where the object's visible pixels are: shifted, or clipped to the tile
                np.testing.assert_allclose(boxes[cls], extent, atol=1e-3)
    assert min(seen.values()) >= 1, seen  # these seeds show every case


def test_tiled_items_depend_on_the_seed_only_and_smaller_images_are_padded(large_images):
    root, _ = large_images
    hyp = dataclasses.replace(load_hyp("hyp.no-augmentation.yaml"), mosaic=1.0, fliplr=0.5, translate=0.1, scale=0.5)
    # tile 256 px: the second image (250x200) is used whole; the items come out at --img 128 (tiles halved)
    dataset = YOLODataset(root / "images" / "train", imgsz=128, augment=True, hyp=hyp, train_tile=256, workers=1)
    first = [dataset[(i % 2, 100 + i)] for i in range(6)]
    again = [dataset[(i % 2, 100 + i)] for i in range(6)]
    for (image, labels, _, _), (image2, labels2, _, _) in zip(first, again, strict=True):
        assert image.shape == (3, 128, 128)
        assert torch.equal(image, image2) and torch.equal(labels, labels2)
    assert not torch.equal(first[0][0], dataset[(0, 999)][0])
    # Without mosaic or jitter, the whole 250x200 image halved (125x100) sits in the middle of the 128 px item (the
    # objects have even corners, so halving keeps their colours pure out to their halved edges).
    plain = YOLODataset(
        root / "images" / "train", imgsz=128, augment=True, hyp=load_hyp("hyp.no-augmentation.yaml"), train_tile=256
    )
    index = plain.im_files.index(str(root / "images" / "train" / "b.png"))
    image, labels, _, _ = plain[(index, 0)]
    boxes = item_boxes_xyxy(labels, 128)
    assert sorted(boxes) == [0, 2]
    for cls, box_in_original in ((0, [30, 150, 44, 170]), (2, [200, 20, 216, 40])):
        np.testing.assert_allclose(boxes[cls], colour_extent(to_bgr(image), cls)[0], atol=1e-3)
        offset = boxes[cls] - np.array(box_in_original) / 2
        np.testing.assert_allclose(offset, [offset[0], offset[1]] * 2, atol=1e-3)  # moved, not scaled again
        assert abs(offset[0] - (128 - 125) / 2) <= 0.5 and abs(offset[1] - (128 - 100) / 2) <= 0.5


def test_tiles_from_the_disk_and_ram_caches_equal_uncached_ones(large_images):
    root, _ = large_images
    hyp = dataclasses.replace(load_hyp("hyp.no-augmentation.yaml"), mosaic=1.0)
    items = {}
    for cache in ("", "disk", "ram"):  # disk: full-resolution .npy files, memory-mapped; ram: full-resolution arrays
        dataset = YOLODataset(root / "images" / "train", imgsz=64, augment=True, hyp=hyp, train_tile=64, cache=cache)
        items[cache] = [dataset[(i % 2, i)] for i in range(4)]
    assert sorted(p.name for p in (root / "images" / "train").glob("*.npy")) == ["a.npy", "b.npy"]
    for cache in ("disk", "ram"):
        for (image, labels, _, _), (expected_image, expected_labels, _, _) in zip(items[cache], items[""], strict=True):
            assert torch.equal(image, expected_image) and torch.equal(labels, expected_labels)


def test_tile_source_moves_polygons_into_the_tile(large_images):
    root, originals = large_images
    files = [str(root / "images" / "train" / "a.png")]
    labels = [np.array([[0, 0.275, 0.293333, 0.05, 0.053333]], np.float32)]  # box (100, 80)-(120, 96)
    outline = np.array([[0.25, 0.266667], [0.3, 0.266667], [0.3, 0.32]], np.float32)  # (100, 80) (120, 80) (120, 96)
    store = ImageStore(files, labels, np.array([[400, 300]]), 128, segments=[[outline]], full_resolution=True)
    tiles = TileSource(store, 64, 64, min_visibility=0.3, object_probability=1.0)
    with pytest.raises(RuntimeError, match="drawing_from"):
        tiles.load_sample(0)
    with tiles.drawing_from(np.random.default_rng(3)):
        tile = tiles.load_sample(0)
        (polygon,) = tiles.load_polygons(0)
    with pytest.raises(RuntimeError, match="drawing_from"):  # the item's generator is released after its item
        tiles.load_sample(0)
    x0, y0 = find_window(originals[0], tile.image)
    expected = (np.array([[100, 80], [120, 80], [120, 96]]) - [x0, y0]) / 64
    np.testing.assert_allclose(polygon, expected, atol=1e-4)


def test_train_tile_is_refused_with_rect_or_below_zero():
    with pytest.raises(ConfigError, match=r"--train-tile .*--rect"):
        check_train_config(TrainConfig(train_tile=640, rect=True))
    with pytest.raises(ConfigError, match="--train-tile"):
        check_train_config(TrainConfig(train_tile=-1))


# --------------------------------------------------------------------------------------------------------------------
# One training step


def test_a_training_step_sees_full_resolution_tiles(tmp_path, large_images):
    import tiny_models
    from tiny_runs import tiny_config

    from detector.cli.train import build_parser
    from detector.engine.trainer import Trainer

    root, originals = large_images
    write_noise_image(root, "val", "v", 160, 120, [(1, 40, 40, 60, 60)], seed=3)
    data = root / "large.yaml"
    data.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": list("abc")})
    )
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(tiny_models.yolov5_blocks_yaml()))
    assert build_parser().parse_args(["--train-tile", "64"]).train_tile == 64
    config = tiny_config({"data": str(data), "cfg": str(model)}, tmp_path, train_tile=64, epochs=1, batch_size=2)
    trainer = Trainer(config)
    trainer.fit()
    images, targets, paths = trainer.last_batch
    assert images.shape == (2, 3, 64, 64)
    by_name = {"a.png": originals[0], "b.png": originals[1]}
    for i, (image, path) in enumerate(zip(images, paths, strict=True)):
        tile = to_bgr(image.cpu())
        find_window(by_name[Path(path).name], tile)  # a 64 px window at the original resolution
        boxes = item_boxes_xyxy(targets[targets[:, 0] == i].cpu(), 64)
        for cls, box in boxes.items():  # the targets are the tile's own boxes
            np.testing.assert_allclose(box, colour_extent(tile, cls)[0], atol=1e-3)
