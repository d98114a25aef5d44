"""YOLOv5's release weights by name: ``--weights yolov5s.pt`` is fetched when no such file exists, as in YOLOv5.

A bare release name (``yolov5n.pt`` ... ``yolov5x6.pt``, no folder) that is not a file in the working directory is
looked up in the weights cache (``$DETECTOR_WEIGHTS_DIR``, else ``$XDG_CACHE_HOME/detector/weights``, else
``~/.cache/detector/weights``) and downloaded there from YOLOv5's v7.0 release (``$DETECTOR_RELEASE_URL`` for a
mirror) on first use, through :func:`detector.data.download.download_file` (resumable, size-checked). The file is
a third-party pickle: it is loaded like any YOLOv5 file, by :mod:`detector.models.yolov5_import`'s restricted
unpickler. Nothing else is ever downloaded for ``--weights``: other missing paths stay "not found".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from detector.errors import CheckpointError, DataError

LOGGER = logging.getLogger(__name__)

RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0"
RELEASE_NAMES = frozenset(f"yolov5{size}{p6}.pt" for size in "nsmlx" for p6 in ("", "6"))
WEIGHTS_DIR_ENV = "DETECTOR_WEIGHTS_DIR"
RELEASE_URL_ENV = "DETECTOR_RELEASE_URL"


def weights_cache_dir() -> Path:
    """Where downloaded release weights are kept."""
    if os.environ.get(WEIGHTS_DIR_ENV):
        return Path(os.environ[WEIGHTS_DIR_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "detector" / "weights"


def is_release_name(path: str | Path) -> bool:
    """Whether ``path`` is a bare YOLOv5 release name that :func:`resolve_release_weights` would fetch if absent."""
    path = Path(path)
    return path.name in RELEASE_NAMES and path.parent == Path(".")


def resolve_release_weights(path: str | Path) -> Path:
    """``path`` itself when it exists or is not a bare YOLOv5 release name; else the cached release file,
    downloaded first if needed. Raises a one-line CheckpointError when the download fails."""
    path = Path(path)
    if path.exists() or not is_release_name(path):
        return path
    cached = weights_cache_dir() / path.name
    if not cached.is_file():
        from detector.data.download import download_file

        url = f"{os.environ.get(RELEASE_URL_ENV) or RELEASE_URL}".rstrip("/") + f"/{path.name}"
        LOGGER.info("%s is not here: downloading YOLOv5's release file %s to %s", path, url, cached)
        try:
            download_file(url, cached)
        except DataError as e:
            raise CheckpointError(f"{path}: not found here, and YOLOv5's release file could not be fetched: {e}") from e
    return cached
