"""What every command-line entry point shares: flag parsing into config overrides, and clean error exits."""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from detector.errors import DetectorError, LoaderWorkerError
from detector.utils.logging import setup_logging

LOGGER = logging.getLogger("detector")

# --cache-dir's help, the same in train.py and val.py.
CACHE_DIR_HELP = "folder for label caches ('' = beside the labels, or the user cache folder when that is not writable)"


# the task the ``detector`` console command is running, so that usage lines read "detector train", not "train.py"
_CONSOLE_TASK: ContextVar[str | None] = ContextVar("console_task", default=None)


@contextmanager
def console_task(task: str) -> Iterator[None]:
    """While ``detector TASK`` runs the task: its usage line and errors name ``detector TASK``."""
    token = _CONSOLE_TASK.set(task)
    try:
        yield
    finally:
        _CONSOLE_TASK.reset(token)


def program(script: str) -> str:
    """A parser's ``prog``: ``detector TASK`` under the console command, else ``script`` (``train.py``, ...)."""
    task = _CONSOLE_TASK.get()
    return f"detector {task}" if task else script


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and keeps the description's line breaks."""


def default_help(defaults: object) -> Callable[[str], str]:
    """``text(name)`` -> " (default: X)" for the field ``name`` of the config ``defaults``, for a flag's help
    (tuples shown space-separated, as they are typed)."""

    def text(name: str) -> str:
        value = getattr(defaults, name)
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else repr(value)
        return f" (default: {shown})"

    return text


class OneOrMany(argparse.Action):
    """``nargs="+"`` that stores one value as itself and several as a tuple (``--weights a.pt`` or ``a.pt b.pt``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        setattr(namespace, self.dest, values[0] if len(values) == 1 else tuple(values))


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose unset flags are absent from the result, so only what the user typed overrides the config.

    Defaults shown in ``--help`` are passed per flag with ``help=... (default: X)`` text by the callers, since
    argparse's own defaults are suppressed here.
    """
    return argparse.ArgumentParser(
        prog=program(prog),
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """The flags present on the command line, as a dict keyed by config field name."""
    return vars(parser.parse_args(argv))


# errors of writing that name no file (a write() on a full disk): still the environment, not a bug
_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def run_cli(main: Callable[[], int | None]) -> int:
    """Run an entry point: user errors, and the file system's refusals (a path that cannot be created, a full
    disk), become one ``error:`` line and exit status 2; Ctrl-C exits 130."""
    setup_logging()
    # At exit the interpreter's garbage collections walk every object left (torch alone makes 0.3-0.4 s of that
    # on this CPU); freezing them first skips that walk. Objects are still freed, files closed and handlers
    # flushed as before: only the search for reference cycles among what exists at exit is skipped.
    atexit.register(gc.freeze)
    try:
        return int(main() or 0)
    except DetectorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a data loader worker that died (val.py, detect.py): one line, not a traceback
        explained = LoaderWorkerError.explain(e)
        if explained is None:
            raise
        print(f"error: {explained}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (permissions, read-only, not a folder, disk full): its words
        if not e.filename and e.errno not in _FULL_OR_READ_ONLY:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
