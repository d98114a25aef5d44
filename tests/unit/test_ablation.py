"""The ablation harness without training: the trick registry against the config builder, variant selection and
combinations, the summary maths and verdicts, ablation.md, ablation.csv and resuming, the throughput hook."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import types

import pytest
import yaml

from detector import ablation
from detector.ablation import (
    BASELINE,
    TRICKS,
    AblationTable,
    Estimate,
    RunResult,
    ThroughputMeter,
    Trick,
    Variant,
    derived_model_yaml,
    format_overrides,
    markdown_report,
    parse_extra,
    prepare,
    seeds_to_resolve,
    select_variants,
    summarize,
    variant_config,
    verdict,
)
from detector.config import TrainConfig, check_train_config
from detector.errors import ConfigError

HAS_POLICIES = importlib.util.find_spec("detector.data.policies") is not None


@pytest.fixture
def no_data_check(monkeypatch):
    """prepare() loads the dataset once before it writes anything; these tests need no dataset."""
    import detector.data.dataset_config

    monkeypatch.setattr(detector.data.dataset_config, "load_dataset_config", lambda data: None)


# -- the registry ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TRICKS))
def test_every_trick_builds_a_valid_config_that_differs_from_the_baseline(name):
    base = TrainConfig(epochs=30, batch_size=16)
    trick = TRICKS[name]
    assert trick.description and "\n" not in trick.description and trick.switch
    overrides = trick.resolve(base)
    assert overrides, name
    model = derived_model_yaml(base, name, overrides)  # model.* keys: a known key, a valid activation
    config = variant_config(base, name, overrides, model_yaml=None)  # the project's builder: unknown keys raise
    if config.auto_augment and not HAS_POLICIES:
        pytest.skip("detector.data.policies (the --auto-augment policies) is not in this checkout yet")
    check_train_config(config)
    assert config != base or model is not None, f"{name} changes nothing"


def test_a_renamed_key_fails_with_a_suggestion():
    broken = Trick("broken", "a typo", "hyp mixpu: 0.1", {"hyp.mixpu": 0.1})
    with pytest.raises(ConfigError, match=r"unknown key 'hyp.mixpu'; did you mean 'hyp.mixup'\?"):
        variant_config(TrainConfig(), "broken", broken.resolve(TrainConfig()), None)
    with pytest.raises(ConfigError, match=r"unknown model key 'model.activaton'; did you mean 'model.activation'"):
        derived_model_yaml(TrainConfig(), "broken", {"model.activaton": "nn.ReLU()"})
    with pytest.raises(ConfigError, match=r"activation 'nn.Relu\(\)' is not one of"):
        derived_model_yaml(TrainConfig(), "broken", {"model.activation": "nn.Relu()"})


def test_relative_tricks_follow_the_baseline():
    base = TrainConfig(epochs=40, hyp=dataclasses.replace(TrainConfig().hyp, weight_decay=0.001))
    assert TRICKS["weight-decay"].resolve(base) == {"hyp.weight_decay": 0.002}
    assert TRICKS["close-mosaic"].resolve(base) == {"close_mosaic": 4}  # 10% of the epochs
    assert TRICKS["close-mosaic"].resolve(dataclasses.replace(base, epochs=3)) == {"close_mosaic": 1}  # at least 1
    assert TRICKS["fixres"].resolve(dataclasses.replace(base, imgsz=256)) == {"imgsz": 224, "val_imgsz": 256}
    assert TRICKS["fixres"].resolve(base) == {"imgsz": 576, "val_imgsz": 640}  # 7/8 of 640 is 560: 17.5 strides
    assert TRICKS["fixres"].resolve(dataclasses.replace(base, val_imgsz=512)) == {"imgsz": 576, "val_imgsz": 512}


def test_the_activation_trick_derives_the_model_yaml_from_cfg(tmp_path):
    model = derived_model_yaml(
        TrainConfig(cfg="yolov5s.yaml"), "activation", TRICKS["activation"].resolve(TrainConfig())
    )
    assert model["activation"] == "nn.LeakyReLU(0.1)"
    assert model["width_multiple"] == 0.5  # the rest is yolov5s's
    assert derived_model_yaml(TrainConfig(), "activation", {"model.activation": "nn.ReLU()"})["width_multiple"] == 0.25
    assert derived_model_yaml(TrainConfig(), "mixup", {"hyp.mixup": 0.1}) is None


# -- variants, combinations, --extra ---------------------------------------------------------------------------------


def test_default_selection_is_the_baseline_and_every_trick():
    variants = select_variants()
    assert [v.name for v in variants] == [BASELINE, *TRICKS]
    assert variants[0].tricks == ()


def test_combinations_with_plus():
    variants = select_variants(["mixup+cutmix", "label-smoothing", "baseline", "mixup+cutmix"])
    assert [v.name for v in variants] == [BASELINE, "mixup+cutmix", "label-smoothing"]  # baseline once, no duplicates
    combined = variants[1]
    assert [t.name for t in combined.tricks] == ["mixup", "cutmix"]
    assert combined.overrides(TrainConfig()) == {"hyp.mixup": 0.1, "hyp.cutmix": 0.5}


def test_combining_tricks_that_set_one_key_differently_is_refused():
    variants = select_variants(["trivial+randaugment"])
    with pytest.raises(ConfigError, match="trivial sets auto_augment=trivial and randaugment sets auto_augment="):
        variants[1].overrides(TrainConfig())
    with pytest.raises(ConfigError, match="appears twice"):
        select_variants(["mixup+mixup"])


def test_unknown_trick_is_one_line_with_a_close_match():
    with pytest.raises(ConfigError) as error:
        select_variants(["mixpu"])
    message = str(error.value)
    assert "unknown trick 'mixpu'; did you mean 'mixup'?" in message and "\n" not in message
    with pytest.raises(ConfigError, match="unknown trick 'cutmx'; did you mean 'cutmix'"):
        select_variants(["mixup+cutmx"])


def test_extra_variants():
    variants = select_variants(
        None, [["lr2x", "hyp.lr0=0.02", "label-smoothing=0.05"], ["relu", "model.activation=nn.ReLU()"]]
    )
    assert [v.name for v in variants] == [BASELINE, "lr2x", "relu"]  # with extras only, the default is just them
    assert variants[1].overrides(TrainConfig()) == {"hyp.lr0": "0.02", "label_smoothing": "0.05"}
    config = variant_config(TrainConfig(), "lr2x", variants[1].overrides(TrainConfig()), None)
    assert (config.hyp.lr0, config.label_smoothing) == (0.02, 0.05)  # coerced by the field types
    assert variants[2].overrides(TrainConfig()) == {"model.activation": "nn.ReLU()"}
    both = select_variants(["mixup", "mixup+lr2x"], [["lr2x", "hyp.lr0=0.02"]])
    assert [v.name for v in both] == [BASELINE, "mixup", "mixup+lr2x", "lr2x"]


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["lonely"], "expected a NAME and at least one KEY=VALUE"),
        (["mixup", "hyp.mixup=0.3"], "taken by a trick"),
        (["baseline", "hyp.mixup=0.3"], "taken by the baseline"),
        (["a/b", "hyp.mixup=0.3"], "a name of letters"),
        (["x", "hyp.mixup"], "expected KEY=VALUE"),
    ],
)
def test_bad_extras(items, match):
    with pytest.raises(ConfigError, match=match):
        parse_extra(items)


def test_format_overrides():
    assert format_overrides({"hyp.mixup": 0.1, "image_weights": True, "lr_schedule": "cosine"}) == (
        "hyp.mixup=0.1 image_weights=true lr_schedule=cosine"
    )
    assert format_overrides({}) == ""


# -- the summary ------------------------------------------------------------------------------------------------------


def row(trick: str, seed: int, map50_95: float, status: str = "ok", error: str = "") -> dict[str, str]:
    return {
        "trick": trick,
        "seed": str(seed),
        "overrides": "" if trick == BASELINE else f"x.{trick}=1",
        "mAP50": str(map50_95 + 0.2),
        "mAP50-95": str(map50_95),
        "fitness": "0",
        "train_seconds": "10" if seed == 0 else "8",
        "images_per_second": "40" if seed == 0 else "60",
        "epochs": "3",
        "seconds": "30",
        "status": status,
        "error": error,
    }


HAND_ROWS = [
    row(BASELINE, 0, 0.30),
    row(BASELINE, 1, 0.32),  # mean 0.31, spread 0.01
    row("better", 0, 0.35),
    row("better", 1, 0.33),  # mean 0.34, spread 0.01: +0.03 > 0.01 + 0.01
    row("same", 0, 0.315),
    row("same", 1, 0.325),  # mean 0.32, spread 0.005: +0.01 <= 0.005 + 0.01
    row("worse", 0, 0.25),
    row("worse", 1, 0.27),  # mean 0.26, spread 0.01: -0.05
    row("halfway", 0, 0.40),
    row("halfway", 1, 0.0, status="failed", error="RuntimeError: out of memory"),
    row("broken", 0, 0.0, status="failed", error="ValueError: nope"),
]


def test_summary_against_hand_computed_values():
    summaries = {s.name: s for s in summarize(HAND_ROWS)}
    assert list(summaries) == [BASELINE, "better", "same", "worse", "halfway", "broken"]
    base = summaries[BASELINE]
    assert (base.map.mean, base.map.spread, base.map.count) == pytest.approx((0.31, 0.01, 2))
    assert (base.map50.mean, base.map50.spread) == pytest.approx((0.51, 0.01))
    assert (base.verdict, base.delta_map) == ("baseline", None)
    assert (base.train_seconds, base.images_per_second) == (8.0, 60.0)  # the fastest run's

    better = summaries["better"]
    assert (better.map.mean, better.map.spread) == pytest.approx((0.34, 0.01))
    assert better.delta_map == pytest.approx(0.03) and better.delta_map50 == pytest.approx(0.03)
    assert better.verdict == "better"
    same = summaries["same"]
    assert (same.map.mean, same.map.spread, same.delta_map) == pytest.approx((0.32, 0.005, 0.01))
    assert same.verdict == "no effect"
    assert summaries["worse"].delta_map == pytest.approx(-0.05) and summaries["worse"].verdict == "worse"
    halfway = summaries["halfway"]
    assert (halfway.finished, halfway.failed, halfway.verdict) == (1, 1, "too few runs")
    assert halfway.map.mean == 0.40 and halfway.train_seconds == 10.0  # failed runs count nowhere
    broken = summaries["broken"]
    assert (broken.map, broken.verdict, broken.train_seconds) == (None, "failed", None)
    # paired by seed: each variant's run against the baseline's run of the same seed (0.30 and 0.32)
    assert [summaries[name].seeds_above for name in summaries] == [None, (2, 2), (2, 2), (0, 2), (1, 1), None]
    # paired differences: better +0.05, +0.01 (mean 0.03, sd 0.02828): (2.8 x 0.02828 / 0.03)^2 = 6.97 -> 7 seeds;
    # same +0.015, +0.005 (mean 0.01, sd 0.00707): 3.92 -> 4; worse -0.05, -0.05 (sd 0): the minimum, 2
    assert [summaries[name].seeds_for_delta for name in summaries] == [None, 7, 4, 2, None, None]


def test_seeds_to_resolve():
    # dropout on the built-in set at lr0 0.01, differences rounded to 3 decimals (unrounded: 1,459 in the README):
    # mean 0.0042, sd 0.061556 -> (2.8 x 0.061556 / 0.0042)^2 = 1684.1
    assert seeds_to_resolve([0.048, 0.075, -0.016, -0.084, -0.002]) == 1685
    assert seeds_to_resolve([0.02, -0.02]) == math.inf  # mean 0: no number of seeds resolves it
    assert seeds_to_resolve([0.02]) is None and seeds_to_resolve([]) is None


def test_verdict_edges():
    base = Estimate(0.30, 0.01, 2)
    assert verdict(Estimate(0.32, 0.01, 2), base) == "no effect"  # exactly the combined spread
    assert verdict(Estimate(0.3201, 0.01, 2), base) == "better"
    assert verdict(Estimate(0.2799, 0.01, 2), base) == "worse"
    assert verdict(Estimate(0.5, 0.0, 1), base) == "too few runs"
    assert verdict(Estimate(0.5, 0.0, 2), None) == "too few runs"
    assert verdict(None, base) == "failed"
    assert Estimate.of([0.1, 0.4, 0.2]) == Estimate(pytest.approx(0.7 / 3), pytest.approx(0.15), 3)
    assert Estimate.of([]) is None


def test_markdown_table():
    text = markdown_report(
        summarize(HAND_ROWS),
        HAND_ROWS,
        title="runs/ablate/exp",
        budget="3 epochs, imgsz 320, batch 16",
        seeds=2,
        commands=["python scripts/ablate.py --tricks better same --epochs 3"],
    )
    assert "spread = half the min-max range" in text and "3 epochs, imgsz 320, batch 16" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| trick"))
    assert header == (
        "| trick | overrides | runs | mAP50 | Δ mAP50 | mAP50-95 | Δ mAP50-95 | verdict | seeds above | seeds for Δ "
        "| train s | img/s |"
    )
    table = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "---" not in line}
    assert table[BASELINE] == (
        "| baseline |  | 2/2 | 0.5100 ± 0.0100 |  | 0.3100 ± 0.0100 |  | baseline |  |  | 8.0 | 60.0 |"
    )
    assert table["better"] == (
        "| better | `x.better=1` | 2/2 | 0.5400 ± 0.0100 | +0.0300 | 0.3400 ± 0.0100 | +0.0300 | better | 2/2 | 7 "
        "| 8.0 | 60.0 |"
    )
    assert "| no effect | 2/2 | 4 |" in table["same"] and "| -0.0500 | worse | 0/2 | 2 |" in table["worse"]
    assert "| 1/2 |" in table["halfway"] and "| too few runs | 1/1 |" in table["halfway"]
    assert table["broken"] == "| broken | `x.broken=1` | 0/1 |  |  |  |  | failed |  |  |  |  |"
    assert "- halfway seed 1: RuntimeError: out of memory" in text
    assert "python scripts/ablate.py --tricks better same --epochs 3" in text


def test_figure_draws_a_bar_per_variant():
    figure = ablation.ablation_figure(summarize(HAND_ROWS), title="t")
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == [
        BASELINE,
        "better",
        "same",
        "worse",
        "halfway",
        "broken",
    ]
    widths = [patch.get_width() for patch in axes.patches if patch.get_height() == pytest.approx(0.65)]
    assert widths == pytest.approx([0.31, 0.34, 0.32, 0.26, 0.40, 0.0])
    assert any(line.get_linestyle() == "--" and line.get_xdata()[0] == pytest.approx(0.31) for line in axes.lines)


# -- ablation.csv and resuming -------------------------------------------------------------------------------------


def test_table_rows_are_replaced_and_written_atomically(tmp_path):
    table = AblationTable(tmp_path / "ablation.csv")
    spec = types.SimpleNamespace(variant="mixup", seed=1, overrides="hyp.mixup=0.1")
    table.add(spec, RunResult(status="failed", error="RuntimeError: out of\nmemory"))
    table.add(types.SimpleNamespace(variant=BASELINE, seed=0, overrides=""), RunResult(map50=0.5, map=0.3))
    table.add(spec, RunResult(map50=0.6, map=0.4, train_seconds=2.0, images_per_second=8.0, epochs=3))
    with open(tmp_path / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["trick"], r["seed"], r["status"]) for r in rows] == [(BASELINE, "0", "ok"), ("mixup", "1", "ok")]
    assert (rows[1]["mAP50"], rows[1]["mAP50-95"], rows[1]["images_per_second"]) == ("0.6", "0.4", "8.00")
    assert not list(tmp_path.glob(".*.tmp"))
    assert AblationTable(tmp_path / "ablation.csv").finished("mixup", 1)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match=r"not an ablation\.csv"):
        AblationTable(tmp_path / "other.csv")


def test_resume_skips_finished_runs(tmp_path, no_data_check):
    options = {"project": str(tmp_path), "name": "exp", "epochs": 3, "imgsz": 64}
    first = prepare(["mixup"], [], 2, "", options, "first command")
    assert first.save_dir == tmp_path / "exp" and (first.save_dir / "ablation.yaml").is_file()
    assert [(s.variant, s.seed) for s in first.pending()] == [(BASELINE, 0), ("mixup", 0), (BASELINE, 1), ("mixup", 1)]
    spec = first.specs[0]
    assert (spec.config.seed, spec.config.project, spec.config.name) == (0, str(tmp_path / "exp" / BASELINE), "seed0")
    assert spec.config.nosave and spec.config.noplots and spec.config.noval
    assert first.specs[3].config.hyp.mixup == 0.1 and first.specs[3].config.seed == 1

    # a killed ablation: two runs finished, one failed
    header = ",".join(ablation.CSV_COLUMNS)
    lines = [
        "baseline,0,,0.5,0.3,0.32,1,8,3,4,ok,",
        "mixup,0,hyp.mixup=0.1,0.5,0.3,0.32,1,8,3,4,ok,",
        "baseline,1,,0,0,0,0,0,0,1,failed,RuntimeError: boom",
    ]
    (first.save_dir / "ablation.csv").write_text("\n".join([header, *lines]) + "\n")

    again = prepare(["mixup"], [], 2, "", {**options, "exist_ok": True}, "second command")  # the same command
    assert again.save_dir == first.save_dir
    assert [(s.variant, s.seed) for s in again.pending()] == [(BASELINE, 1), ("mixup", 1)]  # failed runs again
    resumed = prepare(None, [], None, str(first.save_dir), {}, "third command")  # --resume DIR, nothing else
    assert [(s.variant, s.seed) for s in resumed.pending()] == [(BASELINE, 1), ("mixup", 1)]
    assert resumed.commands == ["first command", "second command", "third command"]
    assert resumed.base == first.base
    more = prepare(["mixup", "cosine"], [], 3, str(first.save_dir), {"workers": 0}, "more")  # tricks, seeds added
    assert len(more.pending()) == 9 - 2 and more.base.workers == 0
    assert yaml.safe_load((first.save_dir / "ablation.yaml").read_text())["seeds"] == 3


def test_continuing_with_other_options_is_refused(tmp_path, no_data_check):
    options = {"project": str(tmp_path), "name": "exp", "epochs": 3}
    first = prepare(["mixup"], [], 2, "", options, "first")
    (first.save_dir / "ablation.csv").write_text(
        ",".join(ablation.CSV_COLUMNS) + "\nlr2x,0,hyp.lr0=0.02,0.5,0.3,0.32,1,8,3,4,ok,\n"
    )
    with pytest.raises(ConfigError, match=r"ran with other training options \(--epochs\)"):
        prepare(["mixup"], [], 2, "", {**options, "epochs": 4, "exist_ok": True}, "second")
    with pytest.raises(ConfigError, match=r"lr2x ran with 'hyp\.lr0=0\.02', now it would be 'hyp\.lr0=0\.03'"):
        prepare(None, [["lr2x", "hyp.lr0=0.03"]], 2, str(first.save_dir), {}, "x")
    with pytest.raises(ConfigError, match=r"no ablation\.yaml there"):
        prepare(None, [], None, str(tmp_path / "nothing"), {}, "x")


def test_refused_options_write_nothing(tmp_path, no_data_check):
    options = {"project": str(tmp_path / "runs")}
    for flags, match in [
        ({"seed": 3}, "--seed: not an ablation option"),
        ({"evolve": 4}, "--evolve: not an ablation option"),
        ({"resume": "auto"}, "--resume: not an ablation option"),
        ({"device": "0,1"}, "one device"),
        ({"hyp.mosaic": 2.0}, "hyp.mosaic"),
    ]:
        with pytest.raises(ConfigError, match=match):
            prepare(["mixup"], [], 2, "", {**options, **flags}, "x")
    with pytest.raises(ConfigError, match="unknown trick"):
        prepare(["mixpu"], [], 2, "", options, "x")
    with pytest.raises(ConfigError, match="--seeds: expected 1 or more"):
        prepare(["mixup"], [], 0, "", options, "x")
    with pytest.raises(ConfigError, match=r"trick class-balanced\+image-weights: --class-balanced .* --image-weights"):
        prepare(["class-balanced+image-weights"], [], 2, "", options, "x")
    assert not (tmp_path / "runs").exists()


def test_plateau_and_image_weights_runs_validate_every_epoch(tmp_path, no_data_check):
    run = prepare(["image-weights", "mixup"], [], 1, "", {"project": str(tmp_path), "lr_schedule": "plateau"}, "x")
    assert [s.config.noval for s in run.specs] == [False, False, False]
    run = prepare(["image-weights", "cosine"], [], 1, "", {"project": str(tmp_path)}, "x")
    assert [(s.variant, s.config.noval) for s in run.specs] == [
        (BASELINE, True),
        ("image-weights", False),
        ("cosine", True),
    ]


def test_model_tricks_write_a_derived_yaml(tmp_path, no_data_check):
    run = prepare(["activation"], [["relu", "model.activation=nn.ReLU()"]], 1, "", {"project": str(tmp_path)}, "x")
    paths = {s.variant: s.config.cfg for s in run.specs}
    assert paths[BASELINE] == "" and paths["activation"] == str(tmp_path / "exp" / "models" / "activation.yaml")
    written = yaml.safe_load((tmp_path / "exp" / "models" / "relu.yaml").read_text())
    assert written["activation"] == "nn.ReLU()" and written["width_multiple"] == 0.25  # yolov5n, the default model


# -- the throughput hook ------------------------------------------------------------------------------------------


def test_throughput_meter_counts_images_and_training_time_only(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0, 11.0, 12.0])  # epoch 0: start 0, steps at 1 and 3; epoch 1: start 10, step 11
    monkeypatch.setattr(ablation.time, "perf_counter", lambda: next(clock))
    batch = types.SimpleNamespace(shape=(4, 3, 64, 64))
    trainer = types.SimpleNamespace(last_batch=(batch, None, None), context=types.SimpleNamespace(world_size=1))
    meter = ThroughputMeter()
    meter.on_epoch_start(trainer)
    meter.on_step_end(trainer)
    meter.on_step_end(trainer)
    meter.on_epoch_end(trainer)  # validation would run here: not counted
    meter.on_epoch_start(trainer)
    meter.on_step_end(trainer)
    meter.on_epoch_end(trainer)
    assert (meter.images, meter.seconds) == (12, 4.0)
    assert meter.images_per_second == 3.0


def test_variant_dataclass_baseline_has_no_overrides():
    assert Variant(BASELINE).overrides(TrainConfig()) == {}


# -- the loop: a failed run is a row, the ablation goes on -------------------------------------------------------


def test_a_failed_run_is_recorded_and_the_ablation_goes_on(tmp_path, no_data_check, monkeypatch):
    trained = []

    def fake_run(config: TrainConfig, keep_weights: bool = False) -> RunResult:
        trained.append((config.project, config.seed))
        if config.hyp.label_smoothing and config.seed == 1:
            return RunResult(status="failed", error="RuntimeError: out of memory")
        return RunResult(map50=0.5 + config.seed / 100, map=0.3 + config.seed / 100, train_seconds=1, epochs=1)

    monkeypatch.setattr(ablation, "train_run", fake_run)
    result = ablation.ablate(tricks=["label-smoothing"], seeds=2, project=str(tmp_path), epochs=1, command="cmd")
    assert len(trained) == 4
    rows = {(r["trick"], r["seed"]): r for r in read_csv(result.save_dir / "ablation.csv")}
    assert (rows[("label-smoothing", "1")]["status"], rows[("label-smoothing", "1")]["error"]) == (
        "failed",
        "RuntimeError: out of memory",
    )
    assert rows[(BASELINE, "1")]["mAP50-95"] == "0.31"
    summaries = {s.name: s for s in result.summaries}
    assert summaries[BASELINE].map == Estimate(pytest.approx(0.305), pytest.approx(0.005), 2)
    assert summaries["label-smoothing"].verdict == "too few runs"
    text = (result.save_dir / "ablation.md").read_text()
    assert "- label-smoothing seed 1: RuntimeError: out of memory" in text and "cmd" in text
    assert (result.save_dir / "ablation.png").is_file() and (result.save_dir / "log.txt").is_file()

    trained.clear()  # continuing tries the failed run again, and only it
    ablation.ablate(tricks=["label-smoothing"], seeds=2, project=str(tmp_path), epochs=1, exist_ok=True, command="c2")
    assert trained == [(str(result.save_dir / "label-smoothing"), 1)]


def test_train_run_turns_an_exception_into_a_failed_result(tmp_path):
    result = ablation.train_run(TrainConfig(data=str(tmp_path / "missing.yaml"), project=str(tmp_path)))
    assert result.status == "failed" and "missing.yaml" in result.error
    assert (result.map, result.epochs, result.images_per_second) == (0.0, 0, 0.0)


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
