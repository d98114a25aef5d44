"""Detect entry point with YOLOv5's flags: `python detect.py --help` lists them. The work is in detector.cli.detect."""

import sys

from detector.cli.detect import main

if __name__ == "__main__":
    sys.exit(main())
