"""Make a semi-supervised split of a dataset: labels kept for a fraction of the training images, the others listed
as unlabelled images for train.py --unlabeled (pseudo-labels). The source dataset is only read.

    python scripts/hide_labels.py --data builtin --keep 0.1 --out /tmp/builtin-10pct
    python train.py --data /tmp/builtin-10pct/data.yaml ...                                   # labelled only
    python train.py --data /tmp/builtin-10pct/data.yaml --unlabeled /tmp/builtin-10pct/unlabeled ...   # + pseudo

The output folder holds ``data.yaml`` (train: the kept images; val, names and COCO annotations: the source's,
by absolute path), ``images/train`` + ``labels/train`` (the kept images and their labels), ``unlabeled/`` (the
other training images, without labels) and ``hidden_labels/`` (their labels, to judge pseudo-labels with, never
read by training). Images are symbolic links unless --copy. The kept images are drawn with --seed, and the same
command gives the same split.

A dataset whose validation images are also training images (coco128: val = train) would let the pseudo-label run
train on the validation images' pixels; --holdout FRACTION first sets that fraction of the training images aside
as a new validation split (labels kept), out of both the labelled and the unlabelled images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from detector.data.dataset import find_images, image_to_label_path
from detector.data.dataset_config import DatasetConfig, load_dataset_config
from detector.errors import DetectorError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hide_labels.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--data", required=True, help="dataset YAML (name or path); 'builtin' = the built-in synthetic dataset")
    add("--out", required=True, help="output folder (must not exist, or be empty)")
    add("--keep", type=float, default=0.1, help="fraction of the training images that keep labels (default: 0.1)")
    add("--seed", type=int, default=0, help="seed of the draw of kept images (default: 0)")
    add(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of the training images set aside, labelled, as the validation split (for datasets whose "
        "val is their train, such as coco128) (default: 0 = keep the source's val)",
    )
    add("--copy", action="store_true", help="copy the images instead of linking to them (default: links)")
    return parser


def training_pairs(data: DatasetConfig) -> list[tuple[Path, Path, Path]]:
    """(image, its label file, its path inside the output's image folders) of every training image."""
    return image_pairs(data, data.train)


def image_pairs(data: DatasetConfig, sources: Sequence[Path]) -> list[tuple[Path, Path, Path]]:
    """(image, its label file, its path inside the output's image folders) of every image of ``sources``."""
    label_root = data.root / data.labels if data.labels else None
    pairs = []
    for image, folder in find_images(list(sources)):
        relative = image.relative_to(folder) if folder is not None else Path(image.name)
        pairs.append((image, image_to_label_path(image, label_root, folder), relative))
    names = [relative for *_, relative in pairs]
    if len(set(names)) != len(names):
        raise DetectorError(f"{data.yaml_path}: training images share file names; give them distinct names first")
    return pairs


def place(image: Path, target: Path, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(image, target)
    else:
        os.symlink(image.resolve(), target)


def hide_labels(data: DatasetConfig, out: Path, *, keep: float, seed: int, holdout: float, copy: bool) -> dict:
    """Write the split into ``out`` (see the module docstring); returns its counts."""
    if not 0.0 < keep <= 1.0 or not 0.0 <= holdout < 1.0:
        raise DetectorError(f"--keep must be in (0, 1] and --holdout in [0, 1); got {keep}, {holdout}")
    if out.exists() and any(out.iterdir()):
        raise DetectorError(f"--out {out}: exists and is not empty")
    pairs = training_pairs(data)
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = order[: round(holdout * len(pairs))]
    rest = order[len(held) :]
    kept = rest[: max(1, round(keep * len(rest)))]
    hidden = rest[len(kept) :]
    for indices, split in ((kept, "train"), (held, "val")):
        for i in indices:
            image, label, relative = pairs[i]
            place(image, out / "images" / split / relative, copy)
            if label.is_file():
                (out / "labels" / split / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(label, (out / "labels" / split / relative).with_suffix(".txt"))
    for i in hidden:
        image, label, relative = pairs[i]
        place(image, out / "unlabeled" / relative, copy)
        if label.is_file():
            (out / "hidden_labels" / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(label, (out / "hidden_labels" / relative).with_suffix(".txt"))
    description = {
        "path": str(out.resolve()),
        "train": "images/train",
        "val": "images/val" if len(held) else [str(p) for p in data.val],
        "names": dict(enumerate(data.names)),
    }
    if data.coco_annotations is not None and not len(held):
        description["annotations"] = str(data.coco_annotations)
    header = (
        f"# {data.yaml_path.name} with labels for {len(kept)} of its {len(rest)} training images (--keep {keep}, "
        f"--seed {seed}); the other {len(hidden)} are in unlabeled/ (train.py --unlabeled {out / 'unlabeled'})\n"
    )
    (out / "data.yaml").write_text(header + yaml.safe_dump(description, sort_keys=False), encoding="utf-8")
    return {"labelled": len(kept), "unlabeled": len(hidden), "holdout": len(held)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    try:
        data = load_dataset_config(args.data)
        counts = hide_labels(data, out, keep=args.keep, seed=args.seed, holdout=args.holdout, copy=args.copy)
    except DetectorError as e:
        print(f"hide_labels.py: error: {e}", file=sys.stderr)
        return 1
    print(
        f"{out / 'data.yaml'}: {counts['labelled']} labelled training images, {counts['unlabeled']} unlabelled "
        f"in {out / 'unlabeled'}"
        + (f", {counts['holdout']} held out for validation" if counts["holdout"] else "")
        + f"\n  labelled only:    python train.py --data {out / 'data.yaml'} ..."
        + f"\n  + pseudo-labels:  python train.py --data {out / 'data.yaml'} --unlabeled {out / 'unlabeled'} ..."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
