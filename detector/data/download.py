"""Fetch and unpack dataset archives named by a dataset YAML's ``download:`` key; convert VOC XML to YOLO labels.

Nothing from a YAML is ever executed: ``download:`` holds only URLs of ``.zip/.tar/.tar.gz/.tgz`` archives, and the
one post-processing step, ``convert: voc``, is our own converter below. A transfer goes to ``<archive>.part`` and
resumes with an HTTP Range request after a dropped connection; the received size is checked against the server's
length and the archive's integrity (zip CRCs, tar structure and gzip CRC) is checked before anything is unpacked.

Command line::

    python -m detector.data.download data/VOC.yaml     # fetch, unpack and convert what the YAML describes
    python -m detector.data.download voc ../datasets/VOC  # only convert an unpacked VOCdevkit under that folder
"""

from __future__ import annotations

import argparse
import http.client
import logging
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from detector.data.dataset_config import ARCHIVE_SUFFIXES, DatasetConfig, load_dataset_config
from detector.errors import DataError

LOGGER = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
USER_AGENT = "detector-dataset-download/1"
# (year, image set) pairs of PASCAL VOC, as YOLOv5's VOC.yaml lays them out: images/<set><year>, labels/<set><year>.
VOC_SPLITS = (("2012", "train"), ("2012", "val"), ("2007", "train"), ("2007", "val"), ("2007", "test"))


class _IncompleteTransferError(OSError):
    """The connection ended before the announced number of bytes arrived (retried with a Range request)."""


# --------------------------------------------------------------------------------------------------------------------
# Dataset-level entry point


def download_dataset(config: DatasetConfig, *, keep_archives: bool = False, progress: bool = True) -> None:
    """Fetch, check and unpack every ``config.download`` archive, then run the ``convert:`` step if any.

    Raises:
        DataError: a transfer failed after retries, or an archive is corrupt or unsafe.
    """
    for spec in config.download:
        archive = spec.target / archive_name(spec.url)
        spec.target.mkdir(parents=True, exist_ok=True)
        if not archive.is_file():
            download_file(spec.url, archive, progress=progress)
        top = extract_archive(archive, spec.target)
        LOGGER.info("unpacked %s into %s (%s)", archive.name, spec.target, ", ".join(top))
        if not keep_archives:
            archive.unlink()
    if config.convert == "voc":
        convert_voc(config.root, config.names, progress=progress)


def archive_name(url: str) -> str:
    """The file name of an archive URL (``https://x/y/coco128.zip?dl=1`` -> ``coco128.zip``)."""
    name = PurePosixPath(unquote(urlparse(url).path)).name
    if not name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"{url}: expected a URL ending in one of {list(ARCHIVE_SUFFIXES)}")
    return name


# --------------------------------------------------------------------------------------------------------------------
# Transfer


