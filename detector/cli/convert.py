"""``python -m detector.cli.convert coco|voc ...``: convert COCO JSON or PASCAL VOC XML labels to YOLO labels."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from detector.cli.common import program, run_cli

LOGGER = logging.getLogger(__name__)

DESCRIPTION = """Convert box labels to YOLO label files (one 'class x_center y_center width height' row per object).

examples:
  python -m detector.cli.convert coco annotations/instances_val2017.json ../datasets/mycoco
  python -m detector.cli.convert coco instances_train.json out/ --images ../photos/train   # images elsewhere
  python -m detector.cli.convert voc ../datasets/VOC      # <folder>/VOCdevkit -> images/ + labels/
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program("python -m detector.cli.convert"),
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="{coco,voc}")
    coco = formats.add_parser(
        "coco",
        help="COCO instances JSON -> labels/<split>/*.txt, <split>.yaml and <split>_categories.json in OUT_DIR",
    )
    coco.add_argument("json", help="COCO annotation file, e.g. annotations/instances_val2017.json")
    coco.add_argument("out_dir", help="output dataset folder")
    coco.add_argument("--images", default=None, help="folder holding the images (the YAML points at it)")
    voc = formats.add_parser(
        "voc", help="an unpacked ROOT/VOCdevkit -> ROOT/images/<set><year> and ROOT/labels/<set><year>"
    )
    voc.add_argument("root", help="the folder that holds VOCdevkit/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0 on success, 2 with one ``error:`` line for bad input."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from detector.data.convert import convert_coco_json, convert_voc

        if args.format == "coco":
            result = convert_coco_json(args.json, args.out_dir, args.images)
            LOGGER.info("wrote %s and %s", result.label_dir, result.dataset_yaml)
        else:
            from detector.data.dataset_config import load_dataset_config

            convert_voc(args.root, load_dataset_config("VOC.yaml", check_paths=False).names)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
