"""Where detect.py's frames come from: images, folders, globs, .txt lists, videos, webcams, stream URLs, arrays.

:func:`open_source` turns whatever the user passed to ``--source`` (or to :class:`detector.Detector`) into a
:class:`Source`, an iterable of batches of :class:`Frame`. Files are read one at a time in a fixed order; live
streams (webcam indices, rtsp/rtmp/http URLs, ``.streams`` lists) are read by one background thread each, and
every batch holds the newest frame of each stream that has produced one since the previous batch, so a slow model
drops frames instead of falling behind.

Frames are BGR ``uint8`` arrays shaped (H, W, 3), exactly as OpenCV decodes them. A source that does not exist or
cannot be opened is a one-line :class:`DataError`; an unreadable image or video inside a folder or list is logged,
skipped and counted (``Source.skipped``), and only a source with nothing readable at all is an error.
"""

from __future__ import annotations

import glob
import logging
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from detector.data.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image
from detector.errors import DataError

LOGGER = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://")
_GLOB_CHARACTERS = re.compile(r"[*?\[]")

# OpenCV's FFmpeg backend otherwise waits ~30 s on an unreachable camera; these make it fail in 10 s.
_STREAM_TIMEOUTS_MS = 10_000
_RECONNECT_ATTEMPTS = 3
_DEFAULT_STREAM_FPS = 30.0
_UNREADABLE_VIDEO = "cannot read video (not a video, or a codec this OpenCV build lacks)"

ImageInput = str | Path | np.ndarray  # or a PIL.Image.Image (RGB or any other mode)
SourceInput = str | Path | int | np.ndarray | Sequence[ImageInput]


@dataclass(frozen=True)
class Frame:
    """One decoded frame and where it came from.

    ``image`` is (H, W, 3) uint8 BGR. ``index``/``count`` number the files of the source (1-based) or the streams;
    ``frame`` is the 1-based frame number inside a video or stream (0 for a still image), ``frames`` the video's
    frame count (0 when unknown: live streams), ``fps`` its frame rate (0 for still images).
    """

    image: np.ndarray
    path: str
    kind: Literal["image", "video", "stream"]
    index: int
    count: int
    frame: int = 0
    frames: int = 0
    fps: float = 0.0

    def describe(self) -> str:
        """The start of a detect.py log line: 'image 1/2 bus.jpg', 'video 1/1 (frame 3/30) v.mp4', 'stream 0 url'."""
        if self.kind == "image":
            return f"image {self.index}/{self.count} {self.path}"
        if self.kind == "video":
            total = f"/{self.frames}" if self.frames else ""
            return f"video {self.index}/{self.count} (frame {self.frame}{total}) {self.path}"
        return f"stream {self.index} (frame {self.frame}) {self.path}"


class Source(Protocol):
    """An iterable of frame batches (one frame per batch for files; one per stream with a new frame for streams)."""

    is_live: bool  # True for webcams and stream URLs: infinite, frames may be dropped
    skipped: int  # unreadable images/videos skipped so far

    def __iter__(self) -> Iterator[list[Frame]]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------------------------
# Resolving what the user typed


def open_source(source: SourceInput, vid_stride: int = 1) -> Source:
    """The :class:`Source` for a ``--source`` value or a Python API input.

    Accepted: an image or video file; a folder (its images and videos, not recursive); a glob ('data/*.jpg',
    'data/**/*.png'); a .txt file listing one path per line; a webcam index (0 or "0"); an rtsp/rtmp/http(s)
    stream URL (an http(s) URL ending in an image or video suffix is read as that file); a .streams file listing
    one URL or webcam index per line; an (H, W, 3) BGR uint8 array (or a grey (H, W) one, converted as OpenCV
    converts a grey file); a PIL image (any mode, EXIF orientation applied); or a list mixing paths, arrays and
    PIL images. ``vid_stride`` keeps every n-th frame of videos and streams.
    """
    if not isinstance(vid_stride, int) or vid_stride < 1:
        raise DataError(f"--vid-stride must be a positive integer, got {vid_stride!r}")
    if isinstance(source, np.ndarray):
        return FileSource([_check_array(source, "source array")], vid_stride, "array")
    if _is_pil_image(source):
        return FileSource([_from_pil(source)], vid_stride, "PIL image")
    if isinstance(source, (list, tuple)):
        return FileSource(_expand_list(source), vid_stride, f"list of {len(source)} inputs")
    if isinstance(source, bool):
        raise DataError(f"--source: expected a path, URL or webcam index, got {source!r}")
    if isinstance(source, int) or (isinstance(source, str) and source.strip().isdigit()):
        return StreamSource([int(source)], vid_stride)
    if not isinstance(source, (str, Path)):  # e.g. a torch tensor, whose text would be taken for a file name
        raise DataError(
            "source: expected a path, URL, webcam index, (H, W, 3) BGR uint8 array, PIL image or a list of them, "
            f"got {type(source).__name__}"
        )
    text = str(source).strip()
    if not text:
        raise DataError("--source is empty: give an image, folder, glob, .txt list, video, webcam index or URL")
    if text.lower().startswith(STREAM_SCHEMES):
        suffix = _url_suffix(text)
        if suffix in IMAGE_SUFFIXES:
            return FileSource([fetch_image(text)], vid_stride, text)
        if suffix in VIDEO_SUFFIXES:
            return FileSource([text], vid_stride, text)
        return StreamSource([text], vid_stride)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".streams":
        return StreamSource(_read_streams_file(path), vid_stride)
    return FileSource(_expand_path(path, text), vid_stride, text)


