"""evolve.csv, hyp_evolve.yaml and evolve.png on hand-made trials; the configurable fitness; evolution options."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from detector.config import (
    EvolveConfig,
    Hyperparameters,
    TrainConfig,
    check_evolve_config,
    check_train_config,
    load_hyp,
)
from detector.errors import ConfigError
from detector.evolve.records import EvolveTable, TrialOutcome, evolve_figure, write_best_hyp
from detector.evolve.space import SearchSpace
from detector.evolve.strategies import build_strategy
from detector.ops.metrics import Metrics, fitness

HYP = dataclasses.asdict(Hyperparameters())
KEYS = list(HYP)


def outcome(index: int, fitness_value: float, lr0: float, status: str = "ok") -> TrialOutcome:
    metrics = {
        "metrics/precision": 0.5,
        "metrics/recall": 0.4,
        "metrics/mAP_0.5": fitness_value,
        "metrics/mAP_0.5:0.95": fitness_value / 2,
        "val/box_loss": 0.1,
        "val/obj_loss": 0.2,
        "val/cls_loss": 0.3,
    }
    return TrialOutcome(index, index // 2, {**HYP, "lr0": lr0}, metrics, fitness_value, 1.5, 3, status)


def test_fitness_weights_apply_to_precision_recall_and_maps():
    metrics = Metrics(precision=0.5, recall=0.25, map50=0.4, map=0.2)
    assert fitness(metrics) == pytest.approx(0.1 * 0.4 + 0.9 * 0.2)  # YOLOv5's weighting by default
    assert fitness(metrics, (1, 0, 0, 0)) == pytest.approx(0.5)
    assert fitness(metrics, (0.25, 0.25, 0.25, 0.25)) == pytest.approx((0.5 + 0.25 + 0.4 + 0.2) / 4)


@pytest.mark.parametrize("weights", [(0, 0, 0, 0), (1, 0, 0), (0, -1, 0, 1)])
def test_bad_fitness_weights_are_refused(weights):
    with pytest.raises(ConfigError, match="--fitness-weights"):
        check_train_config(TrainConfig(fitness_weights=weights))


def test_evolve_options_are_checked():
    with pytest.raises(ConfigError, match="--evolve-scheduler asha needs --evolve-backend ray"):
        check_evolve_config(EvolveConfig(scheduler="asha"))
    with pytest.raises(ConfigError, match="--evolve: expected a positive"):
        check_evolve_config(EvolveConfig(trials=0))
    check_evolve_config(EvolveConfig(backend="ray", scheduler="asha", search="random"))


def test_table_round_trip_and_best_row(tmp_path):
    path = tmp_path / "evolve.csv"
    table = EvolveTable(path, KEYS)
    for trial in (outcome(0, 0.30, 0.01), outcome(1, 0.45, 0.002), outcome(2, 0.0, 0.05, "failed")):
        table.add(trial)
    again = EvolveTable(path, KEYS)
    assert [r.index for r in again.records()] == [0, 1, 2]
    assert [r.fitness for r in again.records()] == [0.30, 0.45, 0.0]
    assert again.records()[1].hyp["lr0"] == 0.002
    assert again.records()[2].status == "failed"
    assert again.best_row()["trial"] == "1"
    header = path.read_text().splitlines()[0].split(",")
    assert header[:7] == ["trial", "generation", "fitness", "metrics/precision", "metrics/recall", "metrics/mAP_0.5",
                          "metrics/mAP_0.5:0.95"]  # fmt: skip
    assert header[-len(KEYS) :] == KEYS


def test_hand_written_evolve_csv_selects_the_fittest_and_breeds_from_it(tmp_path):
    """A hand-made evolve.csv: the best row goes to hyp_evolve.yaml, and the genetic strategy's parent pool is
    ranked by the file's fitness column."""
    columns = ["trial", "generation", "fitness", "metrics/precision", "metrics/recall", "metrics/mAP_0.5",
               "metrics/mAP_0.5:0.95", "time", "epochs", "status", "error", *KEYS]  # fmt: skip
    rows = []
    for index, (fit, lr0) in enumerate([(0.1, 0.01), (0.7, 0.001), (0.3, 0.02), (0.2, 0.05)]):
        values = {**HYP, "lr0": lr0}
        rows.append([index, 0, fit, 0.5, 0.5, fit, fit, 1.0, 3, "ok", "", *values.values()])
    path = tmp_path / "evolve.csv"
    path.write_text("\n".join(",".join(map(str, r)) for r in [columns, *rows]) + "\n")
    table = EvolveTable(path, KEYS)
    best = write_best_hyp(tmp_path / "hyp_evolve.yaml", table, (0, 0, 0.1, 0.9), "python train.py --evolve 4", 4)
    assert best["trial"] == "1"
    loaded = load_hyp(tmp_path / "hyp_evolve.yaml")
    assert loaded.lr0 == 0.001 and dataclasses.replace(loaded, lr0=0.01) == Hyperparameters()
    text = (tmp_path / "hyp_evolve.yaml").read_text()
    assert "# command: python train.py --evolve 4" in text and "fitness = 0.1 * mAP50 + 0.9 * mAP50-95" in text

    # population 2: the pool is the 2 fittest (trials 1 and 2); with mutation off every child's lr0 is one of theirs
    space = SearchSpace.load()
    strategy = build_strategy("genetic", space, [HYP], population=2, mutation_prob=0.0, seed=3)
    children = [strategy.propose(index, table.records())["lr0"] for index in (4, 5)]  # generation 2
    assert set(children) <= {0.001, 0.02}


def test_damaged_row_names_the_file_and_line(tmp_path):
    path = tmp_path / "evolve.csv"
    table = EvolveTable(path, KEYS)
    table.add(outcome(0, 0.3, 0.01))
    path.write_text(path.read_text() + "1,0,not-a-number\n")
    with pytest.raises(ConfigError, match=r"evolve.csv: line 3 is not a complete trial row"):
        EvolveTable(path, KEYS)


def test_evolve_figure_has_a_panel_per_key_with_the_best_starred(tmp_path):
    table = EvolveTable(tmp_path / "evolve.csv", KEYS)
    for trial in (outcome(0, 0.30, 0.01), outcome(1, 0.45, 0.002), outcome(2, 0.1, 0.05)):
        table.add(trial)
    figure = evolve_figure(table, ["lr0", "momentum", "mosaic"], SearchSpace.load())
    axes = figure.axes
    assert len(axes) == 3
    assert axes[0].get_xscale() == "log" and axes[1].get_xscale() == "linear"  # lr0 is a log key
    star = axes[0].lines[0]
    assert star.get_marker() == "*"
    assert (float(star.get_xdata()[0]), float(star.get_ydata()[0])) == (0.002, 0.45)
    assert axes[0].get_title() == "lr0 = 0.002"
    assert np.allclose(sorted(axes[0].collections[0].get_offsets()[:, 0]), [0.002, 0.01, 0.05])


def test_fitness_weights_choose_the_best_epoch_of_a_training_run():
    """best.pt follows --fitness-weights: by precision alone, the high-precision epoch stays best."""
    from detector.engine.state import TrainState

    state = TrainState(epochs=2, fitness_weights=(1.0, 0.0, 0.0, 0.0))
    state.record_validation(Metrics(precision=0.9, map50=0.1, map=0.1), num_classes=1)
    assert state.update_best() and state.fitness == pytest.approx(0.9)
    state.epoch = 1
    state.record_validation(Metrics(precision=0.5, map50=0.6, map=0.5), num_classes=1)
    assert not state.update_best() and state.best_epoch == 0  # YOLOv5's weights would have picked epoch 1
