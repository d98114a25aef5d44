"""YOLODataset: sources, label paths, the first scan (bad files), its cache, EXIF, items, rect shapes, caching."""

from __future__ import annotations

import gc
import logging
import os
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import detector.data.dataset as dataset_module
import detector.data.scan as scan_module
from detector.data.dataset import YOLODataset, find_images, image_to_label_path, reduction_factor
from detector.data.loader import create_dataloader
from detector.data.scan import load_scan_cache
from detector.errors import DataError
from detector.ops.boxes import scale_boxes, xywhn2xyxy

RED_BGR = (0, 0, 255)


def write_image(path: Path, width: int, height: int, box_xyxy: tuple[int, int, int, int] | None = None) -> None:
    """A grey image with one solid red rectangle (BGR (0, 0, 255))."""
    image = np.full((height, width, 3), 90, np.uint8)
    if box_xyxy is not None:
        x1, y1, x2, y2 = box_xyxy
        image[y1:y2, x1:x2] = RED_BGR
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def write_pair(root: Path, name: str, width: int, height: int, box: tuple[int, int, int, int], cls: int = 0) -> Path:
    image = root / "images" / name
    write_image(image, width, height, box)
    x1, y1, x2, y2 = box
    label = root / "labels" / Path(name).with_suffix(".txt")
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text(
        f"{cls} {(x1 + x2) / 2 / width} {(y1 + y2) / 2 / height} {(x2 - x1) / width} {(y2 - y1) / height}\n"
    )
    return image


@pytest.fixture()
def clean_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "clean"
    write_pair(root, "a.jpg", 80, 60, (10, 10, 40, 30), 0)
    write_pair(root, "b.png", 60, 90, (20, 30, 50, 80), 1)
    write_pair(root, "c.jpg", 100, 50, (60, 5, 95, 45), 2)
    write_pair(root, "d.jpg", 70, 70, (0, 0, 35, 35), 1)
    return root


# --------------------------------------------------------------------------------------------------------------------
# Sources and label paths


def test_find_images_accepts_folders_lists_and_mixed_case(tmp_path: Path) -> None:
    for name in ("a.JPG", "b.png", "c.Webp", "d.bmp", "e.tif", "sub/f.jpeg"):
        write_image(tmp_path / "images" / name, 20, 20)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    folder = find_images(tmp_path / "images")
    assert sorted(p.name for p, _ in folder) == ["a.JPG", "b.png", "c.Webp", "d.bmp", "e.tif", "f.jpeg"]
    listing = tmp_path / "list.txt"
    listing.write_text("images/a.JPG\n./images/b.png\n\n" + str(tmp_path / "images/sub/f.jpeg") + "\n")
    assert [p.name for p, _ in find_images(listing)] == ["a.JPG", "b.png", "f.jpeg"]
    assert len(find_images([listing, tmp_path / "images"])) == 9
    with pytest.raises(DataError, match="not found"):
        find_images(tmp_path / "missing")


def test_label_path_rule_and_override() -> None:
    assert image_to_label_path(Path("/d/images/x/images/a.jpg")) == Path("/d/images/x/labels/a.txt")  # last one only
    assert image_to_label_path(Path("/d/images/train/a.b.PNG")) == Path("/d/labels/train/a.b.txt")
    assert image_to_label_path(Path("/d/photos/a.jpg")) == Path("/d/photos/a.txt")
    override = image_to_label_path(Path("/d/pics/sub/a.jpg"), Path("/l"), Path("/d/pics"))
    assert override == Path("/l/sub/a.txt")
    assert image_to_label_path(Path("/d/pics/a.jpg"), Path("/l")) == Path("/l/a.txt")


def test_jpeg_decode_reduction_keeps_at_least_the_training_size() -> None:
    assert [reduction_factor(side, 320) for side in (319, 320, 639, 640, 1279, 1280, 2560, 5000)] == [
        1,
        1,
        1,
        2,
        2,
        4,
        8,
        8,
    ]


# --------------------------------------------------------------------------------------------------------------------
# The scan