def _expand_path(path: Path, text: str) -> list[ImageInput]:
    if _GLOB_CHARACTERS.search(text) and not path.exists():
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = _media_files(p for p in matches if p.is_file())
        if not files:
            raise DataError(f"{text}: the pattern matches no images or videos ({_supported()})")
        return files
    if path.is_dir():
        files = _media_files(p for p in path.iterdir() if p.is_file())
        if not files:
            raise DataError(f"{path}: folder has no images or videos ({_supported()})")
        return files
    if not path.exists():
        raise DataError(f"{path}: source not found (expected an image, video, folder, glob, .txt/.streams list or URL)")
    if path.suffix.lower() == ".txt":
        return _read_list_file(path)
    _check_media_suffix(path)
    if path.suffix.lower() in VIDEO_SUFFIXES and not _video_opens(path):  # fail before any model is loaded
        raise DataError(f"{path}: {_UNREADABLE_VIDEO}")
    return [path]


def _video_opens(path: Path) -> bool:
    capture = cv2.VideoCapture(str(path))
    try:
        return capture.isOpened()
    finally:
        capture.release()


def _read_list_file(path: Path) -> list[ImageInput]:
    """Paths listed one per line; relative ones are taken from the list's own folder, else the working directory."""
    files: list[ImageInput] = []
    for line_number, line in enumerate(_read_lines(path), start=1):
        entry = Path(line).expanduser()
        if not entry.is_absolute() and (path.parent / entry).exists():
            entry = path.parent / entry
        if not entry.is_file():
            raise DataError(f"{path} line {line_number}: {line} not found")
        _check_media_suffix(entry, where=f"{path} line {line_number}: ")
        files.append(entry)
    if not files:
        raise DataError(f"{path}: the list names no files")
    return files


def _read_streams_file(path: Path) -> list[str | int]:
    if not path.is_file():
        raise DataError(f"{path}: streams list not found")
    streams: list[str | int] = [int(line) if line.isdigit() else line for line in _read_lines(path)]
    if not streams:
        raise DataError(f"{path}: the streams list names no streams (one URL or webcam index per line)")
    return streams


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, '#' comments removed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    return [stripped for line in text.splitlines() if (stripped := line.split("#", 1)[0].strip())]


def _expand_list(items: Sequence[ImageInput]) -> list[ImageInput]:
    if not items:
        raise DataError("source list is empty")
    expanded: list[ImageInput] = []
    for position, item in enumerate(items):
        if isinstance(item, np.ndarray):
            expanded.append(_check_array(item, f"source list item {position}"))
        elif _is_pil_image(item):
            expanded.append(_from_pil(item))
        elif isinstance(item, (str, Path)):
            expanded.extend(_expand_path(Path(item).expanduser(), str(item)))
        else:
            kind = type(item).__name__
            raise DataError(f"source list item {position}: expected a path, an image array or a PIL image, got {kind}")
    return expanded


def _is_pil_image(item: object) -> bool:
    """Whether ``item`` is a PIL image (checked without importing PIL: a caller who passes one has imported it)."""
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(item, pil.Image)


def _from_pil(image: Any) -> np.ndarray:
    """A PIL image as an upright (H, W, 3) uint8 BGR array: its EXIF orientation applied, as for image files, and
    any mode (RGBA, grayscale, palette, CMYK) converted to RGB first, as YOLOv5's AutoShape does."""
    from PIL import ImageOps

    rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _check_array(image: np.ndarray, where: str) -> np.ndarray:
    """A uint8 image array as (H, W, 3) BGR: grey (H, W) or (H, W, 1) repeated into three channels, as OpenCV reads a
    grey file; anything else refused in one line (four channels could be RGBA or BGRA: a guess would be wrong)."""
    channels = image.shape[2] if image.ndim == 3 else 1
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3) or min(image.shape[:2]) == 0:
        raise DataError(
            f"{where}: expected an (H, W, 3) uint8 BGR image or an (H, W) grey one, got {image.dtype} array "
            f"{image.shape}"
        )
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if channels == 1 else image


