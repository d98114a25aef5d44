"""The first pass over a dataset: check every image/label pair once, then remember the result in a cache file.

Each problem (unreadable, empty or tiny image, truncated JPEG, label row with the wrong number of columns,
coordinates outside 0-1, class id outside the dataset's names, duplicate rows) is one warning line naming the
file. The pair is then either fixed (duplicate rows dropped, truncated JPEG re-saved) or skipped; nothing here
raises on bad data. Polygon rows (YOLOv5 segment labels) give their bounding box as the label row and are also kept
as outlines, for copy-paste.

The result is cached in an ``.npz`` of plain arrays read back with ``allow_pickle=False`` and keyed by a hash of
every path, size and modification time, so editing, adding or removing a file triggers a new scan. Where the cache
file goes is :func:`label_cache_path`'s rule: beside the label folder when that place is writable (YOLOv5's
habit), otherwise - or always, with ``--cache-dir`` - in a cache folder, under a name unique to the label folder.
A read-only or shared dataset folder therefore never receives a file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from detector.data.media import IMAGE_SUFFIXES, read_image
from detector.errors import DataError
from detector.utils.files import atomic_write, cache_dir

LOGGER = logging.getLogger(__name__)

CACHE_VERSION = "detector-scan-v2"  # v2: polygon outlines kept
CACHE_SUFFIX = ".detector.cache"  # not YOLOv5's ".cache": both tools can share a dataset without clashing
PIL_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP"}  # MPO: the multi-picture JPEG many phones write
MIN_IMAGE_SIZE = 10  # pixels; smaller images are skipped (nothing to learn, and they break the resize maths)
MAX_WARNINGS_SHOWN = 50
EXIF_ORIENTATION_TAG = 0x0112
EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
COORDINATE_SLACK = 1e-6  # float noise allowed beyond 0-1 before a coordinate counts as outside the image


@dataclass
class PairResult:
    """Outcome of checking one image and its label file."""

    status: str  # "found" (labels present), "missing" (no label file), "empty" (label file without rows), "corrupt"
    shape_wh: tuple[int, int] = (0, 0)  # displayed (EXIF-rotated) width, height
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.float32))  # (n, 5) [class, xywhn]
    messages: list[str] = field(default_factory=list)  # one warning line per problem
    segments: list[np.ndarray] = field(default_factory=list)  # see ScanResult.segments


@dataclass
class ScanResult:
    """The usable pairs of a dataset (corrupt ones removed) and what the scan found."""

    im_files: list[str]
    label_files: list[str]
    shapes: np.ndarray  # (N, 2) int64 original [width, height]
    labels: list[np.ndarray]  # N arrays (n, 5) float32 [class, x, y, w, h] normalised
    counts: dict[str, int]  # found, missing, empty, corrupt
    messages: list[str]
    # Per image: [] when it has no polygon rows (boxes only), else one outline per label row, (k, 2) float32 xy
    # normalised, with a (0, 2) array for a row that is a plain box.
    segments: list[list[np.ndarray]] = field(default_factory=list)
    from_cache: bool = False


def scan_dataset(
    im_files: Sequence[str],
    label_files: Sequence[str],
    *,
    num_classes: int | None,
    cache_path: Path | None,
    workers: int = 8,
    prefix: str = "",
) -> ScanResult:
    """Check all pairs (or reuse a valid cache at ``cache_path``), log warnings and a summary line."""
    key = dataset_hash(im_files, label_files, num_classes)
    result = load_scan_cache(cache_path, key) if cache_path is not None else None
    if result is None:
        result = _scan_pairs(im_files, label_files, num_classes, workers, prefix)
        if cache_path is not None:
            save_scan_cache(cache_path, key, result, prefix)
    _report(result, prefix, cache_path)
    return result


def _scan_pairs(
    im_files: Sequence[str], label_files: Sequence[str], num_classes: int | None, workers: int, prefix: str
) -> ScanResult:
    counts = dict.fromkeys(("found", "missing", "empty", "corrupt"), 0)
    kept_images, kept_labels_files, shapes, labels, segments, messages = [], [], [], [], [], []
    description = f"{prefix}Scanning {Path(label_files[0]).parent if label_files else ''}"
    with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1, 8))) as pool:
        results = pool.map(
            lambda pair: check_pair(*pair, num_classes=num_classes), zip(im_files, label_files, strict=True)
        )
        for im_file, label_file, result in zip(
            im_files, label_files, tqdm(results, total=len(im_files), desc=description, leave=False), strict=True
        ):
            counts[result.status] += 1
            messages.extend(result.messages)
            if result.status == "corrupt":
                continue
            kept_images.append(im_file)
            kept_labels_files.append(label_file)
            shapes.append(result.shape_wh)
            labels.append(result.labels)
            segments.append(result.segments)
    return ScanResult(
        im_files=kept_images,
        label_files=kept_labels_files,
        shapes=np.array(shapes, np.int64).reshape(-1, 2),
        labels=labels,
        counts=counts,
        messages=messages,
        segments=segments,
    )


def check_pair(im_file: str, label_file: str, *, num_classes: int | None) -> PairResult:
    """Verify one image and parse its labels. Never raises: problems become messages and a status."""
    shape_wh, problem, notes = check_image(im_file)
    if problem:
        return PairResult("corrupt", messages=[f"{im_file}: {problem}; image skipped"])
    parsed = parse_label_file(label_file, num_classes)
    if parsed.problem:
        return PairResult("corrupt", messages=[*notes, f"{label_file}: {parsed.problem}; image skipped"])
    return PairResult(parsed.status, shape_wh, parsed.labels, [*notes, *parsed.notes], parsed.segments)


def check_image(im_file: str) -> tuple[tuple[int, int], str, list[str]]:
    """((width, height) as displayed, problem or "", notes about fixes) for one image file."""
    try:
        if os.path.getsize(im_file) == 0:
            return (0, 0), "empty file (0 bytes)", []
        with Image.open(im_file) as image:
            image.verify()  # must come first: PIL allows nothing else on an image before verify()
        with Image.open(im_file) as image:
            image_format = image.format
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except FileNotFoundError:
        return (0, 0), "file not found", []
    except UnidentifiedImageError:
        return (0, 0), "not an image file (unknown format or corrupt header)", []
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports broken streams with all three
        return (0, 0), f"corrupt image ({e})", []
    if image_format not in PIL_FORMATS:
        return (0, 0), f"unsupported image format {image_format} (supported: {', '.join(IMAGE_SUFFIXES)})", []
    if orientation in EXIF_TRANSPOSED:
        width, height = height, width
    if width < MIN_IMAGE_SIZE or height < MIN_IMAGE_SIZE:
        return (0, 0), f"image too small ({width}x{height} px, need at least {MIN_IMAGE_SIZE})", []
    notes = []
    if image_format in ("JPEG", "MPO") and not _jpeg_is_complete(im_file):
        notes.append(repair_truncated_jpeg(im_file))
    return (width, height), "", notes


def _jpeg_is_complete(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read() == b"\xff\xd9"  # the JPEG end-of-image marker


def repair_truncated_jpeg(path: str) -> str:
    """Re-save a JPEG whose data ends early (OpenCV decodes what is there); returns the warning line.

    A file in a folder that is not writable (see :func:`folder_is_writable`) is left as it is.
    """
    if not folder_is_writable(Path(path).parent):
        return f"{path}: truncated JPEG, not repaired (read-only folder); its missing part loads as grey"
    try:
        image = read_image(path)  # upright (EXIF applied), so the re-saved pixels need no orientation tag
    except DataError:
        return f"{path}: truncated JPEG that OpenCV cannot decode either"
    _, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    try:
        atomic_write(path, lambda f: f.write(encoded.tobytes()))
    except OSError as e:
        return f"{path}: truncated JPEG, not repaired ({e.strerror}); its missing part loads as grey"
    return f"{path}: truncated JPEG repaired by re-saving"


@dataclass
class ParsedLabels:
    """One label file: rows, outlines, status ("found", "missing", "empty", "corrupt"), problem and notes."""

    labels: np.ndarray  # (n, 5) float32 [class, x_center, y_center, width, height] normalised
    segments: list[np.ndarray]  # [] without polygon rows, else one (k, 2) float32 xyn per row ((0, 2) for boxes)
    status: str
    problem: str = ""  # why the file is unusable ("" when it is usable)
    notes: list[str] = field(default_factory=list)  # fixes made (duplicates removed)


def parse_label_file(label_file: str, num_classes: int | None) -> ParsedLabels:
    """Parse one YOLO label file; a problem makes it "corrupt" with a one-line reason, nothing raises.

    Rows are ``class x_center y_center width height`` normalised to 0-1. A polygon row (``class x1 y1 x2 y2 ...``
    with 3 or more points, as YOLOv5 segment labels) becomes its bounding box, and its outline is kept in
    ``segments``. A missing or empty file means a background image. Duplicate rows (same class, box and outline)
    are removed, keeping the first.
    """
    empty = np.zeros((0, 5), np.float32)
    try:
        with open(label_file, encoding="utf-8") as f:
            lines = [line.split() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return ParsedLabels(empty, [], "missing")
    except (OSError, UnicodeDecodeError) as e:
        return ParsedLabels(empty, [], "corrupt", f"unreadable label file ({e})")
    if not lines:
        return ParsedLabels(empty, [], "empty")
    rows, outlines = [], []
    for number, columns in enumerate(lines, start=1):
        row, outline, problem = _parse_row(columns, number)
        if problem:
            return ParsedLabels(empty, [], "corrupt", problem)
        rows.append(row)
        outlines.append(outline)
    labels = np.array(rows, np.float32)
    if problem := _check_values(labels, num_classes):
        return ParsedLabels(empty, [], "corrupt", problem)
    np.clip(labels[:, 1:], 0.0, 1.0, out=labels[:, 1:])
    # The outline's points lie inside its box, which was just checked: clipping removes only float noise.
    segments = [np.clip(outline, 0.0, 1.0) for outline in outlines] if any(len(o) for o in outlines) else []
    first_of = {}
    for index in range(len(labels)):
        key = (labels[index].tobytes(), segments[index].tobytes() if segments else b"")
        first_of.setdefault(key, index)
    notes = []
    if len(first_of) < len(labels):
        notes.append(f"{label_file}: {len(labels) - len(first_of)} duplicate rows removed")
        keep = sorted(first_of.values())
        labels = labels[keep]
        segments = [segments[i] for i in keep] if segments else []
    return ParsedLabels(labels, segments, "found", notes=notes)


def _parse_row(columns: list[str], number: int) -> tuple[list[float], np.ndarray, str]:
    """(row [class, xywhn], outline (k, 2) xyn or (0, 2) for a box row, problem or "")."""
    count = len(columns)
    no_outline = np.zeros((0, 2), np.float32)
    if count != 5 and (count < 7 or count % 2 == 0):
        message = f"row {number} has {count} columns, expected 5 (class x_center y_center width height)"
        return [], no_outline, message + " or an odd number >= 7 (class x1 y1 x2 y2 x3 y3 ...)"
    try:
        values = [float(v) for v in columns]
    except ValueError:
        return [], no_outline, f"row {number} is not all numbers: {' '.join(columns)!r}"
    if count == 5:
        return values, no_outline, ""
    outline = np.array(values[1:], np.float32).reshape(-1, 2)
    (x1, y1), (x2, y2) = outline.min(0).tolist(), outline.max(0).tolist()  # polygon -> its bounding box in xywh
    return [values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], outline, ""


def _check_values(labels: np.ndarray, num_classes: int | None) -> str:
    classes = labels[:, 0]
    if not np.all(np.isfinite(labels)):
        return "label values must be finite numbers (found nan/inf)"
    if np.any(classes != np.round(classes)) or np.any(classes < 0):
        return f"class ids must be whole numbers >= 0, found {classes[(classes != np.round(classes)) | (classes < 0)]}"
    if num_classes is not None and np.any(classes >= num_classes):
        bad = sorted({int(c) for c in classes[classes >= num_classes]})
        return f"class id {bad} outside the dataset's names (0-{num_classes - 1}, {num_classes} classes)"
    coordinates = labels[:, 1:]
    outside = (coordinates < -COORDINATE_SLACK) | (coordinates > 1 + COORDINATE_SLACK)
    if outside.any():
        row = int(np.nonzero(outside.any(1))[0][0])
        return f"row {row + 1}: coordinates must be normalised to 0-1, found {coordinates[row].tolist()}"
    return ""


# --------------------------------------------------------------------------------------------------------------------
# Cache file


def folder_is_writable(folder: str | os.PathLike) -> bool:
    """Whether files may be created in ``folder``: it exists, this process may write there, and its mode has a
    write bit.

    The mode test is for root, whom ``os.access`` allows everything: a folder made read-only with ``chmod a-w``
    (a shared dataset) is then still treated as read-only. A read-only mount fails ``os.access`` for everyone.
    """
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    has_write_bit = bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return stat.S_ISDIR(mode) and has_write_bit and os.access(folder, os.W_OK | os.X_OK)


def label_cache_path(label_folder: str | os.PathLike, cache_folder: str | os.PathLike | None = None) -> Path:
    """Where the scan cache of ``label_folder`` lives.

    Without ``cache_folder`` (``--cache-dir`` not given): ``<parent>/<label folder name>.detector.cache`` beside the
    label folder (YOLOv5's place) when the parent folder is writable, else the user cache folder
    (``$XDG_CACHE_HOME/detector/labels``, ``~/.cache/detector/labels``, or the platform's cache folder; see
    :func:`detector.utils.files.cache_dir`). In a cache folder the name is readable and unique to the dataset:
    the last three parts of the label folder's resolved path and a hash of all of it, e.g.
    ``coco128-labels-train2017-1f2e3d4c5b6a7988.detector.cache``, so two datasets never share a file.
    """
    label_folder = Path(label_folder)
    if not cache_folder and folder_is_writable(label_folder.parent):
        return label_folder.parent / f"{label_folder.name}{CACHE_SUFFIX}"
    folder = Path(cache_folder).expanduser() if cache_folder else cache_dir() / "labels"
    resolved = label_folder.expanduser().resolve()
    parts = [part for part in resolved.parts if part != resolved.anchor][-3:]
    readable = re.sub(r"[^\w.-]+", "_", "-".join(parts))
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return folder / f"{readable}-{digest}{CACHE_SUFFIX}"


def dataset_hash(im_files: Sequence[str], label_files: Sequence[str], num_classes: int | None) -> str:
    """A digest of every path with its size and modification time, the cache version and the class count."""
    digest = hashlib.sha256(f"{CACHE_VERSION}|{num_classes}".encode())
    for path in (*im_files, *label_files):
        try:
            stat_result = os.stat(path)
            digest.update(f"|{path}:{stat_result.st_size}:{stat_result.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"|{path}:absent".encode())
    return digest.hexdigest()


def save_scan_cache(path: Path, key: str, result: ScanResult, prefix: str = "") -> None:
    """Write the scan as an .npz of plain arrays (no pickle); an unwritable folder only warns.

    Outlines are stored flat: ``segment_counts`` has one point count per label row (0 for a box row) and
    ``segment_points`` all points in that order.
    """
    counts = np.array([len(labels) for labels in result.labels], np.int64)
    segment_counts, segment_points = [], []
    for labels, outlines in zip(result.labels, result.segments, strict=True):
        if outlines:
            segment_counts.extend(len(outline) for outline in outlines)
            segment_points.extend(outline for outline in outlines if len(outline))
        else:
            segment_counts.extend([0] * len(labels))
    arrays = {
        "version": np.array(CACHE_VERSION),
        "hash": np.array(key),
        "im_files": np.array(result.im_files, dtype=str),
        "label_files": np.array(result.label_files, dtype=str),
        "shapes": result.shapes.astype(np.int64),
        "label_counts": counts,
        "labels": np.concatenate(result.labels).astype(np.float32) if result.labels else np.zeros((0, 5), np.float32),
        "segment_counts": np.array(segment_counts, np.int64),
        "segment_points": np.concatenate(segment_points).astype(np.float32)
        if segment_points
        else np.zeros((0, 2), np.float32),
        "messages": np.array(result.messages, dtype=str),
        "counts": np.array([result.counts[k] for k in ("found", "missing", "empty", "corrupt")], np.int64),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as e:
        LOGGER.warning("%sWARNING: cache %s not saved (%s); the next run scans again", prefix, path, e.strerror or e)


def load_scan_cache(path: Path, key: str) -> ScanResult | None:
    """The cached scan if ``path`` exists, reads cleanly and matches ``key`` and the cache version; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["version"]) != CACHE_VERSION or str(data["hash"]) != key:
                return None
            label_counts = data["label_counts"]
            offsets = np.cumsum(label_counts)[:-1]
            labels = np.split(data["labels"].astype(np.float32), offsets) if len(label_counts) else []
            found, missing, empty, corrupt = (int(v) for v in data["counts"])
            return ScanResult(
                im_files=[str(f) for f in data["im_files"]],
                label_files=[str(f) for f in data["label_files"]],
                shapes=data["shapes"].astype(np.int64).reshape(-1, 2),
                labels=[np.ascontiguousarray(labels_i.reshape(-1, 5)) for labels_i in labels],
                counts={"found": found, "missing": missing, "empty": empty, "corrupt": corrupt},
                messages=[str(m) for m in data["messages"]],
                segments=_split_segments(label_counts, data["segment_counts"], data["segment_points"]),
                from_cache=True,
            )
    except (OSError, ValueError, KeyError) as e:  # unreadable or from an older layout: scan again
        LOGGER.debug("ignoring cache %s: %s", path, e)
        return None


