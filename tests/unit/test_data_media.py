"""detector.data.media: every listed image suffix really decodes, through the one reader every component uses."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.data.dataset import YOLODataset, find_images
from detector.data.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, WRITABLE_IMAGE_SUFFIXES, read_image
from detector.engine.sources import open_source
from detector.errors import DataError

LOSSLESS = {".bmp", ".png", ".tif", ".tiff", ".webp"}  # OpenCV writes WebP lossless at quality > 100


def gradient(height: int = 24, width: int = 40) -> np.ndarray:
    """A BGR test picture whose every pixel differs from its neighbours."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 6 % 256, y * 10 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


def write_any(path: Path, image: np.ndarray) -> None:
    """cv2.imwrite where OpenCV writes the suffix; an .mpo is a JPEG stream (its first picture) under that name."""
    if path.suffix == ".mpo":
        ok, encoded = cv2.imencode(".jpg", image)
        assert ok
        path.write_bytes(encoded.tobytes())
        return
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if path.suffix == ".webp" else []
    assert cv2.imwrite(str(path), image, params), f"OpenCV cannot write {path.suffix}"


def test_the_lists() -> None:
    assert set(WRITABLE_IMAGE_SUFFIXES) == set(IMAGE_SUFFIXES) - {".mpo"}
    assert not set(IMAGE_SUFFIXES) & set(VIDEO_SUFFIXES)
    assert all(s == s.lower() and s.startswith(".") for s in (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES))
    assert ".dng" not in IMAGE_SUFFIXES and ".pfm" not in IMAGE_SUFFIXES  # OpenCV gives no usable 8-bit picture


@pytest.mark.parametrize("suffix", IMAGE_SUFFIXES)
def test_every_suffix_round_trips_through_the_one_reader(tmp_path: Path, suffix: str) -> None:
    image = gradient()
    path = tmp_path / f"picture{suffix}"
    write_any(path, image)
    decoded = read_image(path)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    if suffix in LOSSLESS:
        np.testing.assert_array_equal(decoded, image)
    else:  # JPEG: lossy, but close
        assert np.abs(decoded.astype(int) - image).mean() < 8


def test_dataset_scan_and_detect_sources_accept_every_suffix(tmp_path: Path) -> None:
    """One list for all readers: the training scan keeps, and detect.py reads, a file of each suffix."""
    (tmp_path / "images").mkdir()
    for index, suffix in enumerate(IMAGE_SUFFIXES):
        write_any(tmp_path / "images" / f"{index}{suffix}", gradient())
    assert len(find_images(tmp_path / "images")) == len(IMAGE_SUFFIXES)
    dataset = YOLODataset(tmp_path / "images", imgsz=32)
    assert sorted(Path(f).suffix for f in dataset.im_files) == sorted(IMAGE_SUFFIXES)
    frames = [batch[0] for batch in open_source(tmp_path / "images")]
    assert len(frames) == len(IMAGE_SUFFIXES) and all(f.image.shape == (24, 40, 3) for f in frames)


def test_reduced_jpeg_decode_halves_each_side(tmp_path: Path) -> None:
    image = cv2.resize(gradient(), (160, 96), interpolation=cv2.INTER_NEAREST)
    write_any(tmp_path / "a.jpg", image)
    assert read_image(tmp_path / "a.jpg", reduce=2).shape == (48, 80, 3)
    assert read_image(tmp_path / "a.jpg", reduce=8).shape == (12, 20, 3)
    write_any(tmp_path / "a.png", image)
    assert read_image(tmp_path / "a.png", reduce=2).shape == (96, 160, 3)  # only JPEG decodes reduced
    with pytest.raises(ValueError, match="reduce must be one of"):
        read_image(tmp_path / "a.jpg", reduce=3)


def test_non_ascii_path_grey_and_alpha(tmp_path: Path) -> None:
    image = gradient()
    path = tmp_path / "bilder_äöü_画像.png"
    cv2.imencode(".png", image)[1].tofile(str(path))
    np.testing.assert_array_equal(read_image(path), image)
    grey = image[:, :, 0]
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), np.repeat(grey[:, :, None], 3, axis=2))
    cv2.imwrite(str(tmp_path / "alpha.png"), np.dstack([image, np.full(image.shape[:2], 128, np.uint8)]))
    np.testing.assert_array_equal(read_image(tmp_path / "alpha.png"), image)


def test_truncated_jpeg_still_decodes(tmp_path: Path) -> None:
    """cv2.imdecode refuses a JPEG that ends early; the reader keeps cv2.imread's tolerance for it."""
    write_any(tmp_path / "cut.jpg", cv2.resize(gradient(), (64, 64)))
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert read_image(tmp_path / "cut.jpg").shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "image file not found"), (b"", r"image file is empty \(0 bytes\)"), (b"garbage", "not a decodable image")],
    ids=["missing", "empty", "garbage"],
)
def test_unreadable_files_are_one_line_errors_naming_the_file(
    tmp_path: Path, content: bytes | None, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match=rf"^{path}: {message}") as error:
        read_image(path)
    assert "\n" not in str(error.value)
