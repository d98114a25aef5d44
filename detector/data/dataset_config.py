"""Dataset YAML -> :class:`DatasetConfig`: YOLOv5's dataset files, read strictly and without running anything.

A dataset YAML names where the images are and what the classes are called::

    path: ../datasets/coco128        # dataset root; relative = against this YAML's folder (default: that folder)
    train: images/train2017          # folder, .txt list of images, or a list of these; relative to `path`
    val: images/train2017
    test:                            # optional
    names: {0: person, 1: bicycle}   # or a list; dict keys must be 0..n-1
    nc: 2                            # optional; must equal len(names)
    download: https://.../coco128.zip  # optional: URL(s) of .zip/.tar/.tar.gz/.tgz archives, never code
    labels: yolo_labels              # ours, optional: label folder when labels do not follow /images/ -> /labels/
    annotations: annotations/instances_val2017.json  # ours, optional: COCO JSON ground truth for pycocotools

The YAMLs that ship with detector (``data/*.yaml`` in a checkout, ``detector/configs/data`` when installed) are
the exception: their relative ``path`` is inside :func:`datasets_dir`, so a download never lands in site-packages.

Every mistake stops with one line naming the file, the key and what was expected (:class:`ConfigError`).
YOLOv5 executes a ``download:`` string that is Python or shell code; here such a value is refused.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from detector.config import DATA_CONFIG_DIR, PACKAGE_DIR, load_yaml, resolve_config_path
from detector.errors import ConfigError
from detector.utils.files import cache_dir

LOGGER = logging.getLogger(__name__)

# The 80 class names of COCO detection, in YOLOv5's order (the order of COCO's category ids).
COCO_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

# COCO's category ids run 1..90 with ten ids unused (they were dropped from the released annotations).
_COCO_UNUSED_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
# COCO80_TO_COCO91[class_index] = COCO category id, e.g. 0 (person) -> 1, 79 (toothbrush) -> 90.
COCO80_TO_COCO91: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _COCO_UNUSED_IDS)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
CONVERTERS = ("voc",)  # values of `convert:`; implemented in detector.data.convert, run after a download

_SPLIT_KEYS = ("train", "val", "test")
_KNOWN_KEYS = ("path", *_SPLIT_KEYS, "names", "nc", "download", "convert", "labels", "annotations")
# Keys that common exporters (Roboflow, Ultralytics HUB, pose datasets) write: accepted with a warning.
_IGNORED_KEYS = ("roboflow", "license", "url", "description", "version", "author", "date", "kpt_shape", "flip_idx")
_BUILTIN_SPECS = ("", "builtin")
DATASETS_DIR_ENV = "DETECTOR_DATASETS_DIR"


def datasets_dir() -> Path:
    """The folder holding the datasets of detector's own YAMLs (``coco128.yaml`` -> ``<datasets_dir>/coco128``).

    ``$DETECTOR_DATASETS_DIR`` when set; else, running from a source checkout, the ``datasets`` folder beside the
    checkout (where YOLOv5 keeps them, so its downloads are reused); else, for an installed package, the user cache's
    ``datasets`` folder (``~/.cache/detector/datasets``, where the built-in dataset is generated too).
    """
    if folder := os.environ.get(DATASETS_DIR_ENV):
        return Path(folder).expanduser().resolve()
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file():
        return (checkout.parent / "datasets").resolve()
    return (cache_dir() / "datasets").resolve()


def _is_packaged_yaml(yaml_path: Path) -> bool:
    """Whether ``yaml_path`` is one of the dataset YAMLs shipped with detector."""
    return yaml_path.resolve().parent == DATA_CONFIG_DIR.resolve()


@dataclass(frozen=True)
class DownloadSpec:
    """One archive to fetch: ``url``, unpacked into ``target`` (a folder; the archive's top folder lands in it)."""

    url: str
    target: Path


@dataclass(frozen=True)
class DatasetConfig:
    """A validated dataset description; every path is absolute.

    ``train``/``val``/``test`` hold image folders or ``.txt`` image lists (empty tuple: split not given).
    ``labels`` is the label-folder override, relative to ``root`` (None: YOLOv5's rule, the last ``images`` folder
    of an image's path becomes ``labels``). The loader (``detector.data.dataset.image_to_label_path``) looks for
    each label at the image's path relative to its source folder (its file name for ``.txt`` list entries).
    """

    yaml_path: Path
    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    test: tuple[Path, ...]
    names: tuple[str, ...]
    labels: str | None = None
    coco_annotations: Path | None = None
    download: tuple[DownloadSpec, ...] = ()
    convert: str | None = None

    @property
    def nc(self) -> int:
        """Number of classes."""
        return len(self.names)

    @property
    def is_coco(self) -> bool:
        """True when the classes are COCO's 80 in COCO's order (the validator then maps ids 80 -> 91)."""
        return self.names == COCO_NAMES

    def split(self, name: str) -> tuple[Path, ...]:
        """The sources of split ``name`` ("train", "val" or "test")."""
        if name not in _SPLIT_KEYS:
            raise ValueError(f"unknown split {name!r}; expected one of {list(_SPLIT_KEYS)}")
        return getattr(self, name)

    def missing_paths(self) -> list[tuple[str, Path]]:
        """``(key, path)`` of every train/val/test source and annotation file that does not exist.

        For a ``.txt`` list, its first image is checked too: a list unpacked from a labels archive whose image
        archive never arrived (an interrupted download) then counts as missing and the download is retried.
        """
        missing = []
        for key in _SPLIT_KEYS:
            for source in getattr(self, key):
                if not source.exists():
                    missing.append((key, source))
                elif source.is_file() and (first := _first_listed_image(source)) and not first.exists():
                    missing.append((key, first))
        if self.coco_annotations is not None and not self.coco_annotations.is_file():
            missing.append(("annotations", self.coco_annotations))
        return missing


def _first_listed_image(list_file: Path) -> Path | None:
    """The first image of a ``.txt`` image list (relative entries resolve against the list's folder), or None."""
    with open(list_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            if entry := line.strip():
                path = Path(entry)
                return path if path.is_absolute() else (list_file.parent / path).resolve()
    return None


def load_dataset_config(spec: str | Path, *, check_paths: bool = True, download: bool = True) -> DatasetConfig:
    """Read and validate a dataset YAML.

    Args:
        spec: a YAML path; a bare name (``"coco128.yaml"``, ``"coco128"``) is also looked up in detector's own
            dataset YAMLs (``data/`` in a checkout); ``""`` or ``"builtin"`` is the built-in synthetic dataset
            (generated on first use).
        check_paths: require every train/val/test source (and ``annotations``) to exist. Turn off when only the
            class names are needed (e.g. detect.py).
        download: when paths are missing and the YAML has ``download:``, fetch and unpack the archives, then
            check again.

    Raises:
        ConfigError: one line naming the file, the key and what was expected.
    """
    if str(spec).strip().lower() in _BUILTIN_SPECS:
        from detector.data.builtin import ensure_builtin_dataset

        return load_dataset_config(ensure_builtin_dataset(), check_paths=check_paths, download=False)
    yaml_path = resolve_config_path(spec, DATA_CONFIG_DIR).resolve()
    config = parse_dataset_config(load_yaml(yaml_path), yaml_path)
    if check_paths:
        config = _ensure_paths(config, download=download)
    return config


def parse_dataset_config(data: Mapping[str, Any], yaml_path: Path) -> DatasetConfig:
    """Validate the mapping read from ``yaml_path`` (only used to resolve relative paths and in messages)."""
    where = str(yaml_path)
    _check_keys(data, where)
    names = _parse_names(data, where)
    root = _resolve_root(data.get("path"), yaml_path, where)
    splits = {key: _parse_sources(data.get(key), key, root, where) for key in _SPLIT_KEYS}
    for key in ("train", "val"):
        if not splits[key]:
            raise ConfigError(f"{where}: key '{key}' is required (an image folder, a .txt list, or a list of these)")
    labels = _optional_str(data, "labels", where)
    annotations = _optional_str(data, "annotations", where)
    convert = _optional_str(data, "convert", where)
    if convert is not None and convert not in CONVERTERS:
        raise ConfigError(f"{where}: key 'convert' must be one of {list(CONVERTERS)}, got {convert!r}")
    return DatasetConfig(
        yaml_path=yaml_path,
        root=root,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        names=names,
        labels=labels,
        coco_annotations=_join(root, annotations) if annotations else None,
        download=_parse_download(data.get("download"), root, where),
        convert=convert,
    )


# --------------------------------------------------------------------------------------------------------------------
# Key-by-key validation


def _check_keys(data: Mapping[str, Any], where: str) -> None:
    for key in data:
        if key in _KNOWN_KEYS:
            continue
        if key in _IGNORED_KEYS:
            LOGGER.warning("%s: key '%s' is not used by detector and is ignored", where, key)
            continue
        close = difflib.get_close_matches(str(key), _KNOWN_KEYS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: unknown key '{key}'{hint} (valid keys: {', '.join(_KNOWN_KEYS)})")
    if "names" not in data:
        raise ConfigError(f"{where}: key 'names' is required (a list of class names or a {{0: name, ...}} mapping)")


def _parse_names(data: Mapping[str, Any], where: str) -> tuple[str, ...]:
    raw = data["names"]
    if isinstance(raw, Mapping):
        keys = list(raw)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(
            range(len(keys))
        ):
            raise ConfigError(f"{where}: key 'names' as a mapping needs integer keys 0..{len(keys) - 1}, got {keys}")
        values = [raw[i] for i in range(len(keys))]
    elif isinstance(raw, (list, tuple)):
        values = list(raw)
    else:
        raise ConfigError(f"{where}: key 'names' expects a list or a {{0: name, ...}} mapping, got {raw!r}")
    if not values:
        raise ConfigError(f"{where}: key 'names' is empty; expected at least one class name")
    names = []
    for i, value in enumerate(values):
        # YAML reads `no`/`yes`/`null` as bool/None: a class with such a name must be quoted.
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: key 'names' item {i} must be a string (quote it in YAML), got {value!r}")
        names.append(str(value))
    nc = data.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc != len(names)):
        raise ConfigError(f"{where}: key 'nc' is {nc!r} but 'names' has {len(names)} entries; expected nc equal")
    return tuple(names)


def _resolve_root(raw: Any, yaml_path: Path, where: str) -> Path:
    """`path` relative to the YAML's folder (to :func:`datasets_dir` for detector's own YAMLs); a YOLOv5 YAML
    relative to the working folder is accepted too."""
    yaml_dir = yaml_path.parent
    if raw is None or raw == "":
        return yaml_dir
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: key 'path' expects a folder path string, got {raw!r}")
    path = Path(os.path.expanduser(raw))
    if path.is_absolute():
        return path.resolve()
    if _is_packaged_yaml(yaml_path):
        return (datasets_dir() / path).resolve()
    root = (yaml_dir / path).resolve()
    cwd_root = path.resolve()
    # YOLOv5 resolves `path` against its repository folder; users running from there get the same folder.
    if not root.exists() and cwd_root.is_dir():
        LOGGER.info(
            "%s: path '%s' not found beside the YAML; using %s (relative to the working folder)", where, raw, cwd_root
        )
        return cwd_root
    return root


def _parse_sources(raw: Any, key: str, root: Path, where: str) -> tuple[Path, ...]:
    if raw is None or raw == "" or raw == []:
        return ()
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    if not all(isinstance(item, str) and item for item in items):
        raise ConfigError(
            f"{where}: key '{key}' expects an image folder, a .txt list, or a list of these (strings), got {raw!r}"
        )
    return tuple(_join(root, item) for item in items)


def _join(root: Path, item: str) -> Path:
    path = Path(os.path.expanduser(item))
    return path if path.is_absolute() else (root / path).resolve()


def _optional_str(data: Mapping[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: key '{key}' expects a string, got {value!r}")
    return value


def _parse_download(raw: Any, root: Path, where: str) -> tuple[DownloadSpec, ...]:
    """`download:` entries: "URL" (unpacked beside `path`) or {url: URL, dir: folder relative to `path`}."""
    if raw is None or raw == "":
        return ()
    entries = raw if isinstance(raw, list) else [raw]
    specs = []
    for entry in entries:
        if isinstance(entry, Mapping):
            unknown = set(entry) - {"url", "dir"}
            if unknown or "url" not in entry:
                raise ConfigError(
                    f"{where}: key 'download' entries as mappings take 'url' and optional 'dir', got {dict(entry)}"
                )
            url, target_dir = entry["url"], entry.get("dir", ".")
            if not isinstance(target_dir, str):
                raise ConfigError(f"{where}: key 'download' entry 'dir' expects a folder string, got {target_dir!r}")
            target = _join(root, target_dir)
        else:
            url, target = entry, root.parent
        _check_archive_url(url, where)
        specs.append(DownloadSpec(url=url, target=target))
    return tuple(specs)


def _check_archive_url(url: Any, where: str) -> None:
    expected = f"an http(s) URL of a {'/'.join(ARCHIVE_SUFFIXES)} archive (detector never runs code from a YAML)"
    if not isinstance(url, str) or "\n" in url.strip():
        shown = url if not isinstance(url, str) else url.strip().splitlines()[0] + " ..."
        raise ConfigError(f"{where}: key 'download' expects {expected}, got {shown!r}")
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{where}: key 'download' expects {expected}, got {url!r}")
    if not parsed.path.lower().endswith(ARCHIVE_SUFFIXES):
        raise ConfigError(f"{where}: key 'download' expects {expected}, got {url!r}")


# --------------------------------------------------------------------------------------------------------------------
# Paths on disk


def _ensure_paths(config: DatasetConfig, *, download: bool) -> DatasetConfig:
    missing = config.missing_paths()
    downloaded = False
    if missing and download and config.download:
        from detector.data.download import download_dataset

        LOGGER.info("%s: %s not found; downloading the dataset", config.yaml_path, missing[0][1])
        download_dataset(config)
        downloaded = True
        missing = config.missing_paths()
    if missing:
        key, path = missing[0]
        if downloaded:
            why = " even after downloading (does the archive's top folder match 'path'?)"
        elif config.download:
            why = " (downloading was turned off)"
        else:
            why = " and the YAML has no 'download' URL"
        if _is_packaged_yaml(config.yaml_path):
            why += f"; {DATASETS_DIR_ENV} names the folder that holds {config.root.name}/"
        raise ConfigError(f"{config.yaml_path}: key '{key}': {path} does not exist{why}")
    return config
