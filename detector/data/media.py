"""Image and video file types, and the one function that decodes an image file.

Every reader in the package (the dataset scan and loader, detect.py's sources, the predictor's output names) takes
its suffixes from here, so a type is supported everywhere or nowhere.

Each image suffix listed is one OpenCV decodes to an 8-bit BGR picture (``tests/unit/test_data_media.py`` writes
and reads back each one). Left out on purpose, although YOLOv5 lists them: ``.dng`` (camera raw; OpenCV decodes
no raw sensor data) and ``.pfm`` (float images: OpenCV's 8-bit conversion turns 0-1 values into a black picture).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import cv2
import numpy as np

from detector.data import turbojpeg
from detector.errors import DataError

# ".mpo" is the multi-picture JPEG many phones and 3D cameras write; OpenCV reads its first picture.
IMAGE_SUFFIXES = (".bmp", ".jpe", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")
# Suffixes cv2.imwrite can encode (chooses the format by suffix); an output with another suffix is saved as .jpg.
WRITABLE_IMAGE_SUFFIXES = tuple(suffix for suffix in IMAGE_SUFFIXES if suffix != ".mpo")
# Read with cv2.VideoCapture (FFmpeg); an animated .gif is read as a video.
VIDEO_SUFFIXES = (".asf", ".avi", ".gif", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".ts", ".webm", ".wmv")

JPEG_SUFFIXES = (".jpe", ".jpeg", ".jpg", ".mpo")
_READ_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def read_size(path: str | os.PathLike, size_wh: tuple[int, int], *, reduce: int = 1) -> tuple[int, int]:
    """The (width, height) that ``read_image(path, reduce=reduce)`` returns for an image of ``size_wh`` (upright),
    without decoding it: a JPEG decoded at 1/reduce has each side rounded up (libjpeg's scaled size); other formats
    ignore ``reduce``."""
    if reduce == 1 or not os.fspath(path).lower().endswith(JPEG_SUFFIXES):
        return size_wh
    width, height = size_wh
    return -(-width // reduce), -(-height // reduce)


def read_image(path: str | os.PathLike, *, reduce: int = 1) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 BGR, upright (OpenCV applies the EXIF orientation).

    Grey, 16-bit and alpha images become 8-bit BGR. ``reduce`` (1, 2, 4 or 8) decodes a JPEG directly at
    1/reduce of its size, which libjpeg does in the DCT domain: faster than a full decode plus a resize, and an
    area-averaging downscale in effect. Other formats ignore it.

    The file is read in one unbuffered call and ``cv2.imdecode`` decodes its bytes from memory: 4% faster than
    ``cv2.imread``, and it opens any path (``cv2.imread`` cannot open non-ASCII paths on Windows). When that fails,
    ``cv2.imread`` tries the file, as it also decodes a truncated JPEG (its missing part grey), which imdecode
    refuses.

    Raises:
        DataError: one line naming the file: not found, unreadable, empty, or not a decodable image.
    """
    return read_image_region(path, reduce=reduce).pixels


class ImageRegion(NamedTuple):
    """Pixels of a decoded image that cover a region of it (all of it, or more than asked, is allowed)."""

    pixels: np.ndarray  # (h, w, 3) uint8 BGR
    origin: tuple[int, int]  # (x, y) of pixels[0, 0] in the whole decoded image
    size: tuple[int, int]  # (width, height) of the whole decoded image


def read_image_region(
    path: str | os.PathLike, *, reduce: int = 1, region: tuple[float, float, float, float] | None = None
) -> ImageRegion:
    """:func:`read_image`'s pixels where ``region`` ((x0, y0, x1, y1), fractions of the width and height) needs
    them: for a JPEG, libjpeg-turbo decodes only a crop that covers it, 2 pixels wider on each side
    (:mod:`detector.data.turbojpeg`: the same pixels, up to twice as fast when a third of the image is shown);
    otherwise, or without that library, the whole image.

    Raises:
        DataError: as :func:`read_image`.
    """
    if reduce not in _READ_FLAGS:
        raise ValueError(f"reduce must be one of {sorted(_READ_FLAGS)}, got {reduce!r}")
    name = os.fspath(path)
    data = _read_bytes(name)
    if region is not None and name.lower().endswith(JPEG_SUFFIXES) and (jpeg := turbojpeg.decoder()) is not None:
        decoded = jpeg.decode(data, reduce=reduce, region=region)
        if decoded is not None:
            return ImageRegion(*decoded)
    image = _decode(name, data, reduce)
    return ImageRegion(image, (0, 0), (image.shape[1], image.shape[0]))


def _read_bytes(name: str) -> np.ndarray:
    """The file's bytes as a read-only uint8 array: an unbuffered read of the whole file at once, twice as fast as
    ``np.fromfile`` on small files (16 against 30 us for a 45 kB JPEG)."""
    try:
        with open(name, "rb", buffering=0) as f:
            data = np.frombuffer(f.readall(), np.uint8)
    except OSError as e:
        if not os.path.isfile(name):
            raise DataError(f"{name}: image file not found") from e
        raise DataError(f"{name}: image file cannot be read ({e.strerror or e})") from e
    if data.size == 0:
        raise DataError(f"{name}: image file is empty (0 bytes)")
    return data


def _decode(name: str, data: np.ndarray, reduce: int) -> np.ndarray:
    flag = _READ_FLAGS[reduce] if name.lower().endswith(JPEG_SUFFIXES) else cv2.IMREAD_COLOR
    image = cv2.imdecode(data, flag)
    if image is None:
        image = cv2.imread(name, flag)
    if image is None:
        raise DataError(f"{name}: not a decodable image (corrupt, or a format OpenCV cannot read)")
    return image
