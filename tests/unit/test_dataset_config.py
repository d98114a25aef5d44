"""detector.data.dataset_config: YOLOv5 dataset YAMLs read strictly, paths resolved, only archive downloads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from detector.config import DATA_CONFIG_DIR
from detector.data import dataset_config as dc
from detector.data.dataset_config import (
    COCO80_TO_COCO91,
    COCO_NAMES,
    load_dataset_config,
)
from detector.errors import ConfigError

# PASCAL VOC's 20 classes in the order of YOLOv5's VOC.yaml.
VOC_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")  # fmt: skip


def write_dataset(root: Path, yaml_text: str, *, folders: tuple[str, ...] = ("images/train", "images/val")) -> Path:
    """A dataset folder with the given (empty) folders and a data.yaml holding ``yaml_text``."""
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    path = root / "data.yaml"
    path.write_text(yaml_text)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Real files


def test_shared_coco128_yaml_loads(coco128_dir: Path) -> None:
    config = load_dataset_config(coco128_dir / "coco128.yaml")
    assert config.root == coco128_dir.resolve()  # `path: .` is the YAML's own folder
    assert config.train == (coco128_dir.resolve() / "images" / "train2017",)
    assert config.val == config.train and config.test == ()
    assert config.nc == 80 and config.names[0] == "person" and config.names[79] == "toothbrush"
    assert config.is_coco


def test_coco_names_and_80_to_91_map_match_the_coco_annotations(coco128_dir: Path) -> None:
    """The independent reference: COCO's own category list in instances_train2017.json."""
    with open(coco128_dir / "annotations" / "instances_train2017.json", encoding="utf-8") as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    assert tuple(c["name"] for c in categories) == COCO_NAMES
    assert tuple(c["id"] for c in categories) == COCO80_TO_COCO91
    assert (COCO80_TO_COCO91[0], COCO80_TO_COCO91[11], COCO80_TO_COCO91[79]) == (1, 13, 90)


@pytest.mark.parametrize(
    ("name", "nc", "is_coco", "url_part"),
    [
        ("coco128.yaml", 80, True, "ultralytics/assets/releases/download/v0.0.0/coco128.zip"),
        ("coco.yaml", 80, True, "images.cocodataset.org/zips/train2017.zip"),
        ("VOC.yaml", 20, False, "VOCtest_06-Nov-2007.tar"),
    ],
)
def test_repo_dataset_yamls_parse(name: str, nc: int, is_coco: bool, url_part: str) -> None:
    config = load_dataset_config(name, check_paths=False)  # a bare name resolves in the repo's data/ folder
    assert config.yaml_path == (DATA_CONFIG_DIR / name).resolve()
    assert config.nc == nc and config.is_coco is is_coco
    assert any(url_part in spec.url for spec in config.download)
    assert config.root.parent == dc.datasets_dir()  # never inside the package (tests/unit/test_package_data.py)


def test_voc_yaml_names_and_convert_step() -> None:
    config = load_dataset_config("VOC", check_paths=False)
    assert config.names == VOC_NAMES
    assert config.convert == "voc"
    assert all(spec.target == config.root for spec in config.download)  # `dir: .` unpacks into path itself
    assert [p.name for p in config.train] == ["train2012", "train2007", "val2012", "val2007"]


def test_coco_yaml_download_targets() -> None:
    config = load_dataset_config("coco.yaml", check_paths=False)
    labels, train, val = config.download
    assert labels.target == config.root.parent  # the labels zip holds the coco/ top folder
    assert train.target == val.target == config.root / "images"
    assert config.coco_annotations == config.root / "annotations" / "instances_val2017.json"


# --------------------------------------------------------------------------------------------------------------------
# names / nc


def test_names_as_list_and_as_dict(tmp_path: Path) -> None:
    listed = load_dataset_config(write_dataset(tmp_path / "a", "train: images/train\nval: images/val\nnames: [a, b]\n"))
    mapped = load_dataset_config(
        write_dataset(tmp_path / "b", "train: images/train\nval: images/val\nnames: {1: b, 0: a}\nnc: 2\n")
    )
    assert listed.names == mapped.names == ("a", "b")
    assert listed.nc == 2 and not listed.is_coco


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("{0: a, 2: c}", r"key 'names' as a mapping needs integer keys 0\.\.1, got \[0, 2\]"),
        ("{a: x}", r"key 'names' as a mapping needs integer keys"),
        ("person", r"key 'names' expects a list or a \{0: name, \.\.\.\} mapping, got 'person'"),
        ("[]", r"key 'names' is empty"),
        ("[cat, no]", r"key 'names' item 1 must be a string \(quote it in YAML\), got False"),
        ("[cat, null]", r"key 'names' item 1 must be a string"),
    ],
)
def test_bad_names_stop_with_one_line(tmp_path: Path, names: str, message: str) -> None:
    path = write_dataset(tmp_path, f"train: images/train\nval: images/val\nnames: {names}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {message}") as info:
        load_dataset_config(path)
    assert "\n" not in str(info.value)


