"""Decoding part of a JPEG with libjpeg-turbo (detector.data.turbojpeg): OpenCV's pixels, only fewer of them.

Skipped where no libturbojpeg 3 is found (``pip install 'detector[fast-jpeg]'``; CI installs it with ``dev``).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detector.config import load_hyp
from detector.data import turbojpeg
from detector.data.dataset import YOLODataset
from detector.data.media import read_image, read_image_region

COCO128 = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "coco128"

pytestmark = pytest.mark.skipif(turbojpeg.decoder() is None, reason="no libturbojpeg 3 (detector[fast-jpeg])")


def jpeg_bytes(image: np.ndarray, **save: object) -> np.ndarray:
    """``image`` (BGR) as JPEG bytes written by Pillow with ``save`` options (subsampling, progressive, exif...)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[..., ::-1])).save(buffer, "JPEG", quality=90, **save)
    return np.frombuffer(buffer.getvalue(), np.uint8).copy()


def noisy(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (5, 5), 0)


def files() -> dict[str, np.ndarray]:
    """JPEG bytes of each chroma subsampling, progressive and greyscale, at sizes off the MCU grid."""
    rng = np.random.default_rng(0)
    found = {
        f"subsampling {s}": jpeg_bytes(noisy(rng, 123, 201), subsampling=s) for s in (0, 1, 2)
    }  # 4:4:4, 4:2:2, 4:2:0
    found["progressive"] = jpeg_bytes(noisy(rng, 90, 77), progressive=True)
    buffer = io.BytesIO()
    Image.fromarray(noisy(rng, 70, 95)[..., 0]).save(buffer, "JPEG", quality=90)
    found["grey"] = np.frombuffer(buffer.getvalue(), np.uint8).copy()
    for path in sorted((COCO128 / "images" / "train2017").glob("*.jpg"))[:6]:
        found[path.name] = np.fromfile(path, np.uint8)
    return found


@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_whole_image_is_opencvs_decode_bit_for_bit(reduce: int) -> None:
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
    flag[8] = cv2.IMREAD_REDUCED_COLOR_8
    for name, data in files().items():
        pixels, origin, size = turbojpeg.decoder().decode(data, reduce=reduce)
        expected = cv2.imdecode(data, flag[reduce])
        assert origin == (0, 0) and size == (expected.shape[1], expected.shape[0]), name
        np.testing.assert_array_equal(pixels, expected, err_msg=name)