def _split_segments(label_counts: np.ndarray, segment_counts: np.ndarray, points: np.ndarray) -> list[list[np.ndarray]]:
    """Per-image outline lists (see :attr:`ScanResult.segments`) from the cache's flat arrays."""
    if len(segment_counts) != int(label_counts.sum()) or len(points) != int(segment_counts.sum()):
        raise ValueError("outline arrays do not match the label rows")
    if not len(points):  # boxes only: the common case, no per-row arrays
        return [[] for _ in label_counts]
    outlines = np.split(points.astype(np.float32).reshape(-1, 2), np.cumsum(segment_counts)[:-1])
    row_ends = np.cumsum(label_counts)
    segments = []
    for end, count in zip(row_ends.tolist(), label_counts.tolist(), strict=True):
        rows = outlines[end - count : end]
        segments.append(list(rows) if any(len(outline) for outline in rows) else [])
    return segments


def _report(result: ScanResult, prefix: str, cache_path: Path | None) -> None:
    for message in result.messages[:MAX_WARNINGS_SHOWN]:
        LOGGER.warning("%sWARNING: %s", prefix, message)
    if len(result.messages) > MAX_WARNINGS_SHOWN:
        LOGGER.warning("%sWARNING: ... and %d more problems", prefix, len(result.messages) - MAX_WARNINGS_SHOWN)
    counts = result.counts
    source = f"cache {cache_path}" if result.from_cache else "scan"
    LOGGER.info(
        "%s%d images: %d with labels, %d missing label files, %d empty label files, %d corrupt skipped (%s)",
        prefix,
        sum(counts.values()),
        counts["found"],
        counts["missing"],
        counts["empty"],
        counts["corrupt"],
        source,
    )