def _check_media_suffix(path: Path, where: str = "") -> None:
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES and suffix not in VIDEO_SUFFIXES:
        raise DataError(f"{where}{path}: unsupported file type '{suffix}' ({_supported()})")


def _media_files(paths: Iterator[Path] | list[Path]) -> list[ImageInput]:
    """Supported images and videos among ``paths``, in natural order (img2 before img10)."""
    kept = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES or p.suffix.lower() in VIDEO_SUFFIXES]
    return sorted(kept, key=_natural_key)


def _natural_key(path: Path) -> list[int | str]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


def _supported() -> str:
    return f"images: {' '.join(sorted(IMAGE_SUFFIXES))}; videos: {' '.join(sorted(VIDEO_SUFFIXES))}"


def _url_suffix(url: str) -> str:
    return Path(urllib.parse.urlparse(url).path).suffix.lower()


def _is_video(path: str) -> bool:
    suffix = _url_suffix(path) if "://" in path else Path(path).suffix.lower()
    return suffix in VIDEO_SUFFIXES


# --------------------------------------------------------------------------------------------------------------------
# Reading images (files: :func:`detector.data.media.read_image`)


def fetch_image(url: str, timeout_s: float = 30.0) -> np.ndarray:
    """Download and decode an image URL into memory (nothing is written to disk)."""
    try:  # only ever the URL the user passed as --source
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data = np.frombuffer(response.read(), dtype=np.uint8)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"{url}: cannot download ({e})") from e
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DataError(f"{url}: the download is not a decodable image")
    return image


# --------------------------------------------------------------------------------------------------------------------
# Files: images and videos, every frame in order


class FileSource:
    """Images, video files and in-memory arrays, read one at a time in order; each batch holds one frame.

    Video frames are read sequentially; with ``vid_stride`` n the frames in between are skipped with ``grab()``
    (no decoding). Unreadable images and videos are logged, skipped and counted in ``skipped``; when nothing at
    all could be read, iteration ends with a :class:`DataError` naming the source.
    """

    is_live = False

    def __init__(self, items: list[ImageInput], vid_stride: int = 1, description: str = "") -> None:
        self.items = items
        self.vid_stride = vid_stride
        self.description = description or f"{len(items)} inputs"
        self.skipped = 0
        self._capture: cv2.VideoCapture | None = None
        self._image_problem = ""  # why the last unreadable image could not be read

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_video(self) -> bool:
        return any(isinstance(item, (str, Path)) and _is_video(str(item)) for item in self.items)

    def __iter__(self) -> Iterator[list[Frame]]:
        self.skipped = 0
        yielded = 0
        first_problem = ""
        count = len(self.items)
        for index, item in enumerate(self.items, start=1):
            if isinstance(item, np.ndarray):
                yielded += 1
                yield [Frame(item, f"image{index - 1}", "image", index, count)]
                continue
            path = str(item)
            is_video = _is_video(path)
            frames = self._video_frames(path, index, count) if is_video else self._image_frames(path, index, count)
            produced = 0
            for frame in frames:
                produced += 1
                yield [frame]
            if produced == 0:
                problem = f"{path}: {_UNREADABLE_VIDEO}" if is_video else self._image_problem
                first_problem = first_problem or problem
                LOGGER.warning("WARNING: skipping %s", problem)
                self.skipped += 1
            yielded += produced
        if yielded == 0:
            if count == 1:
                raise DataError(first_problem)
            raise DataError(f"{self.description}: none of the {count} files could be read (first: {first_problem})")

    def _image_frames(self, path: str, index: int, count: int) -> Iterator[Frame]:
        try:
            image = read_image(path)
        except DataError as e:
            self._image_problem = str(e)  # one line naming the file and why
            return
        yield Frame(image, path, "image", index, count)

    def _video_frames(self, path: str, index: int, count: int) -> Iterator[Frame]:
        capture = cv2.VideoCapture(path)
        self._capture = capture
        try:
            if not capture.isOpened():
                return
            total = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
            fps = _valid_fps(capture.get(cv2.CAP_PROP_FPS)) / self.vid_stride  # the rate of the frames we yield
            position = 0  # frames consumed so far
            while True:
                ok, image = capture.read()
                if not ok:
                    return
                position += 1
                yield Frame(image, path, "video", index, count, frame=position, frames=total, fps=fps)
                for _ in range(self.vid_stride - 1):
                    if not capture.grab():
                        return
                    position += 1
        finally:
            capture.release()
            self._capture = None

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()


