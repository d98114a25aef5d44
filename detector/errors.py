"""Exceptions that the command-line tools turn into one-line messages instead of tracebacks.

Library code raises these (or ``ValueError``/``FileNotFoundError``) with a message that names the file, the key
and what was expected. ``detector.cli`` catches :class:`DetectorError` and prints ``error: <message>``.
"""

from __future__ import annotations


class DetectorError(Exception):
    """Base class for user-facing errors: bad input, not a bug in detector."""


class ConfigError(DetectorError, ValueError):
    """A YAML file or a command-line flag has an unknown key, a wrong type or a missing value."""


class DataError(DetectorError, ValueError):
    """A dataset, image, label or source cannot be used."""


class CheckpointError(DetectorError, ValueError):
    """A weights file cannot be read, or is refused for safety."""


class ExportError(DetectorError, RuntimeError):
    """An export failed or its output does not agree with the PyTorch model."""


class LoaderWorkerError(DetectorError, RuntimeError):
    """A data loader worker process died (killed by the out-of-memory killer, a signal, a full /dev/shm)."""