def test_nc_must_equal_number_of_names(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, "train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n")
    with pytest.raises(ConfigError, match=r"key 'nc' is 3 but 'names' has 2 entries"):
        load_dataset_config(path)


def test_numeric_class_names_become_strings(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, "train: images/train\nval: images/val\nnames: [1, 2.5]\n")
    assert load_dataset_config(path).names == ("1", "2.5")


# --------------------------------------------------------------------------------------------------------------------
# Keys


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: images/train\nvall: images/val\nnames: [a]\n", r"unknown key 'vall'; did you mean 'val'\?"),
        ("train: images/train\nval: images/val\nnames: [a]\nlabel: x\n", r"unknown key 'label'; did you mean 'labels'"),
        ("train: images/train\nval: images/val\n", r"key 'names' is required"),
        ("val: images/val\nnames: [a]\n", r"key 'train' is required"),
        ("train: images/train\nnames: [a]\n", r"key 'val' is required"),
        ("train: 5\nval: images/val\nnames: [a]\n", r"key 'train' expects an image folder, a \.txt list"),
        ("path: [x]\ntrain: a\nval: b\nnames: [a]\n", r"key 'path' expects a folder path string"),
        ("train: a\nval: b\nnames: [a]\nconvert: coco\n", r"key 'convert' must be one of \['voc'\]"),
        ("train: a\nval: b\nnames: [a]\nannotations: 3\n", r"key 'annotations' expects a string"),
    ],
)
def test_key_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_dataset(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{path}: {message}") as info:
        load_dataset_config(path)
    assert "\n" not in str(info.value)


def test_exporter_keys_are_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "train: images/train\nval: images/val\nnames: [a]\nroboflow:\n  workspace: w\n  version: 2\n"
    with caplog.at_level(logging.WARNING, logger="detector"):
        config = load_dataset_config(write_dataset(tmp_path, text))
    assert config.names == ("a",)
    assert any("'roboflow' is not used by detector and is ignored" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------------------
# Paths


def test_relative_path_resolves_against_the_yaml_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sets" / "mine" / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "sets" / "mine" / "imgs" / "b").mkdir(parents=True)
    (tmp_path / "sets" / "mine" / "list.txt").write_text("")
    yaml_dir = tmp_path / "yamls"
    yaml_dir.mkdir()
    path = yaml_dir / "mine.yaml"
    path.write_text("path: ../sets/mine\ntrain: [imgs/a, imgs/b]\nval: list.txt\ntest: imgs/a\nnames: [x]\n")
    monkeypatch.chdir(tmp_path / "sets")  # the working folder must not matter
    config = load_dataset_config(path)
    root = (tmp_path / "sets" / "mine").resolve()
    assert config.root == root
    assert config.train == (root / "imgs" / "a", root / "imgs" / "b")
    assert config.val == (root / "list.txt",) and config.test == (root / "imgs" / "a",)
    assert config.split("val") == config.val


def test_yolov5_style_path_relative_to_working_folder_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """YOLOv5 resolves `path` against its repo folder; running from there, such a YAML still works."""
    (tmp_path / "datasets" / "d" / "images" / "train").mkdir(parents=True)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    path = tmp_path / "repo" / "data" / "d.yaml"
    path.write_text("path: ../datasets/d\ntrain: images/train\nval: images/train\nnames: [x]\n")
    monkeypatch.chdir(tmp_path / "repo")
    assert load_dataset_config(path).root == (tmp_path / "datasets" / "d").resolve()


def test_absolute_and_home_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "elsewhere.yaml"
    path.write_text(f"path: ~/\ntrain: {tmp_path}/images/train\nval: images/train\nnames: [x]\n")
    config = load_dataset_config(path)
    assert config.root == tmp_path.resolve() and config.val == (tmp_path.resolve() / "images" / "train",)


def test_missing_path_names_the_key_and_the_path(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, "train: images/train\nval: images/nope\nnames: [a]\n")
    expected = rf"^{path}: key 'val': {tmp_path.resolve() / 'images' / 'nope'} does not exist and the YAML has no"
    with pytest.raises(ConfigError, match=expected):
        load_dataset_config(path)
    assert load_dataset_config(path, check_paths=False).val == (tmp_path.resolve() / "images" / "nope",)


def test_missing_annotations_file_is_reported(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, "train: images/train\nval: images/val\nnames: [a]\nannotations: gt.json\n")
    with pytest.raises(ConfigError, match=r"key 'annotations': .*gt\.json does not exist"):
        load_dataset_config(path)
    (tmp_path / "gt.json").write_text("{}")
    assert load_dataset_config(path).coco_annotations == tmp_path.resolve() / "gt.json"


def test_txt_list_whose_first_image_is_missing_counts_as_missing(tmp_path: Path) -> None:
    """A labels archive that arrived without its images archive: the download must be retried, not skipped."""
    (tmp_path / "train.txt").write_text("./images/train/a.jpg\n")
    path = write_dataset(tmp_path, "train: train.txt\nval: images/val\nnames: [a]\n")
    with pytest.raises(ConfigError, match=r"key 'train': .*images/train/a\.jpg does not exist"):
        load_dataset_config(path)
    (tmp_path / "images" / "train" / "a.jpg").write_bytes(b"")
    assert load_dataset_config(path).train == (tmp_path.resolve() / "train.txt",)


def test_missing_name_suggests_a_repo_yaml() -> None:
    with pytest.raises(ConfigError, match=r"coco12\.yaml: file not found .*did you mean 'coco128\.yaml'"):
        load_dataset_config("coco12.yaml")


def test_missing_paths_trigger_download_into_the_parent_of_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "yamls" / "d.yaml"
    path.parent.mkdir()
    path.write_text("path: ../sets/d\ntrain: images/train\nval: images/train\nnames: [a]\n"
                    "download: https://example.com/files/d.zip\n")  # fmt: skip
    calls = []

    def fake_download(config: dc.DatasetConfig) -> None:  # stands in for the network: unpacks d/images/train
        calls.append(config.download)
        (config.download[0].target / "d" / "images" / "train").mkdir(parents=True)

    import detector.data.download as download_module

    monkeypatch.setattr(download_module, "download_dataset", fake_download)
    with pytest.raises(ConfigError, match=r"downloading was turned off"):
        load_dataset_config(path, download=False)
    config = load_dataset_config(path)
    assert len(calls) == 1 and calls[0][0].target == (tmp_path / "sets").resolve()
    assert config.train[0].is_dir()


def test_download_that_does_not_create_the_paths_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dataset(tmp_path / "d", "train: images/x\nval: images/x\nnames: [a]\ndownload: http://h/d.tar.gz\n")
    import detector.data.download as download_module

    monkeypatch.setattr(download_module, "download_dataset", lambda config: None)
    with pytest.raises(ConfigError, match=r"does not exist even after downloading"):
        load_dataset_config(path)


# --------------------------------------------------------------------------------------------------------------------
# download: only archive URLs, never code


@pytest.mark.parametrize(
    "value",
    [
        "|\n  import os\n  os.system('echo hacked')",  # YOLOv5's VOC.yaml style: Python to exec
        "bash data/scripts/get_coco.sh",
        "https://example.com/data.json",
        "ftp://example.com/data.zip",
        "file:///etc/passwd.zip",
        "[https://example.com/a.zip, 5]",
        "{url: https://example.com/a.zip, into: images}",
    ],
)
def test_download_accepts_only_archive_urls(tmp_path: Path, value: str) -> None:
    path = write_dataset(tmp_path, f"train: images/train\nval: images/val\nnames: [a]\ndownload: {value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'download' ") as info:
        load_dataset_config(path)
    assert "\n" not in str(info.value)


def test_download_entries_as_urls_and_mappings(tmp_path: Path) -> None:
    text = (
        "path: d\ntrain: images/train\nval: images/val\nnames: [a]\ndownload:\n"
        "  - https://h.org/a/d.zip\n  - {url: 'http://h.org/b/imgs.tar.gz?x=1', dir: images}\n  - http://h.org/c.TGZ\n"
    )
    path = tmp_path / "d.yaml"
    path.write_text(text)
    config = load_dataset_config(path, check_paths=False)
    root = tmp_path.resolve() / "d"
    assert [(s.url, s.target) for s in config.download] == [
        ("https://h.org/a/d.zip", tmp_path.resolve()),
        ("http://h.org/b/imgs.tar.gz?x=1", root / "images"),
        ("http://h.org/c.TGZ", tmp_path.resolve()),
    ]


def test_labels_override_is_kept_relative_to_path(tmp_path: Path) -> None:
    text = "train: JPEGImages\nval: JPEGImages\nnames: [a]\nlabels: yolo\n"
    config = load_dataset_config(write_dataset(tmp_path, text, folders=("JPEGImages",)))
    assert config.labels == "yolo" and config.root / config.labels == tmp_path.resolve() / "yolo"
    assert (
        load_dataset_config(write_dataset(tmp_path / "b", "train: a\nval: a\nnames: [a]\n", folders=("a",))).labels
        is None
    )
