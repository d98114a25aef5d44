"""``python -m detector.cli.download DATASET.yaml``: fetch, check and unpack a dataset YAML's archives.

The YAML's ``download:`` URLs are fetched (resuming broken transfers), checked and unpacked, then its ``convert:``
step runs (``convert: voc`` for PASCAL VOC); the command ends by checking that every split path now exists.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from detector.cli.common import program, run_cli

LOGGER = logging.getLogger(__name__)

DESCRIPTION = """Download and unpack the archives a dataset YAML names under 'download:', then run its 'convert:' step.

examples:
  python -m detector.cli.download coco128.yaml      # a YAML in data/ (or a path)
  python -m detector.cli.download data/VOC.yaml --keep-archives
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program("python -m detector.cli.download"),
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", help="dataset YAML: a path, or a name in data/ such as coco128.yaml")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives after unpacking")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0 when the dataset is ready, 2 with one ``error:`` line otherwise."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from detector.data.dataset_config import load_dataset_config
        from detector.data.download import download_dataset
        from detector.errors import DataError

        config = load_dataset_config(args.data, check_paths=False)
        if not config.download:
            raise DataError(f"{config.yaml_path}: no 'download' URLs to fetch")
        download_dataset(config, keep_archives=args.keep_archives)
        load_dataset_config(config.yaml_path, download=False)  # every path must now exist
        LOGGER.info("%s: dataset ready in %s", config.yaml_path, config.root)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
