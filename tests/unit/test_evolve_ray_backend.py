"""The Ray backend's parts that need no Ray instance: --trial-resources, each trial's resources and device, the
searchers' proposals (genetic readiness, random draws, Optuna's first points), and the rows of finished trials."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys

import numpy as np
import pytest

from detector.config import EvolveConfig, TrainConfig
from detector.errors import ConfigError
from detector.evolve import ray_backend
from detector.evolve.ray_backend import (
    FINISHED_KEY,
    INDEX_KEY,
    absolute_paths,
    complete_resources,
    completed_outcome,
    error_message,
    failed_outcome,
    parse_trial_resources,
    trial_device,
)
from detector.evolve.records import TrialOutcome
from detector.evolve.search import EvolveRun
from detector.evolve.space import SearchSpace


def make_run(tmp_path, **options) -> EvolveRun:
    return EvolveRun(tmp_path, TrainConfig(seed=3), EvolveConfig(backend="ray", **options), SearchSpace.load(), "test")


def finish(run: EvolveRun, config: dict, fitness: float) -> None:
    """Record a trial as the driver's callback would."""
    hyp = {key: config[key] for key in run.start}
    index = config[INDEX_KEY]
    run.record(TrialOutcome(index, run.strategy.generation(index), hyp, fitness=fitness, epochs=1))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", {}),
        ("cpu=2,gpu=1", {"cpu": 2.0, "gpu": 1.0}),
        (" CPU = 0.5 ", {"cpu": 0.5}),
        ("gpu=0.25,", {"gpu": 0.25}),
    ],
)
def test_trial_resources_parse(spec, expected):
    assert parse_trial_resources(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cpu2", "expected KEY=NUMBER items"),
        ("cpus=2", "did you mean 'cpu'"),
        ("tpu=1", "(keys: cpu, gpu)"),
        ("cpu=-1", "cpu needs a number >= 0, got '-1'"),
        ("gpu=one", "gpu needs a number >= 0, got 'one'"),
        ("cpu=nan", "cpu needs a number >= 0"),
        ("cpu=1,cpu=2", "cpu is given twice"),
        ("cpu=0", "at least part of a CPU"),
    ],
)
def test_bad_trial_resources_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match="--trial-resources") as error:
        parse_trial_resources(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_trial_resources_defaults_and_limits(caplog):
    cpu_only, with_gpus = {"CPU": 8.0}, {"CPU": 8.0, "GPU": 2.0}
    assert complete_resources({}, "", cpu_only, local=True) == {"cpu": 1.0, "gpu": 0.0}
    assert complete_resources({}, "", with_gpus, local=True) == {"cpu": 1.0, "gpu": 1.0}
    assert complete_resources({}, "cpu", with_gpus, local=True) == {"cpu": 1.0, "gpu": 0.0}
    assert complete_resources({"cpu": 4.0, "gpu": 0.0}, "0", with_gpus, local=True) == {"cpu": 4.0, "gpu": 0.0}
    with pytest.raises(ConfigError, match="asks for cpu=16, gpu=1 but Ray has cpu=8, gpu=0 in all"):
        complete_resources({"cpu": 16.0, "gpu": 1.0}, "", cpu_only, local=True)
    with caplog.at_level(logging.WARNING, logger="detector"):  # a cluster may grow: only a warning
        assert complete_resources({"cpu": 16.0}, "", cpu_only, local=False) == {"cpu": 16.0, "gpu": 0.0}
    assert "trials wait until the cluster grows" in caplog.text


@pytest.mark.parametrize(
    ("device", "gpus", "expected"),
    [("", 0, "cpu"), ("0", 0, "cpu"), ("cpu", 1, "cpu"), ("", 1, "0"), ("3", 1, "0"), ("0,1", 2, "0")],
)
def test_trial_device_is_the_first_gpu_ray_gave_the_trial(device, gpus, expected):
    assert trial_device(device, gpus) == expected


def test_absolute_paths_resolve_files_here_and_keep_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text("path: .\n")
    config = absolute_paths(TrainConfig(data="my.yaml", cfg="yolov5s.yaml", weights="", cache_dir="cache"))
    assert config.data == str(tmp_path / "my.yaml")
    assert config.cfg == "yolov5s.yaml"  # a name in detector's configs, not a file here
    assert config.weights == ""
    assert config.cache_dir == str(tmp_path / "cache")


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r'--evolve-backend ray needs Ray Tune .*pip install "detector\[tune\]"'):
        ray_backend.import_tune()


def test_asha_grace_period_longer_than_the_training_is_refused(tmp_path):
    run = make_run(tmp_path, scheduler="asha", grace_period=5)
    run.train_config = dataclasses.replace(run.train_config, epochs=3)
    with pytest.raises(ConfigError, match="--asha-grace-period 5 is more than --epochs 3"):
        ray_backend.build_scheduler(run)
    assert ray_backend.build_scheduler(make_run(tmp_path, scheduler="fifo")) is None