def download_file(
    url: str,
    dest: str | Path,
    *,
    retries: int = 3,
    timeout: float = 60.0,
    retry_delay: float = 2.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming after a dropped connection.

    Each attempt asks for the bytes not yet received (``Range: bytes=N-``); a server that ignores Range is
    answered by starting over. ``dest`` appears only once the size matches the server's Content-Length.

    Raises:
        DataError: the server refused (4xx) or ``retries`` attempts all failed.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, retries + 1):
        try:
            _fetch_into(url, part, timeout=timeout, progress=progress)
            part.replace(dest)
            return dest
        except urllib.error.HTTPError as e:
            if e.code == 416:  # our Range starts at or past the end: the .part is stale; start over
                part.unlink(missing_ok=True)
            elif 400 <= e.code < 500 and e.code not in (408, 429):
                raise DataError(f"{url}: server answered HTTP {e.code} {e.reason}") from e
            error: Exception = e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, short transfers
            error = e
        if attempt == retries:
            raise DataError(f"{url}: download failed after {retries} attempts: {error}") from error
        have = part.stat().st_size if part.exists() else 0
        LOGGER.warning("%s: %s; retrying (%d/%d) from byte %d", url, error, attempt + 1, retries, have)
        time.sleep(retry_delay * attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def _fetch_into(url: str, part: Path, *, timeout: float, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        resumed = have > 0 and response.status == 206 and _range_start(response.headers) == have
        if not resumed:
            have = 0
        total = have + int(length) if length is not None else None
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        # http.client returns b"" instead of raising when a connection closes early: the size check catches it.
        raise _IncompleteTransferError(f"connection closed after {size} of {total} bytes")


def _range_start(headers: http.client.HTTPMessage) -> int | None:
    """First byte of a ``Content-Range: bytes START-END/TOTAL`` header, or None."""
    value = headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------------------------
# Archives


def check_archive(archive: str | Path) -> None:
    """Read the whole archive and verify it: zip CRCs (``testzip``), tar headers and gzip CRC.

    Raises:
        DataError: the archive is truncated or corrupt (it is then deleted so a retry downloads it again).
    """
    archive = Path(archive)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise DataError(f"{archive}: corrupt archive (member {bad!r} fails its CRC check); deleted it")
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    if member.isfile():
                        stream = tf.extractfile(member)
                        while stream is not None and stream.read(CHUNK_BYTES):
                            pass
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as e:
        archive.unlink(missing_ok=True)
        raise DataError(f"{archive}: corrupt or truncated archive ({e}); deleted it") from e
    except DataError:
        archive.unlink(missing_ok=True)
        raise


def extract_archive(archive: str | Path, target: str | Path) -> list[str]:
    """Check ``archive``, unpack it into ``target`` and return its top-level entry names.

    Unpacking goes into a hidden folder inside ``target`` first and is then moved into place (merging with
    folders that exist), so an interrupted unpack never leaves a half-filled dataset folder behind.

    Raises:
        DataError: corrupt archive, or a member that would land outside ``target`` (absolute path, ``..``, link).
    """
    archive, target = Path(archive), Path(target)
    check_archive(archive)
    staging = target / f".{archive.name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _check_member_names(archive, zf.namelist())
                zf.extractall(staging)
        else:
            with tarfile.open(archive, "r:*") as tf:
                _check_member_names(archive, tf.getnames())
                _extract_tar(tf, staging, archive)
        top = sorted(p.name for p in staging.iterdir())
        for entry in staging.iterdir():
            _merge_move(entry, target / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return top


def _check_member_names(archive: Path, names: Sequence[str]) -> None:
    for name in names:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts:
            raise DataError(f"{archive}: unsafe member {name!r} would unpack outside the target folder")


def _extract_tar(tf: tarfile.TarFile, staging: Path, archive: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuses links outside, devices, setuid bits
        try:
            tf.extractall(staging, filter="data")
        except tarfile.FilterError as e:
            raise DataError(f"{archive}: unsafe member refused ({e})") from e
        return
    for member in tf.getmembers():
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{archive}: member {member.name!r} is a link or special file; refused")
    tf.extractall(staging)  # names and types were checked above


def _merge_move(source: Path, dest: Path) -> None:
    """Move ``source`` to ``dest``; folders that already exist are merged file by file (files are replaced)."""
    if source.is_dir() and dest.is_dir():
        for child in source.iterdir():
            _merge_move(child, dest / child.name)
        source.rmdir()
    else:
        if dest.is_dir():
            shutil.rmtree(dest)
        source.replace(dest)


# --------------------------------------------------------------------------------------------------------------------
# PASCAL VOC XML -> YOLO labels


def convert_voc(root: str | Path, names: Sequence[str], *, progress: bool = True) -> dict[str, int]:
    """Lay out an unpacked ``<root>/VOCdevkit`` as YOLO data: ``images/<set><year>`` and ``labels/<set><year>``.

    Objects marked ``difficult`` are left out (as in YOLOv5's labels; VOC's own evaluation ignores them).
    VOC boxes are 1-based inclusive pixel indices: ``xmin..xmax`` covers the continuous span ``[xmin - 1, xmax]``.

    Returns:
        counts: ``images``, ``objects``, ``difficult`` (left out), ``unknown_class`` and ``bad_xml`` (files skipped).
    """
    root = Path(root)
    devkit = root / "VOCdevkit"
    if not devkit.is_dir():
        raise DataError(f"{root}: no VOCdevkit folder to convert (unpack the VOC archives here first)")
    class_ids = {name: i for i, name in enumerate(names)}
    counts = dict.fromkeys(("images", "objects", "difficult", "unknown_class", "bad_xml"), 0)
    for year, image_set in VOC_SPLITS:
        voc = devkit / f"VOC{year}"
        list_file = voc / "ImageSets" / "Main" / f"{image_set}.txt"
        if not list_file.is_file():
            continue
        images_dir = root / "images" / f"{image_set}{year}"
        labels_dir = root / "labels" / f"{image_set}{year}"
        images_dir.mkdir(parents=True, exist_ok=True)
        labels_dir.mkdir(parents=True, exist_ok=True)
        image_ids = list_file.read_text().split()
        for image_id in tqdm(image_ids, desc=f"{image_set}{year}", disable=not progress):
            rows = _voc_rows(voc / "Annotations" / f"{image_id}.xml", class_ids, counts)
            if rows is None:
                continue
            (labels_dir / f"{image_id}.txt").write_text("".join(f"{row}\n" for row in rows))
            source = voc / "JPEGImages" / f"{image_id}.jpg"
            if source.is_file():
                source.replace(images_dir / source.name)
            counts["images"] += 1
    if counts["bad_xml"] or counts["unknown_class"]:
        LOGGER.warning("VOC conversion skipped %d unreadable XML files and %d objects of unknown classes",
                       counts["bad_xml"], counts["unknown_class"])  # fmt: skip
    LOGGER.info("VOC conversion: %s", counts)
    return counts


def _voc_rows(xml_file: Path, class_ids: dict[str, int], counts: dict[str, int]) -> list[str] | None:
    """YOLO label rows of one VOC annotation, or None (warned and counted) when the XML is unusable."""
    try:
        tree = ET.parse(xml_file)
        size = tree.find("size")
        width = float(size.findtext("width"))  # type: ignore[union-attr, arg-type]
        height = float(size.findtext("height"))  # type: ignore[union-attr, arg-type]
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height}")
        rows = []
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in class_ids:
                counts["unknown_class"] += 1
                continue
            if int(obj.findtext("difficult") or 0) == 1:
                counts["difficult"] += 1
                continue
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr, arg-type]
            x1, y1 = max(xmin - 1.0, 0.0), max(ymin - 1.0, 0.0)
            x2, y2 = min(xmax, width), min(ymax, height)
            if x2 <= x1 or y2 <= y1:
                raise ValueError(f"empty box {xmin, ymin, xmax, ymax}")
            cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
            w, h = (x2 - x1) / width, (y2 - y1) / height
            rows.append(f"{class_ids[name]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            counts["objects"] += 1
        return rows
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError) as e:
        LOGGER.warning("%s: skipped, unreadable VOC annotation (%s)", xml_file, e)
        counts["bad_xml"] += 1
        return None


# --------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m detector.data.download DATASET.yaml`` or ``... voc ROOT``; returns the exit status."""
    from detector.cli.common import run_cli

    parser = argparse.ArgumentParser(
        prog="python -m detector.data.download",
        description="Download and unpack a dataset YAML's archives, or convert an unpacked PASCAL VOC folder.",
    )
    parser.add_argument("target", help="dataset YAML (path or name in data/), or 'voc' to convert ROOT")
    parser.add_argument("root", nargs="?", help="with 'voc': the folder holding VOCdevkit/")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives after unpacking")
    args = parser.parse_args(argv)

    def run() -> int:
        if args.target == "voc":
            if not args.root:
                parser.error("'voc' needs the folder that holds VOCdevkit/")
            names = load_dataset_config("VOC.yaml", check_paths=False).names
            convert_voc(args.root, names)
            return 0
        config = load_dataset_config(args.target, check_paths=False)
        if not config.download:
            raise DataError(f"{config.yaml_path}: no 'download' URLs to fetch")
        download_dataset(config, keep_archives=args.keep_archives)
        load_dataset_config(config.yaml_path, download=False)  # every path must now exist
        LOGGER.info("%s: dataset ready in %s", config.yaml_path, config.root)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
