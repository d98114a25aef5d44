"""Does a local evolution give back each trial's memory? Resident memory after each of N trials with --cache ram.

YOLOv5's --evolve leaks RAM across generations with --cache (its issues #9352, #1291). This runs a local evolution
in this process and reads the resident memory the search logs after each trial; the figure that matters is the
growth from trial 1 to trial N (the issue's bar: within 10%).

    DETECTOR_DATASETS_DIR=../shared/datasets python scripts/evolve_memory.py --data coco128.yaml --trials 10

Extra arguments are train.py flags (default: --img 320 --epochs 1 --batch-size 16 --workers 2 --cache ram).
Exit status 1 when memory grew by more than --tolerance.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import detector
from detector.cli.train import build_parser

PATTERN = re.compile(r"Evolve: trial (\d+) \w+ in ([\d.]+) s, .* memory (\d+) MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed growth, trial 1 -> N (default 0.10)")
    args, train_args = parser.parse_known_args()
    defaults = ["--img", "320", "--epochs", "1", "--batch-size", "16", "--workers", "2", "--cache", "ram"]
    given = vars(build_parser().parse_args([*defaults, *train_args]))
    project = tempfile.mkdtemp(prefix="evolve-memory-")
    detector.evolve(evolve=args.trials, project=project, noplots=True, **given)
    rows = [PATTERN.search(line) for line in (Path(project) / "exp" / "log.txt").read_text().splitlines()]
    rows = [(int(m[1]), float(m[2]), int(m[3])) for m in rows if m]
    print(f"\ncommand: python scripts/evolve_memory.py --trials {args.trials} {' '.join(train_args)}")
    print("| trial | seconds | resident memory after it (MB) |\n|---|---|---|")
    for trial, seconds, memory in rows:
        print(f"| {trial} | {seconds:.1f} | {memory} |")
    first, last = rows[0][2], rows[-1][2]
    growth = (last - first) / first
    print(f"\nafter trial 1: {first} MB; after trial {len(rows)}: {last} MB; growth {growth:+.1%}")
    return 0 if growth <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