def test_completed_trial_rows():
    config = {INDEX_KEY: 4, "lr0": 0.02, "momentum": 0.9}
    result = {"fitness": 0.25, "epoch": 3, "time_total_s": 12.5, "metrics/mAP_0.5": 0.4, "val/box_loss": 0.05}
    finished = completed_outcome(config, {**result, FINISHED_KEY: True}, ["lr0", "momentum"], generation=1)
    assert (finished.index, finished.generation, finished.status, finished.fitness) == (4, 1, "ok", 0.25)
    assert (finished.epochs, finished.seconds, finished.hyp) == (3, 12.5, {"lr0": 0.02, "momentum": 0.9})
    assert finished.metrics == {"metrics/mAP_0.5": 0.4, "val/box_loss": 0.05}  # not fitness, epoch or Ray's own
    stopped = completed_outcome(config, result, ["lr0", "momentum"], generation=1)
    assert (stopped.status, stopped.fitness, stopped.epochs) == ("stopped", 0.25, 3)
    failed = failed_outcome(config, result, ["lr0"], generation=0, error="ValueError: bad")
    assert (failed.status, failed.fitness, failed.epochs, failed.error) == ("failed", 0.0, 3, "ValueError: bad")
    assert failed_outcome(config, {}, ["lr0"], generation=0, error="x").epochs == 0  # failed before any report


def test_error_message_is_the_original_exception_in_one_line():
    class WrappedError(Exception):  # as Ray's RayTaskError carries the trial's own exception
        cause = ConfigError("data.yaml: file not found")

    assert error_message(WrappedError("long traceback\n...")) == "ConfigError: data.yaml: file not found"
    assert error_message(RuntimeError("out of memory")) == "RuntimeError: out of memory"
    assert error_message("Failure # 1\nTraceback ...\n  File x\nValueError: nan loss\n") == "ValueError: nan loss"
    assert error_message(None) == "the trial failed (Ray kept no error)"


# -- searchers: Tune's Searcher base class needs Ray, but no Ray instance ---------------------------------------------


@pytest.fixture(scope="module")
def tune():
    """ray.tune, imported once (~2 s) for the searcher tests; they are skipped without it."""
    return pytest.importorskip("ray.tune", reason='Ray Tune is optional: pip install "detector[tune]"')


def test_genetic_searcher_waits_for_the_generation_it_breeds_from(tmp_path, tune):
    run = make_run(tmp_path, trials=4, population=2)
    searcher = ray_backend.build_searcher(run)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert first == {INDEX_KEY: 0, **run.start}  # trial 0 is --hyp itself
    assert second[INDEX_KEY] == 1 and second != {INDEX_KEY: 1, **run.start}  # a mutation of it
    assert searcher.suggest("c") is None  # generation 1 needs both trials of generation 0
    finish(run, first, 0.1)
    assert searcher.suggest("c") is None
    finish(run, second, 0.3)
    third = searcher.suggest("c")
    assert third == {INDEX_KEY: 2, **run.strategy.propose(2, run.history)}
    assert searcher.suggest("d")[INDEX_KEY] == 3
    assert searcher.suggest("e") == searcher.FINISHED


def test_resumed_searcher_proposes_the_missing_trials_first(tmp_path, tune):
    run = make_run(tmp_path, trials=5, population=8)
    for index in (0, 2):  # trial 1 was lost to a kill
        finish(run, {INDEX_KEY: index, **run.strategy.propose(index, [])}, 0.1)
    searcher = ray_backend.build_searcher(run)
    assert [searcher.suggest(str(i))[INDEX_KEY] for i in range(3)] == [1, 3, 4]
    assert searcher.suggest("x") == searcher.FINISHED


def test_random_search_draws_within_bounds_on_the_keys_scale(tmp_path, tune):
    run = make_run(tmp_path, trials=400, search="random")
    domains = ray_backend.random_domains(run)
    assert set(domains) == set(run.strategy.keys)
    assert ray_backend.propose_random(run, "t", 0, domains=domains) == run.start  # the start comes first
    draws = [ray_backend.propose_random(run, "t", index, domains=domains) for index in range(1, 401)]
    assert draws[5] == ray_backend.propose_random(run, "u", 6, domains=domains)  # seeded by (seed, trial number)
    for key in run.start:
        values = np.array([draw[key] for draw in draws])
        if key not in domains:
            assert (values == run.start[key]).all(), key  # keys that do not evolve keep --hyp's value
            continue
        dimension = run.space.dimensions[key]
        assert values.min() >= dimension.low and values.max() <= dimension.high, key
    # lr0 is log-uniform over 1e-5..0.1: half the draws below 1e-3 (the middle in log space), not 0.05.
    lr0 = np.array([draw["lr0"] for draw in draws])
    assert 0.4 < (lr0 < 1e-3).mean() < 0.6
    assert 0.4 < np.mean([draw["momentum"] < 0.79 for draw in draws]) < 0.6  # momentum: linear over 0.6..0.98


def test_optuna_search_evaluates_the_start_first(tmp_path, tune):
    pytest.importorskip("optuna", reason="Optuna is optional")
    run = make_run(tmp_path, trials=3, search="optuna")
    searcher = ray_backend.build_searcher(run)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert first == {INDEX_KEY: 0, **run.start}
    assert second[INDEX_KEY] == 1 and second != first
    for key in run.strategy.keys:
        dimension = run.space.dimensions[key]
        assert dimension.low <= second[key] <= dimension.high
    for key in set(run.start) - set(run.strategy.keys):
        assert second[key] == run.start[key]
    searcher.on_trial_complete("a", result={"fitness": 0.2})
    searcher.on_trial_complete("b", result={"fitness": 0.1})
    assert searcher.suggest("c")[INDEX_KEY] == 2
    assert searcher.suggest("d") == searcher.FINISHED
    assert not math.isnan(second["lr0"])
