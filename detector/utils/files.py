"""Run folders and small file helpers."""

from __future__ import annotations

import csv
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def increment_path(path: str | Path, exist_ok: bool = False, mkdir: bool = True) -> Path:
    """The first free run folder of ``path``: runs/train/exp, then exp2, exp3, ...

    With ``exist_ok`` the given path is used as it is. The number after the stem is one more than the
    highest taken, so removing exp2 never makes a new run reuse an older number in between. With ``mkdir`` the
    folder is claimed by creating it, which only one process can do: runs started at the same moment (a shell
    loop with ``&``) each get their own folder instead of writing into one.
    """
    path = Path(path)
    if exist_ok:
        if mkdir:
            path.mkdir(parents=True, exist_ok=True)
        return path
    while True:
        candidate = _next_free(path) if path.exists() or path.is_symlink() else path
        if not mkdir:
            return candidate
        candidate.parent.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
        except FileExistsError:  # another process took it between the look and the claim: look again
            continue
        return candidate


def _next_free(path: Path) -> Path:
    """``path`` numbered one past the highest number taken among its siblings (exp -> exp2, exp7 -> exp8)."""
    pattern = re.compile(rf"^{re.escape(path.name)}(\d+)$")
    taken = [int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    return path.with_name(f"{path.name}{max(taken, default=1) + 1}")


_UNSAFE_IN_FILE_NAMES = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def safe_file_name(name: str, fallback: str) -> str:
    """``name`` as one file or folder name on any OS: path separators, control characters and the characters Windows
    forbids become '_', and a name that would still point elsewhere ('', '.', '..') becomes ``fallback``. Class names
    come from checkpoints and dataset YAMLs: one named '../../x' must not write outside the run folder."""
    cleaned = _UNSAFE_IN_FILE_NAMES.sub("_", name)
    return fallback if cleaned in ("", ".", "..") else cleaned


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: done once, at import, before any thread starts
    os.umask(mask)
    return mask


# What open() would give a new file: mkstemp's private 0600 would make every run file unreadable to other users
_NEW_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that readers see either the old or the whole new content, never a torn one.

    ``write`` receives a binary file object in the same folder; it is flushed, fsynced and renamed over
    ``path``, so a crash or SIGKILL mid-write leaves the previous file intact. The file gets the permissions
    a plain ``open()`` would give it (0666 less the umask), not the temporary file's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` under a ``columns`` header as a CSV file, atomically (:func:`atomic_write`). A key missing
    from a row is written empty, a key not in ``columns`` left out; no columns give an empty file."""
    text = io.StringIO()
    if columns:
        writer = csv.DictWriter(text, fieldnames=list(columns), restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))


def file_size_mb(path: str | Path) -> float:
    """Size of a file, or the total of a folder's files, in MB."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    return path.stat().st_size / 1e6


def cache_dir() -> Path:
    """Where generated data lives (the built-in dataset, label caches of read-only datasets).

    ``$DETECTOR_CACHE``, else ``$XDG_CACHE_HOME/detector``, else the platform's user cache folder:
    ``~/Library/Caches/detector`` on macOS, ``%LOCALAPPDATA%\\detector\\Cache`` on Windows, ``~/.cache/detector``
    elsewhere.
    """
    if root := os.environ.get("DETECTOR_CACHE"):
        return Path(root)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "detector"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "detector"
    if sys.platform == "win32" and (local := os.environ.get("LOCALAPPDATA")):
        return Path(local) / "detector" / "Cache"
    return Path.home() / ".cache" / "detector"
