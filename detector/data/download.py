"""Fetch and unpack dataset archives named by a dataset YAML's ``download:`` key, then run its ``convert:`` step.

Nothing from a YAML is ever executed: ``download:`` holds only URLs of ``.zip/.tar/.tar.gz/.tgz`` archives, and the
one post-processing step, ``convert: voc``, is our own converter (:func:`detector.data.convert.convert_voc`). A
transfer goes to ``<archive>.part`` and resumes with an HTTP Range request after a dropped connection; the received
size is checked against the server's length and the archive's integrity (zip CRCs, tar structure and gzip CRC) is
checked before anything is unpacked. The command line is ``python -m detector.cli.download DATASET.yaml``.
"""

from __future__ import annotations

import http.client
import logging
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from detector.data.convert import convert_voc
from detector.data.dataset_config import ARCHIVE_SUFFIXES, DatasetConfig
from detector.errors import DataError

LOGGER = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
USER_AGENT = "detector-dataset-download/1"


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
