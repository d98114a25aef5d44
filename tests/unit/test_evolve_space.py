"""The evolution search space: the shipped default, unit-space positions, starting-hyp checks and file errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from detector.config import HYP_CONFIG_DIR, Hyperparameters, load_hyp
from detector.errors import ConfigError
from detector.evolve.space import DEFAULT_SPACE, Dimension, SearchSpace

# The default space as the spec lists it (YOLOv5's ranges): key -> (low, high, scale, evolve).
EXPECTED_DEFAULT = {
    "lr0": (1e-5, 0.1, "log", None),
    "lrf": (0.01, 1.0, "linear", None),
    "momentum": (0.6, 0.98, "linear", None),
    "weight_decay": (1e-5, 1e-2, "log", None),
    "warmup_epochs": (0.0, 5.0, "linear", None),
    "warmup_momentum": (0.0, 0.95, "linear", None),
    "warmup_bias_lr": (1e-3, 0.2, "log", None),
    "box": (0.02, 0.2, "linear", None),
    "cls": (0.2, 4.0, "linear", None),
    "cls_pw": (0.5, 2.0, "linear", None),
    "obj": (0.2, 4.0, "linear", None),
    "obj_pw": (0.5, 2.0, "linear", None),
    "iou_t": (0.1, 0.7, "linear", False),
    "anchor_t": (2.0, 8.0, "linear", None),
    "anchors": (2.0, 10.0, "linear", False),
    "fl_gamma": (0.0, 2.0, "linear", None),
    "label_smoothing": (0.0, 0.2, "linear", None),
    "distill": (0.1, 4.0, "linear", None),
    "distill_t": (1.0, 8.0, "linear", False),
    "hsv_h": (0.0, 0.1, "linear", None),
    "hsv_s": (0.0, 0.9, "linear", None),
    "hsv_v": (0.0, 0.9, "linear", None),
    "degrees": (0.0, 45.0, "linear", None),
    "translate": (0.0, 0.9, "linear", None),
    "scale": (0.0, 0.9, "linear", None),
    "shear": (0.0, 10.0, "linear", None),
    "perspective": (0.0, 0.001, "linear", None),
    "flipud": (0.0, 1.0, "linear", None),
    "fliplr": (0.0, 1.0, "linear", None),
    "mosaic": (0.0, 1.0, "linear", None),
    "mosaic9": (0.0, 1.0, "linear", None),
    "mixup": (0.0, 1.0, "linear", None),
    "copy_paste": (0.0, 1.0, "linear", None),
    "cutout": (0.0, 1.0, "linear", None),
    "cutmix": (0.0, 1.0, "linear", None),
    "gridmask": (0.0, 1.0, "linear", None),
    "min_visibility": (0.1, 0.9, "linear", False),
    "albumentations": (0.0, 1.0, "linear", None),
    "drop_path": (0.0, 0.3, "linear", None),
    "dropout": (0.0, 0.5, "linear", None),
    "ema_decay": (0.0, 0.99999, "linear", False),
    "ema_tau": (100.0, 10000.0, "log", False),
}


def write_space(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_default_space_has_every_hyperparameter_with_the_listed_bounds_and_scales():
    space = SearchSpace.load()
    assert space.source == str(DEFAULT_SPACE)
    assert list(space.dimensions) == [f.name for f in dataclasses.fields(Hyperparameters)]  # file order = field order
    for key, (low, high, scale, evolve) in EXPECTED_DEFAULT.items():
        assert space.dimensions[key] == Dimension(key, low, high, scale, evolve)


def test_default_hyp_evolves_its_nonzero_keys_except_the_frozen_ones():
    space = SearchSpace.load()
    start = dataclasses.asdict(Hyperparameters())
    zero = {key for key, value in start.items() if value == 0}
    assert zero == {"anchors", "fl_gamma", "degrees", "shear", "perspective", "flipud", "mosaic9", "mixup"} | {
        "copy_paste",
        "cutout",
        "cutmix",
        "gridmask",
        "albumentations",
        "drop_path",
        "dropout",
        "distill",
        "label_smoothing",
    }
    frozen = {"iou_t", "min_visibility", "distill_t", "ema_decay", "ema_tau"}
    expected = tuple(key for key in EXPECTED_DEFAULT if key not in zero | frozen)
    assert space.evolved_keys(start) == expected


@pytest.mark.parametrize("hyp_file", sorted(p.name for p in HYP_CONFIG_DIR.glob("hyp.*.yaml")))
def test_shipped_hyps_fit_the_default_space(hyp_file):
    hyp = dataclasses.asdict(load_hyp(hyp_file))
    SearchSpace.load().check_start(hyp, hyp_file)  # anchors 0 lies below its low 2, but anchors never evolves


def test_unit_positions_linear_and_log_by_hand():
    linear = Dimension("anchor_t", 2.0, 10.0)
    assert linear.to_unit(4.0) == pytest.approx(0.25)
    assert linear.from_unit(0.25) == pytest.approx(4.0)
    log = Dimension("lr0", 1e-5, 0.1, "log")
    assert log.to_unit(1e-2) == pytest.approx(0.75)  # 3 of the 4 decades
    assert log.to_unit(1e-3) == pytest.approx(0.5)
    assert log.from_unit(0.25) == pytest.approx(1e-4)
    for position in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert log.to_unit(log.from_unit(position)) == pytest.approx(position)


def test_unit_positions_are_clipped_and_stay_inside_the_bounds():
    log = Dimension("lr0", 1e-5, 0.1, "log")
    assert log.to_unit(10.0) == 1.0 and log.to_unit(0.0) == 0.0 and log.to_unit(-1.0) == 0.0
    assert log.from_unit(1.7) == 0.1 and log.from_unit(-0.3) == 1e-5
    assert all(1e-5 <= log.from_unit(p / 100) <= 0.1 for p in range(101))
    assert Dimension("box", 0.05, 0.05).to_unit(0.05) == 0.0  # a point range does not divide by zero
    assert Dimension("box", 0.02, 0.2).clip(0.5) == 0.2


@pytest.mark.parametrize(
    ("evolve", "start", "expected"),
    [(None, 0.0, False), (None, 0.3, True), (True, 0.0, True), (False, 0.3, False)],
)
def test_evolves_auto_and_forced(evolve, start, expected):
    assert Dimension("mixup", 0.0, 1.0, evolve=evolve).evolves(start) is expected


def test_check_start_names_the_start_the_key_and_the_space(tmp_path):
    path = write_space(tmp_path, "lr0: {low: 1.0e-5, high: 0.1, scale: log}\nmixup: {low: 0.2, high: 1.0}\n")
    space = SearchSpace.load(path)
    space.check_start({"lr0": 0.01, "mixup": 0.0}, "hyp.yaml")  # mixup 0 is below its low, but does not evolve
    with pytest.raises(ConfigError) as error:
        space.check_start({"lr0": 0.5, "mixup": 0.0}, "hyp.yaml")
    assert str(error.value) == f"hyp.yaml: hyp.lr0 = 0.5 is outside its bounds [1e-05, 0.1] in {path}"


def test_clip_limits_space_keys_and_leaves_the_others(tmp_path):
    space = SearchSpace.load(write_space(tmp_path, "box: {low: 0.02, high: 0.2}\nlr0: {low: 1.0e-5, high: 0.1}\n"))
    hyp = {"box": 0.5, "lr0": 1e-6, "degrees": 99.0}
    assert space.clip(hyp) == {"box": 0.2, "lr0": 1e-5, "degrees": 99.0}
    assert hyp["box"] == 0.5  # a copy


def test_yaml_numbers_without_a_dot_are_read(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as a string; a space file written that way still means the number
    space = SearchSpace.load(write_space(tmp_path, "lr0: {low: 1e-5, high: 1e-1, scale: log}\n"))
    assert space.dimensions["lr0"] == Dimension("lr0", 1e-5, 0.1, "log")


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("mosiac: {low: 0.0, high: 1.0}", "mosiac", "unknown hyperparameter 'mosiac'; did you mean 'mosaic'"),
        ("box: {low: 0.0, hihg: 1.0}", "box", "unknown field 'hihg'; did you mean 'high'"),
        ("box: {high: 1.0}", "box", "low is missing"),
        ("box: {low: 0.0, high: big}", "box", "high must be a number, got 'big'"),
        ("box: {low: 0.0, high: .nan}", "box", "high must be a number"),
        ("box: {low: true, high: 1.0}", "box", "low must be a number"),
        ("box: {low: 0.5, high: 0.1}", "box", "low 0.5 is above high 0.1"),
        ("box: {low: 0.0, high: 1.0, scale: exp}", "box", "scale must be one of ['linear', 'log']"),
        ("lrf: {low: 0.0, high: 0.1, scale: log}", "lrf", "scale log needs low > 0"),
        ("mixup: {low: 0.0, high: 1.0, evolve: maybe}", "mixup", "evolve must be true or false"),
        ("mixup: 0.5", "mixup", "expects a mapping"),
    ],
)
def test_space_errors_are_one_line_naming_file_and_key(tmp_path, text, key, message):
    path = write_space(tmp_path, "lr0: {low: 1.0e-5, high: 0.1, scale: log}\n" + text + "\n")
    with pytest.raises(ConfigError) as error:
        SearchSpace.load(path)
    text = str(error.value)
    assert "\n" not in text and str(path) in text and f"'{key}'" in text and message in text


def test_empty_or_missing_space_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        SearchSpace.load(write_space(tmp_path, "# nothing\n"))
    with pytest.raises(ConfigError, match="not found"):
        SearchSpace.load(tmp_path / "absent.yaml")


def test_log_positions_move_by_ratios():
    # equal steps in unit space are equal ratios in value: the reason lr0 is on a log scale
    log = Dimension("lr0", 1e-5, 0.1, "log")
    ratios = [log.from_unit(p + 0.1) / log.from_unit(p) for p in (0.1, 0.4, 0.8)]
    assert ratios == pytest.approx([math.pow(1e4, 0.1)] * 3)


def test_as_dict_is_what_load_reads_back(tmp_path):
    space = SearchSpace.load()
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space.as_dict(), sort_keys=False))
    assert SearchSpace.load(path).dimensions == space.dimensions  # a resumed search's space.yaml is the same space
