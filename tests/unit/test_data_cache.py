"""Where the label scan cache goes: beside writable labels, else (or with --cache-dir) a cache folder, never into
a read-only dataset; and polygon outlines survive the scan and the cache."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.config import Hyperparameters
from detector.data.augment import CopyPaste
from detector.data.dataset import YOLODataset
from detector.data.dataset_config import load_dataset_config
from detector.data.loader import create_dataloader
from detector.data.scan import CACHE_SUFFIX, folder_is_writable, label_cache_path, load_scan_cache
from detector.engine.validator import create_val_dataloader


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user cache folder of these tests: $XDG_CACHE_HOME/detector under tmp_path."""
    monkeypatch.delenv("DETECTOR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "detector"


def write_pair(root: Path, name: str, width: int, height: int, box: tuple[int, int, int, int], cls: int) -> None:
    """A grey image with one red rectangle, and its label file (YOLOv5's images/ -> labels/ layout)."""
    image = np.full((height, width, 3), 90, np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = (0, 0, 255)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / "images" / name), image)
    row = f"{cls} {(x1 + x2) / 2 / width} {(y1 + y2) / 2 / height} {(x2 - x1) / width} {(y2 - y1) / height}\n"
    (root / "labels" / Path(name).with_suffix(".txt")).write_text(row)


def make_dataset(root: Path) -> Path:
    write_pair(root, "a.jpg", 40, 30, (5, 5, 20, 20), 0)
    write_pair(root, "b.jpg", 30, 40, (10, 10, 25, 35), 1)
    return root / "images"


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """chmod a-w for the duration: refused by folder_is_writable for every user, root included."""
    mode = folder.stat().st_mode
    folder.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        folder.chmod(mode)


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def cache_source(caplog: pytest.LogCaptureFixture) -> str:
    """'scan' or 'cache <path>' from the latest dataset summary line."""
    summary = [r.getMessage() for r in caplog.records if "corrupt skipped" in r.getMessage()][-1]
    return summary.rsplit("(", 1)[1].rstrip(")")


