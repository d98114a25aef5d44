"""detector.config: strict merging of defaults <- YAML <- flags, type coercion, hyp files, configs/default.yaml."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from detector.config import (
    CONFIG_DIR,
    DATA_CONFIG_DIR,
    HYP_CONFIG_DIR,
    DetectConfig,
    ExportConfig,
    Hyperparameters,
    TrainConfig,
    ValConfig,
    apply_aliases,
    build_config,
    check_train_config,
    config_to_dict,
    load_hyp,
    load_yaml,
    resolve_config_path,
    resolve_train_config,
    save_config,
)
from detector.errors import ConfigError

# The keys of YOLOv5's data/hyps/hyp.scratch-{low,med,high}.yaml and hyp.no-augmentation.yaml (v7.0): 28 keys
# (their 29th line, `anchors: 3`, is commented out).
YOLOV5_HYP_KEYS = {
    "lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr", "box", "cls",
    "cls_pw", "obj", "obj_pw", "iou_t", "anchor_t", "fl_gamma", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate",
    "scale", "shear", "perspective", "flipud", "fliplr", "mosaic", "mixup", "copy_paste",
}  # fmt: skip
# Values that differ between YOLOv5's published hyp files (everything else is shared), from ultralytics/yolov5.
YOLOV5_HYP_VALUES = {
    "hyp.scratch-low.yaml": {"lrf": 0.01, "cls": 0.5, "obj": 1.0, "scale": 0.5, "mixup": 0.0, "copy_paste": 0.0},
    "hyp.scratch-med.yaml": {"lrf": 0.1, "cls": 0.3, "obj": 0.7, "scale": 0.9, "mixup": 0.1, "copy_paste": 0.0},
    "hyp.scratch-high.yaml": {"lrf": 0.1, "cls": 0.3, "obj": 0.7, "scale": 0.9, "mixup": 0.1, "copy_paste": 0.1},
    "hyp.no-augmentation.yaml": {"lrf": 0.1, "cls": 0.3, "obj": 0.7, "scale": 0.0, "mosaic": 0.0, "fliplr": 0.0,
                                 "hsv_s": 0.0, "translate": 0.0},
}  # fmt: skip
YOLOV5_SHARED_VALUES = {"lr0": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0,
                        "warmup_momentum": 0.8, "warmup_bias_lr": 0.1, "box": 0.05, "iou_t": 0.2, "anchor_t": 4.0,
                        "fl_gamma": 0.0}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Unknown keys and suggestions


def test_typo_in_hyp_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"my\.yaml: unknown key 'hyp\.mosaik'; did you mean 'hyp\.mosaic'\?"):
        build_config(TrainConfig, ("my.yaml", {"hyp": {"mosaik": 0.5}}))


def test_typo_in_dotted_key_and_top_level_key() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'hyp\.fliplr'"):
        build_config(TrainConfig, ("command line", {"hyp.flipl": 0.1}))
    with pytest.raises(ConfigError, match=r"unknown key 'epoch'; did you mean 'epochs'"):
        build_config(TrainConfig, ("command line", {"epoch": 3}))


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(ValConfig, ("val.yaml", {"zzzzzz": 1}))
    message = str(info.value)
    assert "did you mean" not in message
    assert "valid keys:" in message and "conf_thres" in message
    assert "\n" not in message


def test_dashes_in_keys_are_flag_spellings() -> None:
    config = build_config(TrainConfig, ("command line", {"batch-size": 8, "cos-lr": "true"}))
    assert config.batch_size == 8 and config.cos_lr is True


# --------------------------------------------------------------------------------------------------------------------
# Types


@pytest.mark.parametrize(
    ("text", "expected"), [("false", False), ("False", False), ("0", False), ("true", True), ("1", True), (True, True)]
)
def test_bool_accepts_only_true_false_one_zero(text: object, expected: bool) -> None:
    assert build_config(TrainConfig, ("x", {"rect": text})).rect is expected


@pytest.mark.parametrize("text", ["Flase", "2", "", "maybe", 1.5])
def test_bool_refuses_anything_else(text: object) -> None:
    with pytest.raises(ConfigError, match=r"key 'rect' expects true/false/1/0"):
        build_config(TrainConfig, ("x", {"rect": text}))


def test_numbers_are_coerced_from_strings_and_checked() -> None:
    config = build_config(TrainConfig, ("x", {"hyp": {"lr0": "1e-3"}, "batch_size": "32", "patience": 7.0}))
    assert config.hyp.lr0 == pytest.approx(1e-3) and config.batch_size == 32 and config.patience == 7
    with pytest.raises(ConfigError, match=r"key 'batch_size' expects an integer, got '3.5'"):
        build_config(TrainConfig, ("x", {"batch_size": "3.5"}))
    with pytest.raises(ConfigError, match=r"key 'batch_size' expects an integer, got True"):
        build_config(TrainConfig, ("x", {"batch_size": True}))
    with pytest.raises(ConfigError, match=r"key 'hyp\.lr0' expects a number, got 'fast'"):
        build_config(TrainConfig, ("x", {"hyp.lr0": "fast"}))


def test_literal_fields_list_their_options() -> None:
    assert build_config(TrainConfig, ("x", {"optimizer": "AdamW"})).optimizer == "AdamW"
    with pytest.raises(ConfigError, match=r"key 'optimizer' must be one of \['SGD', 'Adam', 'AdamW'\], got 'sgdd'"):
        build_config(TrainConfig, ("x", {"optimizer": "sgdd"}))


def test_optional_fields_take_none_and_values() -> None:
    assert build_config(DetectConfig, ("x", {"classes": "none"})).classes is None
    assert build_config(DetectConfig, ("x", {"classes": "1 2"})).classes == (1, 2)
    assert build_config(TrainConfig, ("x", {"epochs": "12"})).epochs == 12
    with pytest.raises(ConfigError, match=r"key 'epochs' expects an integer"):
        build_config(TrainConfig, ("x", {"epochs": None}))  # a real default, not a None filled in elsewhere
    with pytest.raises(ConfigError, match=r"key 'epochs' expects an integer"):
        build_config(TrainConfig, ("x", {"epochs": "many"}))
    with pytest.raises(ConfigError, match=r"key 'data' expects a string"):
        build_config(TrainConfig, ("x", {"data": None}))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(640, (640,)), ("640", (640,)), ("640,480", (640, 480)), ("640 480", (640, 480)), ([320, "256"], (320, 256))],
)
def test_tuple_fields_coerce_scalars_strings_and_lists(value: object, expected: tuple[int, ...]) -> None:
    assert build_config(DetectConfig, ("x", {"imgsz": value})).imgsz == expected


def test_tuple_items_are_type_checked_and_optional_tuples_accept_lists() -> None:
    assert build_config(DetectConfig, ("x", {"classes": [0, 2]})).classes == (0, 2)
    assert build_config(ExportConfig, ("x", {"include": "onnx, openvino"})).include == ("onnx", "openvino")
    with pytest.raises(ConfigError, match=r"key 'freeze' expects an integer, got 'a'"):
        build_config(TrainConfig, ("x", {"freeze": "a b"}))


def test_nested_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"key 'hyp' expects a mapping"):
        build_config(TrainConfig, ("x", {"hyp": "hyp.scratch-low.yaml"}))


def test_later_layers_override_earlier_ones_and_configs_are_frozen() -> None:
    config = build_config(TrainConfig, ("a.yaml", {"epochs": 5, "hyp": {"lr0": 0.02}}), ("flags", {"epochs": 7}))
    assert (config.epochs, config.hyp.lr0, config.hyp.lrf) == (7, 0.02, Hyperparameters().lrf)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 1  # type: ignore[misc]


def test_error_names_the_source_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nbatch_size: big\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'batch_size' expects an integer, got 'big'$"):
        build_config(TrainConfig, (str(path), load_yaml(path)))


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("epochs: 3\nhyp:\n  lr0: 0.01\n  lrf: 0.1\n  lr0: 0.02\n")
    message = rf"^{path}: line 5 invalid YAML: key 'lr0' appears twice \(first on line 3\)$"
    with pytest.raises(ConfigError, match=message):
        load_yaml(path)
    path.write_text("base: &base {lr0: 0.01, lrf: 0.1}\nhyp:\n  <<: *base\n  lr0: 0.02\n")  # a merge may be overridden
    assert load_yaml(path)["hyp"] == {"lr0": 0.02, "lrf": 0.1}


def test_every_shipped_yaml_loads_without_a_repeated_key() -> None:
    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        load_yaml(path)  # PyYAML alone would keep the last of two equal keys silently


def test_load_yaml_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ invalid YAML") as info:
        load_yaml(bad)
    assert "\n" not in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"expected a mapping"):
        load_yaml(listing)
    with pytest.raises(ConfigError, match=r"file not found"):
        load_yaml(tmp_path / "absent.yaml")


# --------------------------------------------------------------------------------------------------------------------
# Hyperparameter files


HYP_FILES = sorted(p.name for p in HYP_CONFIG_DIR.glob("hyp.*.yaml"))


def test_the_four_yolov5_hyp_files_are_present() -> None:
    assert sorted(YOLOV5_HYP_VALUES) == HYP_FILES


@pytest.mark.parametrize("name", HYP_FILES)
def test_hyp_file_has_yolov5_keys_and_values(name: str) -> None:
    raw = load_yaml(HYP_CONFIG_DIR / name)
    assert set(raw) == YOLOV5_HYP_KEYS, set(raw) ^ YOLOV5_HYP_KEYS
    hyp = load_hyp(name)  # a bare name resolves in configs/hyps
    for key, value in {**YOLOV5_SHARED_VALUES, **YOLOV5_HYP_VALUES[name]}.items():
        assert getattr(hyp, key) == pytest.approx(value), key
    # Keys absent from YOLOv5's files keep our defaults.
    assert hyp.mosaic9 == 0.0 and hyp.anchors == 0.0


def test_a_folder_path_is_refused_not_taken_for_the_shipped_yaml_of_its_name(tmp_path: Path, monkeypatch) -> None:
    """--data ~/datasets/coco128 (a folder) used to resolve to data/coco128.yaml by its name; a bare name still
    means the shipped file even when the working directory holds a folder of that name."""
    folder = tmp_path / "coco128"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"coco128: a folder, not a YAML file \(a path to one, or a name in "):
        resolve_config_path(folder, DATA_CONFIG_DIR)
    with pytest.raises(ConfigError, match="a folder, not a YAML file"):
        resolve_config_path(tmp_path, DATA_CONFIG_DIR)  # no shipped YAML of that name either
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("coco128", DATA_CONFIG_DIR) == DATA_CONFIG_DIR / "coco128.yaml"
    with pytest.raises(ConfigError, match="a folder, not a YAML file"):
        resolve_config_path("./coco128/", DATA_CONFIG_DIR)


def test_a_binary_file_is_one_line_error_not_a_decode_traceback(tmp_path: Path) -> None:
    image = tmp_path / "bus.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    with pytest.raises(ConfigError, match=r"bus.jpg: not a YAML file \(not UTF-8 text: byte 0 is 0xff\)"):
        load_yaml(image)


def test_load_hyp_accepts_a_path_and_rejects_typos(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("lr0: 0.02\nmosiac: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown key 'mosiac'; did you mean 'mosaic'"):
        load_hyp(path)
    with pytest.raises(ConfigError, match=r"file not found .*did you mean 'hyp\.scratch-low\.yaml'"):
        load_hyp("hyp.scratch-lo.yaml")


# --------------------------------------------------------------------------------------------------------------------
# configs/default.yaml and saved configs


def test_default_yaml_equals_train_config_defaults() -> None:
    with open(CONFIG_DIR / "default.yaml", encoding="utf-8") as f:
        written = yaml.safe_load(f)
    assert written == config_to_dict(TrainConfig())
    assert build_config(TrainConfig, ("default.yaml", written)) == TrainConfig()


def test_default_yaml_comments_every_key() -> None:
    lines = (CONFIG_DIR / "default.yaml").read_text().splitlines()
    keyed = [line for line in lines if line and not line.lstrip().startswith("#")]
    assert keyed and all("  # " in line for line in keyed), [line for line in keyed if "  # " not in line]


def test_saved_config_round_trips(tmp_path: Path) -> None:
    config = build_config(TrainConfig, ("x", {"epochs": 3, "freeze": [1, 2], "hyp": {"mixup": 0.2}}))
    save_config(config, tmp_path / "config.yaml")
    assert build_config(TrainConfig, ("saved", load_yaml(tmp_path / "config.yaml"))) == config


def test_readme_starts_with_the_two_fresh_machine_commands() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```")[1]
    assert first_block.splitlines()[1:] == [
        'pip install -e ".[dev]" && python train.py',
        'pip install -e ".[dev]" && pytest -q -n 2',
    ]


def test_class_balanced_is_a_fraction_and_one_sampling_scheme():
    from detector.config import check_train_config

    check_train_config(TrainConfig(class_balanced=0.1))
    with pytest.raises(ConfigError, match=r"--class-balanced: a fraction of the images in \[0, 1\], got 2.0"):
        check_train_config(TrainConfig(class_balanced=2.0))
    with pytest.raises(ConfigError, match="cannot be combined with --image-weights"):
        check_train_config(TrainConfig(class_balanced=0.1, image_weights=True))
    with pytest.raises(ConfigError, match="cannot be combined with --rect"):
        check_train_config(TrainConfig(class_balanced=0.1, rect=True))


def test_image_weights_with_rect_is_refused_before_the_run() -> None:
    """Rectangular batches are consecutive images of one shape group; image weights draw images at random, so a
    batch mixed shapes and the first collation failed with NumPy's 'all input arrays must have the same shape'."""
    check_train_config(TrainConfig(image_weights=True))
    check_train_config(TrainConfig(rect=True))
    with pytest.raises(ConfigError, match=r"--image-weights draws images at random; it cannot be combined with --rect"):
        check_train_config(TrainConfig(image_weights=True, rect=True))


