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

    @classmethod
    def explain(cls, error: BaseException, then: str = "") -> LoaderWorkerError | None:
        """torch's ``RuntimeError: DataLoader worker (pid N) is killed by signal: Killed.`` (or ``... exited
        unexpectedly``) as one line with the likely cause and what to change, ``then`` appended (e.g. how to go
        on); None for any other error."""
        message = str(error).strip()
        if not isinstance(error, RuntimeError) or not message.startswith("DataLoader worker"):
            return None
        shared_memory = "Bus error" in message or "shared memory" in message  # torch says what to do then
        likely = "" if shared_memory else "killed by the kernel's out-of-memory killer, most often: "
        advice = f"{message} ({likely}try fewer --workers or a smaller --batch-size)"
        return cls(f"{advice}; {then}" if then else advice)