def test_writability_probe(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    assert folder_is_writable(tmp_path / "dir")
    assert not folder_is_writable(tmp_path / "missing") and not folder_is_writable(tmp_path / "file")
    with read_only(tmp_path / "dir"):
        assert not folder_is_writable(tmp_path / "dir")


def test_cache_path_rule(tmp_path: Path, user_cache: Path) -> None:
    labels = tmp_path / "set" / "labels" / "train.v2"
    labels.mkdir(parents=True)
    assert label_cache_path(labels) == labels.parent / "train.v2.detector.cache"  # beside, YOLOv5's place
    with read_only(labels.parent):
        in_user_cache = label_cache_path(labels)
    assert in_user_cache.parent == user_cache / "labels"
    assert in_user_cache.name.startswith("set-labels-train.v2-") and in_user_cache.name.endswith(CACHE_SUFFIX)
    assert label_cache_path(labels, tmp_path / "mine") == tmp_path / "mine" / in_user_cache.name  # --cache-dir
    # Same folder names elsewhere: another file.
    other = tmp_path / "copy" / "set" / "labels" / "train.v2"
    other.mkdir(parents=True)
    assert label_cache_path(other, tmp_path / "mine") != label_cache_path(labels, tmp_path / "mine")


def test_read_only_dataset_gets_no_file_and_reuses_the_user_cache(
    tmp_path: Path, user_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = make_dataset(tmp_path / "set")
    before = files_under(tmp_path / "set")
    with read_only(tmp_path / "set" / "labels"), read_only(tmp_path / "set"):
        with caplog.at_level(logging.INFO):
            first = YOLODataset(images, num_classes=2)
        assert cache_source(caplog) == "scan"
        caplog.clear()
        with caplog.at_level(logging.INFO):
            second = YOLODataset(images, num_classes=2)
    assert files_under(tmp_path / "set") == before  # nothing written into the dataset
    cached = list((user_cache / "labels").glob(f"*{CACHE_SUFFIX}"))
    assert len(cached) == 1 and cache_source(caplog) == f"cache {cached[0]}"
    for kept, reread in zip(first.labels, second.labels, strict=True):
        np.testing.assert_array_equal(kept, reread)


def test_cache_dir_option_puts_it_there(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = make_dataset(tmp_path / "set")
    before = files_under(tmp_path / "set")
    create_dataloader(images, imgsz=32, batch_size=2, workers=0, cache_dir=tmp_path / "caches", num_classes=2)
    assert files_under(tmp_path / "set") == before
    (cache,) = (tmp_path / "caches").iterdir()
    with caplog.at_level(logging.INFO):
        create_dataloader(images, imgsz=32, batch_size=2, workers=0, cache_dir=str(tmp_path / "caches"), num_classes=2)
    assert cache_source(caplog) == f"cache {cache}"
    # val.py's path: ValConfig.cache_dir reaches the validation loader.
    yaml_path = tmp_path / "set.yaml"
    yaml_path.write_text(f"path: {tmp_path / 'set'}\ntrain: images\nval: images\nnames: [a, b]\n")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        create_val_dataloader(load_dataset_config(str(yaml_path)), imgsz=32, workers=0, cache_dir=str(cache.parent))
    assert cache_source(caplog) == f"cache {cache}"
    assert files_under(tmp_path / "set") == before


def test_two_datasets_get_two_cache_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = make_dataset(tmp_path / "one" / "set")
    second = tmp_path / "two" / "set" / "images"
    write_pair(tmp_path / "two" / "set", "c.jpg", 50, 50, (1, 1, 40, 40), 1)
    for images in (first, second, first, second):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            dataset = YOLODataset(images, num_classes=2, cache_dir=tmp_path / "caches")
        assert len(dataset) == (2 if images == first else 1)
    assert len(list((tmp_path / "caches").iterdir())) == 2
    assert cache_source(caplog).startswith("cache ")  # the second round reads each one's own file


# --------------------------------------------------------------------------------------------------------------------
# Polygons: kept by the scan, through the cache


POLYGON_ROWS = (
    "3 0.1 0.2 0.5 0.2 0.3 0.6\n"  # a triangle: box x 0.1-0.5, y 0.2-0.6
    "1 0.5 0.5 0.2 0.2\n"  # a plain box
    "2 0.6 0.6 0.9 0.6 0.9 0.9 0.6 0.9\n"  # a square outline
    "2 0.6 0.6 0.9 0.6 0.6 0.9 0.9 0.9\n"  # the same box, another outline (a bow tie): not a duplicate
    "3 0.1 0.2 0.5 0.2 0.3 0.6\n"  # a duplicate of row 1: removed
)


def test_polygons_survive_the_scan_and_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_pair(tmp_path, "a.jpg", 50, 50, (5, 5, 20, 20), 0)  # boxes only
    write_pair(tmp_path, "b.jpg", 50, 50, (5, 5, 20, 20), 0)
    (tmp_path / "labels" / "b.txt").write_text(POLYGON_ROWS)
    with caplog.at_level(logging.INFO):
        scanned = YOLODataset(tmp_path / "images", num_classes=4)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cached = YOLODataset(tmp_path / "images", num_classes=4)
    assert cache_source(caplog).startswith("cache ")
    for dataset in (scanned, cached):
        assert dataset.segments[0] == []  # boxes-only image: no per-row arrays
        labels, outlines = dataset.labels[1], dataset.segments[1]
        expected = [
            [3, 0.3, 0.4, 0.4, 0.4],
            [1, 0.5, 0.5, 0.2, 0.2],
            [2, 0.75, 0.75, 0.3, 0.3],
            [2, 0.75, 0.75, 0.3, 0.3],
        ]
        np.testing.assert_allclose(labels, expected, atol=1e-6)
        assert [o.shape for o in outlines] == [(3, 2), (0, 2), (4, 2), (4, 2)]
        np.testing.assert_allclose(outlines[0], [[0.1, 0.2], [0.5, 0.2], [0.3, 0.6]], atol=1e-7)
        np.testing.assert_allclose(outlines[3], [[0.6, 0.6], [0.9, 0.6], [0.6, 0.9], [0.9, 0.9]], atol=1e-7)
        assert dataset.store.load_polygons(0) == [None]
        polygons = dataset.store.load_polygons(1)
        assert polygons[1] is None and np.array_equal(polygons[2], outlines[2])
    assert any("1 duplicate rows removed" in r.getMessage() for r in caplog.records)
    cache_file = tmp_path / "labels.detector.cache"
    with np.load(cache_file, allow_pickle=False) as data:
        assert data["segment_counts"].tolist() == [0, 3, 0, 4, 4]  # a.jpg's one box, then b.jpg's rows
        assert data["segment_points"].shape == (11, 2)
    assert load_scan_cache(cache_file, "stale key") is None


def test_polygon_row_with_an_even_column_count_is_one_line_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_pair(tmp_path, "a.jpg", 50, 50, (5, 5, 20, 20), 0)
    write_pair(tmp_path, "b.jpg", 50, 50, (5, 5, 20, 20), 0)
    (tmp_path / "labels" / "b.txt").write_text("0 0.1 0.1 0.5 0.1 0.5\n")
    with caplog.at_level(logging.WARNING):
        dataset = YOLODataset(tmp_path / "images", num_classes=1)
    assert len(dataset) == 1
    (warning,) = [r.getMessage() for r in caplog.records if "b.txt" in r.getMessage()]
    assert "row 1 has 6 columns, expected 5" in warning and "odd number >= 7" in warning and "\n" not in warning


@pytest.mark.skipif(os.name != "posix", reason="chmod semantics")
def test_truncated_jpeg_in_a_read_only_folder_is_not_rewritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_pair(tmp_path, "cut.jpg", 64, 64, (10, 10, 50, 50), 0)
    image = tmp_path / "images" / "cut.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) * 2 // 3])
    with read_only(tmp_path / "images"), caplog.at_level(logging.WARNING):
        dataset = YOLODataset(tmp_path / "images", imgsz=64, num_classes=1)
    assert image.read_bytes() == data[: len(data) * 2 // 3]
    assert any("not repaired (read-only folder)" in r.getMessage() for r in caplog.records)
    assert dataset[0][0].shape == (3, 64, 64)  # OpenCV still decodes what is there


def test_copy_paste_in_the_dataset_reads_the_scanned_outlines(tmp_path: Path) -> None:
    write_pair(tmp_path, "a.jpg", 50, 50, (5, 5, 20, 20), 0)
    write_pair(tmp_path, "b.jpg", 50, 50, (5, 5, 20, 20), 0)
    (tmp_path / "labels" / "b.txt").write_text(POLYGON_ROWS)
    hyp = Hyperparameters(copy_paste=1.0)
    dataset = YOLODataset(tmp_path / "images", imgsz=64, num_classes=4, hyp=hyp, augment=True)
    mosaic, copy_paste, _ = dataset.transforms.steps[0].steps
    assert isinstance(copy_paste, CopyPaste) and copy_paste.source is dataset.store is mosaic.source
    first, again = dataset[(1, 12345)], dataset[(1, 12345)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[0].shape == (3, 64, 64) and ((first[1][:, 2:] >= 0) & (first[1][:, 2:] <= 1)).all()


def test_disk_image_cache_writes_nothing_into_a_read_only_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = make_dataset(tmp_path / "set")
    before = files_under(images)
    with read_only(images), caplog.at_level(logging.WARNING):
        dataset = YOLODataset(images, imgsz=32, num_classes=2, cache="disk")
    assert files_under(images) == before and dataset.store.cache == ""
    assert any("--cache disk" in r.getMessage() and "read-only" in r.getMessage() for r in caplog.records)
    assert dataset[0][0].shape == (3, 32, 32)