def _valid_fps(fps: float) -> float:
    """A stream's reported frame rate, or 30 when it reports 0, NaN or something absurd."""
    return float(fps) if 0 < fps < 1000 else _DEFAULT_STREAM_FPS


# --------------------------------------------------------------------------------------------------------------------
# Live streams: one reader thread per stream, newest frame wins


class StreamSource:
    """Webcams and stream URLs, each read continuously by a daemon thread that keeps only its newest frame.

    Iterating waits until at least one stream has a frame it has not yielded, then yields a batch with the newest
    frame of every such stream. A live stream that stops delivering is reopened a few times before it is given up;
    iteration ends when every stream has ended. Call :meth:`close` (or exhaust the iterator) to stop the threads.
    """

    is_live = True

    def __init__(self, sources: list[str | int], vid_stride: int = 1) -> None:
        self.sources = sources
        self.vid_stride = vid_stride
        self.skipped = 0
        self._condition = threading.Condition()
        self._stop = threading.Event()
        self._latest: list[np.ndarray | None] = [None] * len(sources)
        self._frame_numbers = [0] * len(sources)
        self._ended = [False] * len(sources)
        self._captures: list[cv2.VideoCapture] = []
        try:
            for source in sources:
                self._captures.append(_open_stream(source))
        except DataError:
            for capture in self._captures:  # the streams opened before the failing one
                capture.release()
            raise
        self.fps = [_valid_fps(c.get(cv2.CAP_PROP_FPS)) for c in self._captures]
        self._threads = [
            threading.Thread(target=self._read_loop, args=(i,), name=f"stream-{i}", daemon=True)
            for i in range(len(sources))
        ]
        for thread in self._threads:
            thread.start()
        LOGGER.info("Reading %d stream(s): %s", len(sources), ", ".join(str(s) for s in sources))

    def __len__(self) -> int:
        return len(self.sources)

    def _read_loop(self, i: int) -> None:
        capture = self._captures[i]
        is_file = capture.get(cv2.CAP_PROP_FRAME_COUNT) > 0  # a finite file ends; a live stream is reconnected
        position = 0
        while not self._stop.is_set():
            if not capture.grab():
                if is_file or not self._reconnect(i):
                    break
                continue
            position += 1
            if (position - 1) % self.vid_stride:
                continue
            ok, image = capture.retrieve()
            if not ok:
                continue
            with self._condition:
                self._latest[i] = image
                self._frame_numbers[i] = position
                self._condition.notify_all()
        with self._condition:
            self._ended[i] = True
            self._condition.notify_all()

    def _reconnect(self, i: int) -> bool:
        for attempt in range(1, _RECONNECT_ATTEMPTS + 1):
            LOGGER.warning(
                "WARNING: stream %s stopped delivering frames; reconnecting (%d/%d)",
                self.sources[i],
                attempt,
                _RECONNECT_ATTEMPTS,
            )
            if self._stop.wait(1.0):
                return False
            capture = self._captures[i]
            if capture.open(self.sources[i]) and capture.isOpened():
                return True
        LOGGER.warning("WARNING: giving up on stream %s", self.sources[i])
        return False

    def __iter__(self) -> Iterator[list[Frame]]:
        seen = [0] * len(self.sources)
        try:
            while True:
                with self._condition:
                    self._condition.wait_for(
                        lambda: any(n > s for n, s in zip(self._frame_numbers, seen, strict=True)) or all(self._ended),
                        timeout=1.0,
                    )
                    fresh = [i for i, (n, s) in enumerate(zip(self._frame_numbers, seen, strict=True)) if n > s]
                    if not fresh and all(self._ended):
                        return
                    batch = []
                    for i in fresh:
                        seen[i] = self._frame_numbers[i]
                        image = self._latest[i]
                        assert image is not None  # a frame number is only set together with its image
                        batch.append(
                            Frame(
                                image,
                                str(self.sources[i]),
                                "stream",
                                i,
                                len(self.sources),
                                frame=seen[i],
                                fps=self.fps[i] / self.vid_stride,
                            )
                        )
                if batch:
                    yield batch
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=5.0)
        for capture in self._captures:
            capture.release()


def _open_stream(source: str | int) -> cv2.VideoCapture:
    """Open a webcam index or URL with bounded open/read timeouts, or raise a one-line DataError."""
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _STREAM_TIMEOUTS_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, _STREAM_TIMEOUTS_MS]
    started = time.perf_counter()
    capture = cv2.VideoCapture(source, cv2.CAP_ANY, params)
    if not capture.isOpened():
        capture.release()
        what = f"webcam {source}" if isinstance(source, int) else f"stream {source}"
        raise DataError(f"{what}: cannot be opened (after {time.perf_counter() - started:.1f}s)")
    return capture