def test_label_smoothing_flag_and_old_top_level_key_are_aliases_of_the_hyp_key(tmp_path: Path) -> None:
    """--label-smoothing (YOLOv5's flag, and the top-level key of earlier configs and checkpoints) sets
    hyp.label_smoothing, which is what the loss reads; a flag > 0 wins over a --hyp file, as flags do."""
    assert resolve_train_config({"data": "my.yaml", "label_smoothing": 0.1}).hyp.label_smoothing == 0.1
    preset = tmp_path / "hyp.smooth.yaml"
    preset.write_text("label_smoothing: 0.1\nmixup: 0.0\n")
    from_file = resolve_train_config({"data": "my.yaml", "hyp": str(preset)})
    assert (from_file.hyp.label_smoothing, from_file.label_smoothing) == (0.1, 0.0)
    flag = resolve_train_config({"data": "my.yaml", "hyp": str(preset), "label_smoothing": 0.05})
    assert (flag.hyp.label_smoothing, flag.label_smoothing) == (0.05, 0.0)
    assert apply_aliases(flag) == flag  # idempotent
    with pytest.raises(ConfigError, match=r"--label-smoothing \(hyp label_smoothing\): expected a value in \[0, 1\)"):
        check_train_config(build_config(TrainConfig, ("x.yaml", {"hyp": {"label_smoothing": 1.0}})))


