"""The YAMLs ship inside the package, the checkout's configs/ and data/ point at them, and detector's own dataset
YAMLs keep their datasets in the datasets folder, never inside the installed package.

The wheel itself is built, installed in a fresh environment and used away from the checkout by
scripts/check_wheel.sh (run by .ci/run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from detector.config import CONFIG_DIR, DATA_CONFIG_DIR, HYP_CONFIG_DIR, MODEL_CONFIG_DIR, PACKAGE_DIR
from detector.data import dataset_config as dc
from detector.data.dataset_config import DATASETS_DIR_ENV, datasets_dir, load_dataset_config
from detector.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_yaml_folders_are_inside_the_package() -> None:
    for folder in (CONFIG_DIR, MODEL_CONFIG_DIR, HYP_CONFIG_DIR, DATA_CONFIG_DIR):
        assert folder.is_dir() and folder.is_relative_to(PACKAGE_DIR), folder
    assert (CONFIG_DIR / "default.yaml").is_file() and (CONFIG_DIR / "builtin.yaml").is_file()
    assert {p.name for p in DATA_CONFIG_DIR.glob("*.yaml")} == {"coco128.yaml", "coco.yaml", "VOC.yaml"}


@pytest.mark.parametrize(("link", "target"), [("configs", CONFIG_DIR), ("data", DATA_CONFIG_DIR)])
def test_checkout_folders_are_relative_symlinks_to_the_package_yamls(link: str, target: Path) -> None:
    path = REPO_ROOT / link
    assert path.is_symlink() and not Path(os.readlink(path)).is_absolute()  # git stores it; any clone resolves it
    assert path.resolve() == target


def test_package_data_globs_cover_every_yaml() -> None:
    """setuptools copies the files its package-data globs match (relative to the package folder) into the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["detector"]
    packaged = {path for pattern in globs for path in PACKAGE_DIR.glob(pattern)}
    assert packaged == set(CONFIG_DIR.rglob("*.yaml"))


# --------------------------------------------------------------------------------------------------------------------
# Where detector's own dataset YAMLs put their datasets


def test_datasets_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATASETS_DIR_ENV, str(tmp_path / "sets"))
    assert datasets_dir() == (tmp_path / "sets").resolve()


def test_datasets_dir_of_a_checkout_is_beside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATASETS_DIR_ENV, raising=False)
    assert datasets_dir() == (REPO_ROOT.parent / "datasets").resolve()  # where YOLOv5 keeps them too


def test_datasets_dir_of_an_installed_package_is_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATASETS_DIR_ENV, raising=False)
    monkeypatch.setenv("DETECTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dc, "PACKAGE_DIR", tmp_path / "site-packages" / "detector")  # no pyproject.toml beside it
    assert datasets_dir() == (tmp_path / "cache" / "datasets").resolve()


def test_packaged_yaml_resolves_and_downloads_into_the_datasets_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATASETS_DIR_ENV, str(tmp_path / "sets"))
    monkeypatch.chdir(tmp_path)  # the working folder plays no part
    config = load_dataset_config("coco128.yaml", check_paths=False)
    assert config.root == (tmp_path / "sets" / "coco128").resolve()
    assert config.train == (config.root / "images" / "train2017",)
    assert [spec.target for spec in config.download] == [(tmp_path / "sets").resolve()]  # the zip holds coco128/


def test_missing_packaged_dataset_names_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATASETS_DIR_ENV, str(tmp_path))
    message = rf"key 'train': {tmp_path}/coco128/images/train2017 does not exist \(downloading was turned off\); "
    with pytest.raises(ConfigError, match=message + rf"{DATASETS_DIR_ENV} names the folder that holds coco128/$"):
        load_dataset_config("coco128.yaml", download=False)


def test_packaged_coco128_yaml_finds_the_shared_dataset(coco128_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `detector val --data coco128.yaml` does with DETECTOR_DATASETS_DIR=../shared/datasets (no download)."""
    monkeypatch.setenv(DATASETS_DIR_ENV, str(coco128_dir.parent))
    config = load_dataset_config("coco128.yaml", download=False)
    assert config.yaml_path == DATA_CONFIG_DIR / "coco128.yaml"
    assert config.root == coco128_dir.resolve() and config.is_coco
