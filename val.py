"""Val entry point with YOLOv5's flags: `python val.py --help` lists them. The work is in detector.cli.val."""

import sys

from detector.cli.val import main

if __name__ == "__main__":
    sys.exit(main())
