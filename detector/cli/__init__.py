"""The ``detector`` console command: ``detector train|val|detect|export [flags]``, same flags as the scripts, and
the data tools ``detector download DATASET.yaml`` and ``detector convert coco|voc ...``, and ``detector prune``
(network slimming's channel pruning, :mod:`detector.prune`), and ``detector benchmarks`` (every export format
validated and timed, :mod:`detector.export.benchmarks`)."""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

from detector.cli.common import console_task

TASKS = ("train", "val", "detect", "export", "benchmarks", "download", "convert", "prune")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TASKS:
        print(f"usage: detector {{{','.join(TASKS)}}} [flags]   (detector TASK --help lists a task's flags)")
        if not argv or argv[0] in ("-h", "--help"):
            return 0
        close = difflib.get_close_matches(argv[0], TASKS, n=1)
        print(f"error: unknown task {argv[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ""), file=sys.stderr)
        return 2
    module = importlib.import_module(f"detector.cli.{argv[0]}")
    with console_task(argv[0]):
        return module.main(argv[1:])
