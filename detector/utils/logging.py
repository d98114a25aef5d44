"""Console and run-folder logging. Library code uses ``logging.getLogger(__name__)``; this sets up handlers."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

LOGGER_NAME = "detector"
_FORMAT = "%(message)s"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def rank() -> int:
    """This process's global rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(verbose: bool = True) -> logging.Logger:
    """Console output for the ``detector`` loggers: INFO on rank 0, WARNING elsewhere. Safe to call twice."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    if not any(getattr(h, "_detector_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._detector_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    level = logging.INFO if verbose and rank() == 0 else logging.WARNING
    for h in logger.handlers:
        if getattr(h, "_detector_console", False):
            h.setLevel(level)
    return logger


def start_log_buffer() -> logging.handlers.MemoryHandler:
    """Keep everything logged under ``detector`` in memory until :func:`add_file_log` writes it to the run folder
    (a run checks its options and data before it makes its folder, and its log.txt still begins at the start)."""
    handler = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1, target=None)
    handler.setLevel(logging.DEBUG)
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    return handler


def add_file_log(
    run_dir: str | Path, filename: str = "log.txt", buffer: logging.handlers.MemoryHandler | None = None
) -> logging.Handler:
    """Also write everything logged under ``detector`` to ``run_dir/filename``, starting with what ``buffer`` held
    (which is then removed); returns the handler to remove."""
    handler = logging.FileHandler(Path(run_dir) / filename, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handler.setLevel(logging.DEBUG)
    if buffer is not None:
        buffer.setTarget(handler)
        remove_file_log(buffer)  # close() flushes the held records into the file first
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    return handler


def remove_file_log(handler: logging.Handler) -> None:
    logging.getLogger(LOGGER_NAME).removeHandler(handler)
    handler.close()
