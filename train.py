"""Train entry point with YOLOv5's flags: `python train.py --help` lists them. The work is in detector.cli.train."""

import sys

from detector.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
