"""Decoding part of a JPEG: libjpeg-turbo's TurboJPEG 3 API, through ctypes.

The fused mosaic (:class:`detector.data.augment.MosaicWarp`) shows only part of each picture it reads - 42% of the
decoded pixels on average at ``--img 320`` - and JPEG decoding is over half of a training item's time.
libjpeg-turbo can decode a region: it skips the colour conversion and inverse DCT of the rows above it (and of the
columns beside it), and stops reading the file after its last row. OpenCV's ``imdecode`` cannot ask for that and
neither can the Python bindings on PyPI (PyTurboJPEG's ``decode`` has no cropping region, the ``turbojpeg``
package's none either), so this module calls the library's C API itself: ``tj3DecompressHeader``,
``tj3SetScalingFactor``, ``tj3SetCroppingRegion`` and ``tj3Decompress8``.

Where the library comes from, first found wins: ``$DETECTOR_TURBOJPEG`` (a path to ``libturbojpeg``), the copy that
the ``turbojpeg`` wheel bundles (``pip install 'detector[fast-jpeg]'``), or a system ``libturbojpeg`` of version 3
(``ctypes.util.find_library``). Without one, :func:`decoder` returns None and images are decoded by OpenCV as
before. The pixels are OpenCV's own (both use libjpeg-turbo's default, accurate DCT and fancy upsampling; tested
bit for bit), so training draws the same images either way; files whose pixels OpenCV would treat differently - an
EXIF orientation other than upright, CMYK, 12-bit - and any decoding error or warning (a truncated file) are left
to OpenCV.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import math
import os
import site
import struct
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger(__name__)

ENV_LIBRARY = "DETECTOR_TURBOJPEG"

# TurboJPEG 3's constants (turbojpeg.h)
_TJINIT_DECOMPRESS = 1
_TJPARAM_SUBSAMP, _TJPARAM_JPEGWIDTH, _TJPARAM_JPEGHEIGHT, _TJPARAM_PRECISION, _TJPARAM_COLORSPACE = 4, 5, 6, 7, 8
_TJPARAM_STOPONWARNING = 0
_TJCS_CMYK, _TJCS_YCCK = 3, 4
_TJPF_BGR = 1
_MARGIN = 3  # pixels decoded beyond a region on each side: 2 to spare for interpolation, 1 dropped (decode())
_MCU_WIDTH = {0: 8, 1: 16, 2: 16, 3: 8, 4: 8, 5: 32, 6: 8}  # tjMCUWidth by TJSAMP_* (444, 422, 420, gray, ...)


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Scale(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


_WHOLE = _Region(0, 0, 0, 0)  # TurboJPEG's "no cropping"


class TurboJPEG:
    """A loaded ``libturbojpeg`` (version 3) and one decompressor handle per thread (a handle is not thread-safe).

    ctypes releases the GIL during each call, so the loader's item threads (``--workers 0``) decode in parallel.
    """

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        if not hasattr(lib, "tj3Init"):
            raise OSError(f"{path} is not TurboJPEG 3 (no tj3Init)")
        lib.tj3Init.restype = ctypes.c_void_p
        lib.tj3Init.argtypes = [ctypes.c_int]
        lib.tj3Destroy.argtypes = [ctypes.c_void_p]
        lib.tj3Set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.tj3Get.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.tj3DecompressHeader.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.tj3SetScalingFactor.argtypes = [ctypes.c_void_p, _Scale]
        lib.tj3SetCroppingRegion.argtypes = [ctypes.c_void_p, _Region]
        lib.tj3Decompress8.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
        ]  # fmt: skip
        self.lib = lib
        self.path = path
        self._local = threading.local()

    def _handle(self) -> int:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self.lib.tj3Init(_TJINIT_DECOMPRESS)
            if not handle:
                raise MemoryError("tj3Init failed")
            self.lib.tj3Set(handle, _TJPARAM_STOPONWARNING, 1)  # a warning (truncated file) is a failure here
            self._local.handle = handle
        return handle

    def _failed(self) -> None:
        """Forget this thread's handle after a failed call: libjpeg can keep state from a damaged file (a bogus
        Huffman table made every later file's header fail), so the next file gets a fresh handle."""
        handle = getattr(self._local, "handle", None)
        if handle is not None:
            self.lib.tj3Destroy(handle)
            self._local.handle = None

    def decode(
        self, data: np.ndarray, *, reduce: int = 1, region: tuple[float, float, float, float] | None = None
    ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]] | None:
        """Decode the JPEG bytes ``data`` (uint8) to BGR at 1/``reduce`` of its size (DCT scaling, as OpenCV's
        ``IMREAD_REDUCED_COLOR_*``), only the part that covers ``region`` when given.

        ``region`` is (x0, y0, x1, y1) in fractions of the image's width and height. The pixels returned cover it
        with at least 2 more on each side where the image has them (for interpolation). libjpeg-turbo decodes
        from the JPEG's MCU grid on the left, and a crop's outermost pixels inside the image can differ from a
        whole decode's (chroma upsampling at the crop's edge has no neighbour), so one more is decoded on each
        side and dropped. Returns ``(pixels, (x, y) of pixels[0, 0], (width, height) of the whole decoded
        image)``, or None when this file is OpenCV's to decode (see the module docstring).
        """
        if _exif_orientation(data) not in (0, 1):
            return None
        decoded = self._decode(data, reduce, region)
        if decoded is None:
            self._failed()
            return None
        pixels, (x, y, w, h), (full_w, full_h) = decoded
        # drop the crop's outermost pixels where they are not the image's own edge (see above)
        left, top = int(x > 0), int(y > 0)
        right, bottom = w - int(x + w < full_w), h - int(y + h < full_h)
        return pixels[top:bottom, left:right], (x + left, y + top), (full_w, full_h)

    def _decode(
        self, data: np.ndarray, reduce: int, region: tuple[float, float, float, float] | None
    ) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int]] | None:
        """The crop (x, y, w, h) that covers ``region`` with the margin, decoded, and the whole decoded size; None
        when a call fails or the file is OpenCV's."""
        lib, handle = self.lib, self._handle()
        address = data.ctypes.data
        if lib.tj3DecompressHeader(handle, address, data.size) != 0:
            return None
        if lib.tj3Get(handle, _TJPARAM_PRECISION) != 8 or lib.tj3Get(handle, _TJPARAM_COLORSPACE) in (
            _TJCS_CMYK,
            _TJCS_YCCK,
        ):
            return None
        width, height = lib.tj3Get(handle, _TJPARAM_JPEGWIDTH), lib.tj3Get(handle, _TJPARAM_JPEGHEIGHT)
        if lib.tj3SetScalingFactor(handle, _Scale(1, reduce)) != 0:
            return None
        full_w, full_h = -(-width // reduce), -(-height // reduce)  # libjpeg rounds scaled sizes up
        x, y, w, h = 0, 0, full_w, full_h
        mcu = _MCU_WIDTH.get(lib.tj3Get(handle, _TJPARAM_SUBSAMP))
        if region is not None and mcu is not None:
            x0, y0, x1, y1 = region
            step = max(1, mcu // reduce)  # the scaled iMCU width: the left edge must lie on it
            x = max(0, math.floor(x0 * full_w) - _MARGIN) // step * step
            y = max(0, math.floor(y0 * full_h) - _MARGIN)
            w = min(full_w, math.ceil(x1 * full_w) + _MARGIN) - x
            h = min(full_h, math.ceil(y1 * full_h) + _MARGIN) - y
            if w <= 2 or h <= 2:
                x, y, w, h = 0, 0, full_w, full_h
        crop = _WHOLE if (w, h) == (full_w, full_h) else _Region(x, y, w, h)
        if lib.tj3SetCroppingRegion(handle, crop) != 0:
            return None
        pixels = np.empty((h, w, 3), np.uint8)
        if lib.tj3Decompress8(handle, address, data.size, pixels.ctypes.data, 0, _TJPF_BGR) != 0:
            return None
        return pixels, (x, y, w, h), (full_w, full_h)


def _exif_orientation(data: np.ndarray) -> int:
    """The EXIF orientation tag of JPEG bytes (1 = upright), 0 when the file has none; read from the APP1 segment
    before the image data, without decoding."""
    raw = memoryview(data)
    position = 2  # after SOI
    while position + 4 <= len(raw) and raw[position] == 0xFF:
        marker = raw[position + 1]
        if marker == 0xFF:  # a fill byte before the marker
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if marker == 0xDA:  # start of scan: no APP1 before it
            return 0
        length = (raw[position + 2] << 8) | raw[position + 3]
        if marker == 0xE1 and bytes(raw[position + 4 : position + 10]) == b"Exif\x00\x00":
            return _tiff_orientation(bytes(raw[position + 10 : position + 2 + length]))
        position += 2 + length
    return 0


def _tiff_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 of a TIFF header (EXIF's), 0 when absent or unreadable."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 0
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 0
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == 0x0112:
            return struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, entry + 8)[0]
    return 0


def _candidate_paths() -> list[str]:
    """Where a libturbojpeg 3 may be, in order (module docstring)."""
    paths = [os.environ[ENV_LIBRARY]] if os.environ.get(ENV_LIBRARY) else []
    folders = dict.fromkeys([sysconfig.get_paths()["platlib"], *site.getsitepackages(), *sys.path])
    for folder in folders:
        # the turbojpeg wheel's bundled copy: Linux (auditwheel), macOS (delocate), Windows (delvewheel)
        for pattern in ("turbojpeg.libs/libturbojpeg*.so*", "turbojpeg.dylibs/libturbojpeg*.dylib", "turbojpeg-*.dll"):
            paths.extend(sorted(glob.glob(str(Path(folder) / pattern))))
    system = ctypes.util.find_library("turbojpeg")
    if system:
        paths.append(system)
    return paths


@functools.cache
def decoder() -> TurboJPEG | None:
    """The TurboJPEG 3 decoder, or None when no library is found (OpenCV decodes then); loaded once per process.
    ``$DETECTOR_TURBOJPEG=off`` turns it off."""
    if os.environ.get(ENV_LIBRARY, "").lower() in ("0", "off", "none"):
        return None
    for path in _candidate_paths():
        try:
            return TurboJPEG(path)
        except OSError as e:
            if path == os.environ.get(ENV_LIBRARY):  # asked for by name: say why it is not used
                LOGGER.warning("WARNING: $%s=%s cannot be used (%s); looking elsewhere", ENV_LIBRARY, path, e)
    return None
