"""Export entry point with YOLOv5's flags: `python export.py --help` lists them. The work is in detector.cli.export."""

import sys

from detector.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
