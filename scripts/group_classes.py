"""Write a copy of a dataset whose classes are merged into a few groups: labels rewritten, images linked.

Training from scratch on a few hundred photos cannot learn 80 classes, but it can learn a handful; this makes such
a set from a real one (the README's from-scratch ablations use coco128's photos grouped into person, vehicle and
other). The source dataset is only read.

    python scripts/hide_labels.py --data coco128.yaml --keep 1 --holdout 0.25 --out /tmp/coco128-split
    python scripts/group_classes.py --data /tmp/coco128-split/data.yaml --out /tmp/coco128-3 \\
        --group person=0 --group vehicle=1-8 --group other=rest
    python train.py --data /tmp/coco128-3/data.yaml ...

Each ``--group NAME=CLASSES`` is a new class, in the order given: CLASSES is a comma-separated list of class indices
and ranges (``0``, ``1-8``, ``2,5,7``) or ``rest`` (every class no other group names). A class in no group has its
objects dropped. The output holds ``data.yaml`` (train and val of the source, same relative folders),
``images/...`` (symbolic links) and ``labels/...`` (the rewritten rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from hide_labels import image_pairs, place  # scripts/hide_labels.py: the same walk over a split, the same links

from detector.data.dataset_config import load_dataset_config
from detector.errors import DetectorError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="group_classes.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="source dataset YAML (name or path)")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    parser.add_argument(
        "--group", action="append", required=True, metavar="NAME=CLASSES", help="a new class: NAME=0,3-5 or NAME=rest"
    )
    return parser


def parse_groups(items: list[str], num_classes: int) -> tuple[list[str], dict[int, int]]:
    """``["person=0", "vehicle=1-8", "other=rest"]`` -> (new names, old class -> new class)."""
    names: list[str] = []
    mapping: dict[int, int] = {}
    rest: int | None = None
    for index, item in enumerate(items):
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise DetectorError(f"--group {item!r}: expected NAME=CLASSES, e.g. vehicle=1-8 or other=rest")
        names.append(name)
        if spec == "rest":
            rest = index
            continue
        for part in spec.split(","):
            low, _, high = part.partition("-")
            try:
                classes = range(int(low), int(high or low) + 1)
            except ValueError:
                raise DetectorError(f"--group {item!r}: {part!r} is not a class index or range") from None
            for cls in classes:
                if not 0 <= cls < num_classes or cls in mapping:
                    raise DetectorError(f"--group {item!r}: class {cls} is out of range or already in a group")
                mapping[cls] = index
    if rest is not None:
        mapping.update({cls: rest for cls in range(num_classes) if cls not in mapping})
    return names, mapping


def rewrite(label: Path, mapping: dict[int, int]) -> str:
    rows = []
    for line in label.read_text(encoding="utf-8").splitlines() if label.is_file() else []:
        fields = line.split()
        if fields and int(float(fields[0])) in mapping:
            rows.append(" ".join([str(mapping[int(float(fields[0]))]), *fields[1:]]) + "\n")
    return "".join(rows)


def group_classes(data_yaml: str, out: Path, groups: list[str]) -> dict[str, int]:
    """Write the grouped copy into ``out``; returns the number of images per split."""
    data = load_dataset_config(data_yaml)
    names, mapping = parse_groups(groups, len(data.names))
    if out.exists() and any(out.iterdir()):
        raise DetectorError(f"--out {out}: exists and is not empty")
    description: dict = {"path": str(out.resolve())}
    counts = {}
    for split, sources in (("train", data.train), ("val", data.val)):
        images = image_pairs(data, sources)
        for image, source_label, relative in images:
            place(image, out / "images" / split / relative, copy=False)
            label = (out / "labels" / split / relative).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(rewrite(source_label, mapping), encoding="utf-8")
        description[split] = f"images/{split}"
        counts[split] = len(images)
    description["names"] = dict(enumerate(names))
    header = f"# {data.yaml_path.name} with its classes grouped: {' '.join(groups)}\n"
    (out / "data.yaml").write_text(header + yaml.safe_dump(description, sort_keys=False), encoding="utf-8")
    return counts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    try:
        counts = group_classes(args.data, out, args.group)
    except DetectorError as e:
        print(f"group_classes.py: error: {e}", file=sys.stderr)
        return 1
    print(f"{out / 'data.yaml'}: {counts['train']} train and {counts['val']} val images, classes {args.group}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