@pytest.mark.parametrize("seed", [-1, 2**31, 2**40])
def test_seed_outside_numpys_range_is_refused_before_the_run(seed: int) -> None:
    """NumPy only takes seeds in [0, 2**32): --seed -1 used to fail with a traceback at the first epoch, after the
    run folder was made. The largest accepted seed still seeds every rank (seed + 1 + rank)."""
    with pytest.raises(ConfigError, match=r"--seed: expected 0 to 2147483647"):
        check_train_config(TrainConfig(seed=seed))
    check_train_config(TrainConfig(seed=2**31 - 1))
    import numpy as np

    np.random.seed(2**31 - 1 + 1 + 7)  # rank 7's seed: inside NumPy's range


def test_ndjson_flags_are_aliases_of_logger_entries() -> None:
    """--ndjson-console / --ndjson-file (YOLOv5's flags) add the 'ndjson-console' / 'ndjson' trackers to --logger,
    once, after the ones given."""
    both = resolve_train_config({"data": "my.yaml", "ndjson_console": True, "ndjson_file": True})
    assert both.logger == ("tensorboard", "ndjson-console", "ndjson")
    assert (both.ndjson_console, both.ndjson_file) == (False, False) and apply_aliases(both) == both
    given = resolve_train_config({"data": "my.yaml", "logger": "ndjson", "ndjson_file": True})
    assert given.logger == ("ndjson",)