def broken_dataset(root: Path) -> dict[str, str]:
    """One pair per problem; returns image name -> expected fragment of its warning."""
    write_pair(root, "good.jpg", 64, 48, (5, 5, 30, 30), 1)
    write_image(root / "images" / "background.jpg", 40, 40)  # no label file: background
    write_pair(root, "empty_label.jpg", 40, 40, (1, 1, 5, 5))
    (root / "labels" / "empty_label.txt").write_text("")
    (root / "images" / "random_bytes.jpg").write_bytes(os.urandom(300))
    (root / "images" / "text.jpg").write_text("this is not an image")
    (root / "images" / "zero.jpg").write_bytes(b"")
    write_image(root / "images" / "tiny.png", 8, 8)
    write_pair(root, "truncated.jpg", 64, 64, (10, 10, 50, 50), 2)
    data = (root / "images" / "truncated.jpg").read_bytes()
    (root / "images" / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    for name, rows in {
        "columns.jpg": "0 0.5 0.5 0.2\n",
        "outside.jpg": "0 0.5 0.5 0.2 0.2\n1 1.3 0.5 0.1 0.1\n",
        "negative.jpg": "0 -0.2 0.5 0.1 0.1\n",
        "class_id.jpg": "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n",
        "words.jpg": "person 0.5 0.5 0.2 0.2\n",
        "duplicates.jpg": "1 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n",
        "polygon.jpg": "2 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n",
    }.items():
        write_image(root / "images" / name, 50, 50)
        (root / "labels" / name).with_suffix(".txt").write_text(rows)
    return {
        "random_bytes.jpg": "not an image",
        "text.jpg": "not an image",
        "zero.jpg": "empty file",
        "tiny.png": "too small",
        "truncated.jpg": "truncated JPEG repaired",
        "columns.txt": "4 columns, expected 5",
        "outside.txt": "normalised to 0-1",
        "negative.txt": "normalised to 0-1",
        "class_id.txt": "class id [7] outside",
        "words.txt": "not all numbers",
        "duplicates.txt": "1 duplicate rows removed",
    }


def test_scan_reports_each_problem_once_and_never_crashes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    expected = broken_dataset(tmp_path)
    with caplog.at_level(logging.INFO):
        dataset = YOLODataset(tmp_path / "images", num_classes=3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, fragment in expected.items():
        matching = [w for w in warnings if name in w]
        assert len(matching) == 1 and fragment in matching[0], (name, matching)
    kept = sorted(Path(f).name for f in dataset.im_files)
    assert kept == ["background.jpg", "duplicates.jpg", "empty_label.jpg", "good.jpg", "polygon.jpg", "truncated.jpg"]
    labels = dict(zip((Path(f).name for f in dataset.im_files), dataset.labels, strict=True))
    np.testing.assert_allclose(labels["duplicates.jpg"], [[1, 0.5, 0.5, 0.2, 0.2], [0, 0.3, 0.3, 0.1, 0.1]])
    np.testing.assert_allclose(labels["polygon.jpg"], [[2, 0.3, 0.35, 0.4, 0.5]], atol=1e-6)
    assert labels["background.jpg"].shape == (0, 5) and labels["empty_label.jpg"].shape == (0, 5)
    assert (tmp_path / "images" / "truncated.jpg").read_bytes()[-2:] == b"\xff\xd9"  # repaired in place
    summary = next(r.getMessage() for r in caplog.records if "corrupt skipped" in r.getMessage())
    assert "15 images: 4 with labels, 1 missing label files, 1 empty label files, 9 corrupt skipped" in summary
    for index in range(len(dataset)):  # every kept image loads
        image, _, _, _ = dataset[index]
        assert image.dtype == torch.uint8


def test_scan_cache_is_reused_and_rebuilt_when_files_change(
    clean_dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    YOLODataset(clean_dataset / "images", num_classes=3)
    cache = clean_dataset / "labels.detector.cache"
    assert cache.is_file()
    with np.load(cache, allow_pickle=False) as data:  # plain arrays only, no pickle
        assert set(data.files) >= {"version", "hash", "im_files", "labels", "shapes"}
    with caplog.at_level(logging.INFO):
        YOLODataset(clean_dataset / "images", num_classes=3)
    assert any("(cache " in r.getMessage() for r in caplog.records)
    caplog.clear()
    (clean_dataset / "labels" / "a.txt").write_text("2 0.5 0.5 0.25 0.25\n0 0.1 0.1 0.1 0.1\n")
    with caplog.at_level(logging.INFO):
        dataset = YOLODataset(clean_dataset / "images", num_classes=3)
    assert any("(scan)" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(dataset.labels[0], [[2, 0.5, 0.5, 0.25, 0.25], [0, 0.1, 0.1, 0.1, 0.1]])
    assert load_scan_cache(cache, "another key") is None


def test_unwritable_cache_folder_only_warns(
    clean_dataset: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(scan_module, "atomic_write", refuse)
    with caplog.at_level(logging.WARNING):
        dataset = YOLODataset(clean_dataset / "images", num_classes=3)
    assert len(dataset) == 4
    assert any("not saved" in r.getMessage() and "Permission denied" in r.getMessage() for r in caplog.records)


def test_zero_labels_message_points_to_the_converter(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / "images" / name, 32, 32)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(DataError, match=r"0 labels found.*detector\.cli\.convert coco .*instances_train\.json"):
        YOLODataset(tmp_path / "images", augment=True)
    assert len(YOLODataset(tmp_path / "images")) == 2  # validation only warns: a background-only set is valid


def test_class_ids_are_not_checked_for_single_class_training(tmp_path: Path) -> None:
    write_pair(tmp_path, "a.jpg", 40, 40, (5, 5, 20, 20), cls=12)
    dataset = YOLODataset(tmp_path / "images", num_classes=3, single_cls=True)
    assert dataset.labels[0][:, 0].tolist() == [0.0]


# --------------------------------------------------------------------------------------------------------------------
# Items


@pytest.mark.parametrize("imgsz", [80, 40])  # 40: decoded at half size by libjpeg, orientation still applied
def test_exif_rotated_photo_pixels_and_labels_agree(tmp_path: Path, imgsz: int) -> None:
    """A phone photo stored landscape with orientation 6 (rotate 90° clockwise to display)."""
    stored = np.full((40, 80, 3), 90, np.uint8)
    stored[:, :20] = (255, 0, 0)  # red (RGB) on the stored left edge -> the displayed top edge
    exif = Image.Exif()
    exif[0x0112] = 6
    image_path = tmp_path / "images" / "phone.jpg"
    image_path.parent.mkdir(parents=True)
    Image.fromarray(stored).save(image_path, exif=exif.tobytes(), quality=95)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "phone.txt").write_text("0 0.5 0.125 1.0 0.25\n")  # labelled on the displayed (40x80) photo
    dataset = YOLODataset(tmp_path / "images", imgsz=imgsz, num_classes=1)
    assert dataset.shapes.tolist() == [[40, 80]]  # displayed width, height
    assert dataset.store.load_image(0).shape == (imgsz, imgsz // 2, 3)
    image, labels, _, _ = dataset[0]
    x1, y1, x2, y2 = xywhn2xyxy(labels[:, 2:], image.shape[2], image.shape[1])[0].round().int().tolist()
    region = image[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
    assert (region[0] > 200).float().mean() > 0.95 and (region[2] < 60).float().mean() > 0.95  # red in RGB


def test_validation_item_contract_and_inverse_mapping(clean_dataset: Path) -> None:
    dataset = YOLODataset(clean_dataset / "images", imgsz=64, num_classes=3)
    for index in range(len(dataset)):
        image, labels, path, shapes = dataset[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and image.is_contiguous()
        assert labels.shape[1] == 6 and (labels[:, 0] == 0).all()
        (original_h, original_w), ratio_pad = shapes
        assert [original_w, original_h] == dataset.shapes[index].tolist()
        boxes = xywhn2xyxy(labels[:, 2:].clone(), 64, 64)
        back = scale_boxes(boxes.clone(), (64, 64), (original_h, original_w), ratio_pad=ratio_pad)
        truth = xywhn2xyxy(torch.from_numpy(dataset.labels[index][:, 1:]), original_w, original_h)
        torch.testing.assert_close(back, truth, atol=1.0, rtol=0)
        x1, y1, x2, y2 = boxes[0].round().int().tolist()
        red = image[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
        assert (red[0] > 200).float().mean() > 0.9 and (red[2] < 60).float().mean() > 0.9, path  # RGB order


def test_rect_batch_shapes_hand_computed(tmp_path: Path) -> None:
    # width x height: two landscape (aspect h/w 0.5, 0.75), two portrait (1.5, 2.0)
    for name, (width, height) in {
        "a.jpg": (200, 100),
        "b.jpg": (200, 150),
        "c.jpg": (100, 150),
        "d.jpg": (100, 200),
    }.items():
        write_pair(tmp_path, name, width, height, (10, 10, 50, 50))
    dataset = YOLODataset(tmp_path / "images", imgsz=64, batch_size=2, rect=True, pad=0.5, stride=32, num_classes=1)
    assert [Path(f).name for f in dataset.im_files] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    # landscape batch: (h, w) = (0.75, 1) * 64 / 32 + 0.5 -> ceil(2.0, 2.5) = (2, 3) * 32; portrait: (1, 1/1.5)
    assert dataset.batch_shapes.tolist() == [[64, 96], [96, 64]]
    assert dataset[0][0].shape == (3, 64, 96) and dataset[3][0].shape == (3, 96, 64)


def test_augmented_item_is_deterministic_per_seed(clean_dataset: Path) -> None:
    dataset = YOLODataset(clean_dataset / "images", imgsz=64, augment=True, num_classes=3)
    first, again, other = dataset[(1, 123)], dataset[(1, 123)], dataset[(1, 124)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]) and first[3] is None
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (3, 64, 64)
    assert ((first[1][:, 2:] >= 0) & (first[1][:, 2:] <= 1)).all()


# --------------------------------------------------------------------------------------------------------------------
# Image caches


def test_ram_cache_matches_uncached_and_is_freed_with_the_dataset(clean_dataset: Path) -> None:
    plain = YOLODataset(clean_dataset / "images", imgsz=64, num_classes=3)
    cached = YOLODataset(clean_dataset / "images", imgsz=64, num_classes=3, cache="ram")
    assert len(cached.store.ram) == 4
    for index in range(4):
        assert torch.equal(plain[index][0], cached[index][0])
        assert torch.equal(plain[index][0], cached[index][0])  # twice: the cached array was not modified
    loader, from_loader = create_dataloader(clean_dataset / "images", imgsz=64, batch_size=2, cache="ram", workers=0)
    next(iter(loader))
    gc.disable()  # freed by reference counting alone, not by a later cycle collection
    try:
        references = [weakref.ref(cached.store.ram[0]), weakref.ref(from_loader.store.ram[0])]
        del cached, loader, from_loader
        assert [reference() for reference in references] == [None, None]
    finally:
        gc.enable()


def test_ram_cache_refused_when_memory_is_short(
    clean_dataset: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dataset_module, "available_memory", lambda: 10_000)
    with caplog.at_level(logging.WARNING):
        dataset = YOLODataset(clean_dataset / "images", imgsz=64, num_classes=3, cache="ram")
    assert dataset.store.ram == []
    message = next(r.getMessage() for r in caplog.records if "--cache ram refused" in r.getMessage())
    # 4 images resized to long side 64: (48x64 + 64x43 + 32x64 + 64x64) x 3 bytes, measured not guessed
    assert "need about 0.0 GB" in message and "continues without a cache" in message
    assert dataset.store._estimate_ram_bytes() == (48 * 64 + 43 * 64 + 32 * 64 + 64 * 64) * 3


def test_disk_cache_writes_npy_beside_images(clean_dataset: Path) -> None:
    dataset = YOLODataset(clean_dataset / "images", imgsz=64, num_classes=3, cache="disk")
    npy = clean_dataset / "images" / "a.npy"
    assert npy.is_file() and np.load(npy, allow_pickle=False).shape == (60, 80, 3)
    reference = YOLODataset(clean_dataset / "images", imgsz=64, num_classes=3)
    assert torch.equal(dataset[0][0], reference[0][0])


# --------------------------------------------------------------------------------------------------------------------
# Real data


def test_coco128_scan(coco128_dir: Path, tmp_path: Path) -> None:
    """coco128 through links in tmp_path, so the scan cache is written there and not into the shared data."""
    for kind in ("images", "labels"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "train2017").symlink_to(coco128_dir / kind / "train2017")
    dataset = YOLODataset(tmp_path / "images" / "train2017", imgsz=320, num_classes=80)
    assert len(dataset) == 128
    assert sum(len(lb) for lb in dataset.labels) == 929  # YOLOv5 reports "929 labels" for coco128
    assert sum(len(lb) == 0 for lb in dataset.labels) == 2  # two background images
    first = Path(dataset.im_files[0]).name
    width, height = Image.open(coco128_dir / "images" / "train2017" / first).size
    assert dataset.shapes[0].tolist() == [width, height]
    image, labels, _, _ = dataset[0]
    assert image.shape == (3, 320, 320) and len(labels) == len(dataset.labels[0])