@pytest.mark.parametrize("reduce", [1, 2])
def test_a_region_is_the_same_pixels_as_the_whole_decode_there(reduce: int) -> None:
    """Random regions: the crop equals the whole image's pixels at its origin (its edge too: 4:2:2, 4:2:0 and
    progressive files differ there unless a pixel is dropped), covers the region with 2 pixels to spare on each
    side (where the image has them), and was decoded from the MCU grid; most of the image is not decoded."""
    rng = np.random.default_rng(1)
    for name, data in files().items():
        whole = cv2.imdecode(data, cv2.IMREAD_COLOR if reduce == 1 else cv2.IMREAD_REDUCED_COLOR_2)
        height, width = whole.shape[:2]
        for _ in range(8):
            x0, x1 = sorted(rng.uniform(0, 1, 2))
            y0, y1 = sorted(rng.uniform(0, 1, 2))
            pixels, (x, y), size = turbojpeg.decoder().decode(data, reduce=reduce, region=(x0, y0, x1, y1))
            assert size == (width, height)
            crop_h, crop_w = pixels.shape[:2]
            np.testing.assert_array_equal(pixels, whole[y : y + crop_h, x : x + crop_w], err_msg=name)
            assert x <= max(0, np.floor(x0 * width) - 2) and x + crop_w >= min(width, np.ceil(x1 * width) + 2)
            assert y <= max(0, np.floor(y0 * height) - 2) and y + crop_h >= min(height, np.ceil(y1 * height) + 2)
            assert x == 0 or (x - 1) % max(1, 8 // reduce) == 0  # decoded from the MCU grid, one pixel dropped
            if x1 - x0 < 0.5 and y1 - y0 < 0.5 and min(width, height) > 64:
                assert crop_w * crop_h < 0.6 * width * height


def test_files_opencv_treats_differently_are_left_to_opencv(tmp_path: Path) -> None:
    """An EXIF rotation (OpenCV turns the picture upright), CMYK and a truncated file: the decoder declines, and
    read_image_region returns what read_image returns."""
    rng = np.random.default_rng(2)
    image = noisy(rng, 48, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    rotated = jpeg_bytes(image, exif=exif.tobytes())
    cmyk = io.BytesIO()
    Image.fromarray(image[..., ::-1]).convert("CMYK").save(cmyk, "JPEG", quality=90)
    whole = jpeg_bytes(noisy(rng, 64, 64))
    cases = {
        "rotated.jpg": rotated,
        "cmyk.jpg": np.frombuffer(cmyk.getvalue(), np.uint8),
        "truncated.jpg": whole[: len(whole) * 2 // 3],
    }
    for name, data in cases.items():
        assert turbojpeg.decoder().decode(data, region=(0.2, 0.2, 0.6, 0.6)) is None, name
        path = tmp_path / name
        data.tofile(path)
        read = read_image_region(path, region=(0.2, 0.2, 0.6, 0.6))
        np.testing.assert_array_equal(read.pixels, read_image(path), err_msg=name)
        assert read.origin == (0, 0) and read.size == (read.pixels.shape[1], read.pixels.shape[0])
    assert read_image(tmp_path / "rotated.jpg").shape[:2] == (80, 48)  # upright: OpenCV applied the tag


def test_damaged_files_never_crash_or_give_other_pixels_or_spoil_the_next() -> None:
    """Fuzzing the C library through ctypes: 300 damaged copies of the test files (bytes overwritten, the header
    garbled, truncated, bytes inserted, the last rows' bytes overwritten). A crash would take the loader worker
    with it; whatever the decoder returns must be OpenCV's pixels there (damaged entropy data often decodes
    without a warning, to the same garbage in both); and an undamaged file decodes after each (a bogus Huffman
    table once left the thread's handle failing every later header, silently sending all files to OpenCV)."""
    rng = np.random.default_rng(3)
    sources = list(files().values())
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
    decoded = declined = 0
    for case in range(300):
        data = sources[case % len(sources)].copy()
        damage = case % 5
        if damage == 0:  # bytes anywhere
            data[rng.integers(0, data.size, 10)] = rng.integers(0, 256, 10)
        elif damage == 1:  # the header's markers and tables
            data[rng.integers(0, min(600, data.size), 4)] = rng.integers(0, 256, 4)
        elif damage == 2:
            data = data[: rng.integers(2, data.size)]
        elif damage == 3:
            at = int(rng.integers(0, data.size))
            data = np.concatenate([data[:at], rng.integers(0, 256, 30, dtype=np.uint8), data[at:]])
        else:  # the last rows' bytes, which a region at the top need not read
            data[rng.integers(data.size * 9 // 10, data.size, 10)] = rng.integers(0, 256, 10)
        reduce = int(rng.choice([1, 2, 4]))
        x0, y0 = rng.uniform(0, 0.7), rng.uniform(0, 0.7 if damage < 4 else 0.2)
        result = turbojpeg.decoder().decode(data, reduce=reduce, region=(x0, y0, x0 + 0.3, y0 + 0.3))
        assert turbojpeg.decoder().decode(sources[0], region=(0.2, 0.2, 0.6, 0.6)) is not None, case
        if result is None:
            declined += 1
            continue
        pixels, (x, y), (width, height) = result
        whole = cv2.imdecode(data, flags[reduce])
        if whole is None:  # cut after the region: libjpeg-turbo stopped reading before the damage
            assert damage == 2
            continue
        assert whole.shape[:2] == (height, width)
        np.testing.assert_array_equal(pixels, whole[y : y + pixels.shape[0], x : x + pixels.shape[1]])
        decoded += 1
    assert decoded > 50 and declined > 50


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_read_without_decoding(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "maker"  # another tag before it in the IFD
    data = jpeg_bytes(np.zeros((16, 16, 3), np.uint8), exif=exif.tobytes())
    assert turbojpeg._exif_orientation(data) == orientation
    filled = np.concatenate([data[:2], np.full(3, 0xFF, np.uint8), data[2:]])  # fill bytes before the first marker
    assert turbojpeg._exif_orientation(filled) == orientation
    assert turbojpeg._exif_orientation(jpeg_bytes(np.zeros((16, 16, 3), np.uint8))) == 0  # no EXIF at all


@pytest.mark.skipif(not COCO128.is_dir(), reason="needs ../shared/datasets/coco128")
@pytest.mark.parametrize("imgsz", [160, 320])
def test_training_items_are_the_same_with_and_without_it(monkeypatch, imgsz: int) -> None:
    """The fused mosaic reads only the part of each photo it shows: every training item of coco128 photos (mosaic,
    hyp.scratch-low) has the same pixels and labels as when OpenCV decodes whole images, and regions were read."""
    dataset = YOLODataset(
        COCO128 / "images" / "train2017", imgsz=imgsz, augment=True, hyp=load_hyp("hyp.scratch-low.yaml")
    )
    regions, pairs = items_with_and_without(monkeypatch, dataset, range(40))
    assert len(regions) > 100 and all(region is not None for region in regions)
    for (image_a, labels_a, *_), (image_b, labels_b, *_) in pairs:
        assert torch.equal(labels_a, labels_b) and torch.equal(image_a, image_b)


def items_with_and_without(monkeypatch, dataset: YOLODataset, keys) -> tuple[list, list]:
    """The regions the decoder was asked for, and (item with it, item without it) for each key."""
    regions: list[tuple[float, ...]] = []
    decode = turbojpeg.TurboJPEG.decode

    def counting(self, data, *, reduce=1, region=None):
        regions.append(region)
        return decode(self, data, reduce=reduce, region=region)

    monkeypatch.setattr(turbojpeg.TurboJPEG, "decode", counting)
    with_it = [dataset[key] for key in keys]
    monkeypatch.setattr(turbojpeg, "decoder", lambda: None)
    without = [dataset[key] for key in keys]
    return regions, list(zip(with_it, without, strict=True))


def test_the_library_can_be_named_or_turned_off(monkeypatch, caplog) -> None:
    found = turbojpeg.decoder().path
    try:
        monkeypatch.setenv(turbojpeg.ENV_LIBRARY, "off")
        turbojpeg.decoder.cache_clear()
        assert turbojpeg.decoder() is None
        monkeypatch.setenv(turbojpeg.ENV_LIBRARY, found)
        turbojpeg.decoder.cache_clear()
        assert turbojpeg.decoder().path == found
        monkeypatch.setenv(turbojpeg.ENV_LIBRARY, "/nowhere/libturbojpeg.so")
        turbojpeg.decoder.cache_clear()
        assert turbojpeg.decoder() is not None  # found elsewhere, after one line saying why not there
        assert "$DETECTOR_TURBOJPEG=/nowhere/libturbojpeg.so cannot be used" in caplog.text
    finally:
        monkeypatch.delenv(turbojpeg.ENV_LIBRARY)
        turbojpeg.decoder.cache_clear()


@pytest.mark.skipif(not COCO128.is_dir(), reason="needs ../shared/datasets/coco128")
def test_training_tiles_are_the_same_with_and_without_it(monkeypatch) -> None:
    """--train-tile decodes only each tile's part of the full-resolution photo: the same items as a whole decode."""
    dataset = YOLODataset(
        COCO128 / "images" / "train2017", imgsz=192, augment=True, hyp=load_hyp("hyp.scratch-low.yaml"), train_tile=192
    )
    regions, pairs = items_with_and_without(monkeypatch, dataset, [(index, index) for index in range(24)])
    assert len(regions) >= 24 and all((x1 - x0) * (y1 - y0) < 0.5 for x0, y0, x1, y1 in regions)  # tiles, not images
    for (image_a, labels_a, *_), (image_b, labels_b, *_) in pairs:
        assert torch.equal(labels_a, labels_b) and torch.equal(image_a, image_b)
