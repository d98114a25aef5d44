"""Search strategies on hand-made spaces and histories: bounds, log-scale mutation, frozen keys, determinism,
genetic selection and readiness, and YOLOv5's single/weighted parents."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.errors import ConfigError
from detector.evolve.space import Dimension, SearchSpace
from detector.evolve.strategies import (
    STRATEGIES,
    GeneticStrategy,
    TrialRecord,
    YOLOv5Strategy,
    build_strategy,
    round_significant,
)

# a: linear, b: log over 6 decades, frozen: evolve false, off: auto with a start of 0, forced: evolve true from 0
SPACE = SearchSpace(
    {
        "a": Dimension("a", 0.0, 10.0),
        "b": Dimension("b", 1e-6, 1.0, "log"),
        "frozen": Dimension("frozen", 0.0, 1.0, evolve=False),
        "off": Dimension("off", 0.0, 1.0),
        "forced": Dimension("forced", 0.0, 1.0, evolve=True),
    },
    "test-space.yaml",
)
START = {"a": 5.0, "b": 1e-3, "frozen": 0.5, "off": 0.0, "forced": 0.0, "outside": 7.0}  # outside: not in the space


def record(index: int, fitness: float, status: str = "ok", population: int = 3, **hyp: float) -> TrialRecord:
    return TrialRecord(index, index // population, fitness, {**START, **hyp}, status)


def test_registry_and_build_errors():
    assert set(STRATEGIES) == {"genetic", "yolov5"}
    assert isinstance(build_strategy("genetic", SPACE, [START]), GeneticStrategy)
    assert isinstance(build_strategy("yolov5", SPACE, [START], parent="weighted"), YOLOv5Strategy)
    with pytest.raises(ConfigError, match="unknown; did you mean 'genetic'"):
        build_strategy("genetc", SPACE, [START])
    with pytest.raises(ConfigError, match="unknown option 'sigam'; did you mean 'sigma'"):
        build_strategy("genetic", SPACE, [START], sigam=0.1)
    build_strategy("genetic", SPACE, [START], parent="single")  # yolov5's option, passed to every strategy: ignored
    with pytest.raises(ConfigError, match="mutation_prob must be between 0 and 1"):
        build_strategy("genetic", SPACE, [START], mutation_prob=1.5)
    with pytest.raises(ConfigError, match="parent must be 'single' or 'weighted'"):
        build_strategy("yolov5", SPACE, [START], parent="best")


def test_no_evolving_key_is_an_error():
    space = SearchSpace({"off": Dimension("off", 0.0, 1.0)}, "narrow.yaml")
    with pytest.raises(ConfigError, match=r"narrow\.yaml: no hyperparameter can evolve"):
        GeneticStrategy(space, [START])


@pytest.mark.parametrize("name", ["genetic", "yolov5"])
def test_starts_come_first_unchanged(name):
    other = {**START, "a": 9.123456789, "frozen": 0.25}
    strategy = build_strategy(name, SPACE, [START, other], population=4)
    assert strategy.keys == ("a", "b", "forced")
    assert strategy.propose(0, []) == START
    assert strategy.propose(1, []) == other  # not rounded, frozen key as given


@pytest.mark.parametrize("name", ["genetic", "yolov5"])
def test_children_stay_in_bounds_and_frozen_keys_keep_the_first_start(name):
    other = {**START, "frozen": 0.25}
    strategy = build_strategy(name, SPACE, [START, other], population=300, sigma=0.8)
    history = [record(i, fitness=0.1 * (i % 3), a=10.0 * (i % 2), population=300) for i in range(2)]
    children = [strategy.propose(i, history) for i in range(2, 300)]
    for child in children:
        assert set(child) == set(START)
        assert (child["frozen"], child["off"], child["outside"]) == (0.5, 0.0, 7.0)
        assert 0.0 <= child["a"] <= 10.0 and 1e-6 <= child["b"] <= 1.0 and 0.0 <= child["forced"] <= 1.0
    assert max(child["a"] for child in children) == 10.0  # large steps are clipped onto the bounds


def test_genetic_mutation_of_a_log_key_is_symmetric_in_log_space():
    # b starts at 1e-3, the middle of 1e-6..1 on a log axis: sigma 0.1 of 6 decades is 0.6 decades either way.
    # a (linear, 0..10) moves by 0.1 of its range: N(0, 1) around 5.
    strategy = GeneticStrategy(SPACE, [START], population=5000, mutation_prob=1.0, sigma=0.1)
    children = [strategy.propose(i, []) for i in range(1, 1001)]
    decades = np.array([math.log10(child["b"] / 1e-3) for child in children])
    assert abs(decades.mean()) < 0.06  # about 3 standard errors (0.6 / sqrt(1000))
    assert decades.std() == pytest.approx(0.6, rel=0.08)
    assert abs((decades > 0).mean() - 0.5) < 0.05
    steps = np.array([child["a"] - 5.0 for child in children])
    assert abs(steps.mean()) < 0.1 and steps.std() == pytest.approx(1.0, rel=0.08)


@pytest.mark.parametrize("name", ["genetic", "yolov5"])
def test_same_seed_same_proposals_other_seed_different(name):
    history = [record(i, fitness=0.1 * i, a=1.0 + i, b=10.0 ** -(i + 1)) for i in range(3)]

    def proposals(seed: int) -> list[dict[str, float]]:
        strategy = build_strategy(name, SPACE, [START], seed=seed, population=3)
        return [strategy.propose(i, history) for i in range(3, 6)]

    assert proposals(0) == proposals(0)
    assert proposals(0) != proposals(1)


def test_genetic_generation_and_ready():
    strategy = GeneticStrategy(SPACE, [START], population=3)
    assert [strategy.generation(i) for i in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert all(strategy.ready(i, []) for i in range(3))  # generation 0 needs nothing
    assert not strategy.ready(3, [record(0, 0.1), record(2, 0.3)])
    assert strategy.ready(3, [record(2, 0.3), record(0, 0.1), record(1, 0.2)])  # any finishing order
    assert not strategy.ready(6, [record(i, 0.1) for i in (0, 1, 2, 3, 5)])
    with pytest.raises(ValueError, match="not ready"):
        strategy.propose(3, [record(0, 0.1)])


def test_genetic_uses_only_earlier_generations_whatever_the_order():
    strategy = GeneticStrategy(SPACE, [START], population=3)
    generation0 = [record(i, 0.1 * (i + 1), a=float(i + 1)) for i in range(3)]
    expected = [strategy.propose(i, generation0) for i in range(3, 6)]
    shuffled = [generation0[2], record(4, 0.9, a=9.0), generation0[0], generation0[1], record(3, 0.8)]
    assert [strategy.propose(i, shuffled) for i in range(3, 6)] == expected


def test_genetic_breeds_from_the_two_fittest_with_elitism_when_mutation_is_off():
    # pool = the best 3 of generations 0 and 1; a 3-way tournament of 3 always picks the best, the second
    # tournament (the pool without the first parent) the runner-up. The best is from generation 0: elitism.
    population = 3
    history = [
        record(0, 0.50, a=1.0, b=1e-1),  # best
        record(1, 0.10, a=2.0, b=1e-2),
        record(2, 0.05, a=3.0, b=1e-3),
        record(3, 0.40, a=4.0, b=1e-4),  # runner-up
        record(4, 0.30, a=5.0, b=1e-5),  # third: in the pool, never a parent
        record(5, 0.20, a=6.0, b=1e-6),
    ]
    parents = {"a": {1.0, 4.0}, "b": {1e-1, 1e-4}}
    seen: dict[str, set[float]] = {"a": set(), "b": set()}
    for seed in range(20):
        strategy = GeneticStrategy(SPACE, [START], seed=seed, population=population, mutation_prob=0.0)
        for index in range(6, 9):
            child = strategy.propose(index, history)
            for key in parents:
                assert child[key] in parents[key]
                seen[key].add(child[key])
            assert child["forced"] == 0.0  # both parents' value: no mutation
    assert seen == parents  # uniform crossover takes each key from either parent


def test_genetic_crossover_values_lie_within_the_parents_range():
    history = [record(i, 0.1 * (i + 1), a=float(2 * i + 1), b=10.0 ** -(i + 1)) for i in range(3)]
    strategy = GeneticStrategy(SPACE, [START], population=3, mutation_prob=0.0)
    for index in range(3, 6):
        child = strategy.propose(index, history)
        assert 1.0 <= child["a"] <= 5.0 and 1e-3 <= child["b"] <= 1e-1


def test_genetic_failed_trials_do_not_breed():
    history = [record(0, 0.5, a=1.0, population=2), record(1, 0.0, "failed", a=9.0, population=2)]
    strategy = GeneticStrategy(SPACE, [START], population=2, sigma=0.01)
    for index in range(2, 4):
        assert abs(strategy.propose(index, history)["a"] - 1.0) < 0.5  # never 9 from the failed trial


def test_genetic_children_change_something_and_repeat_no_trial():
    strategy = GeneticStrategy(SPACE, [START], population=400, mutation_prob=0.01)  # mostly one forced key
    children = [strategy.propose(i, []) for i in range(1, 400)]
    keys = strategy.keys
    signatures = {tuple(child[key] for key in keys) for child in children}
    assert tuple(START[key] for key in keys) not in signatures
    assert all(sum(child[key] != START[key] for key in keys) >= 1 for child in children)
    assert all(round_significant(child[key], 6) == child[key] for child in children for key in keys)


def test_yolov5_single_parent_is_drawn_by_fitness_from_the_top_five():
    # fitness - lowest of the top 5 + 1e-6: weights 0.4, 0.3, 0.2, 0.1 and ~0 for records 0..4
    history = [record(i, f, a=float(i + 1)) for i, f in enumerate([0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0])]
    strategy = YOLOv5Strategy(SPACE, [START], mutation_prob=0.0)
    assert strategy.ready(1000, []) and strategy.ready(5, history)  # never waits
    values = np.array([strategy.propose(i, history)["a"] for i in range(1, 1001)])
    assert set(values) <= {1.0, 2.0, 3.0, 4.0, 5.0}  # only the top 5, and only as they are (mutation off)
    shares = [(values == a).mean() for a in (1.0, 2.0, 3.0, 4.0)]
    assert shares == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=0.04)  # about 2.5 standard errors


def test_yolov5_weighted_parent_is_the_hand_computed_mean_of_the_top_five():
    fitness = [0.3, 0.2, 0.1, 0.6, 0.4, 0.05, 0.0]
    a_values = [1.0, 2.0, 4.0, 3.0, 5.0, 100.0, 100.0]  # the last two are not in the top 5
    history = [record(i, f, a=a) for i, (f, a) in enumerate(zip(fitness, a_values, strict=True))]
    history.append(record(7, 0.9, "failed", a=100.0))  # failed: never a parent, whatever its fitness says
    top = [(0.6, 3.0), (0.4, 5.0), (0.3, 1.0), (0.2, 2.0), (0.1, 4.0)]
    weights = [f - 0.1 + 1e-6 for f, _ in top]
    expected = sum(w * a for w, (_, a) in zip(weights, top, strict=True)) / sum(weights)
    assert expected == pytest.approx(3.4 / 1.1, rel=1e-5)  # (0.5*3 + 0.3*5 + 0.2*1 + 0.1*2 + ~0*4) / 1.1
    strategy = YOLOv5Strategy(SPACE, [START], parent="weighted", mutation_prob=0.0)
    child = strategy.propose(8, history)
    assert child["a"] == pytest.approx(expected, rel=2e-5)  # rounded to 5 significant digits
    assert child["a"] == round_significant(child["a"], 5)


def test_yolov5_mutation_without_history_scales_the_first_start():
    space = SearchSpace({key: SPACE.dimensions[key] for key in ("a", "b")}, "two-keys.yaml")
    strategy = YOLOv5Strategy(space, [START, {**START, "a": 1.0}])
    for index in range(2, 200):
        child = strategy.propose(index, [])
        ratios = [child["a"] / 5.0, child["b"] / 1e-3]
        assert all(0.3 - 1e-4 <= r <= 3.0 + 1e-4 for r in ratios)  # factors in [0.3, 3], then 5 digits
        assert ratios != [1.0, 1.0]  # some factor always differs from 1
        assert all(round_significant(child[key], 5) == child[key] for key in ("a", "b"))


def test_yolov5_keeps_a_zero_parent_value_at_zero():
    strategy = YOLOv5Strategy(SPACE, [START], sigma=0.5)
    assert all(strategy.propose(i, [])["forced"] == 0.0 for i in range(1, 50))  # factors multiply: 0 stays 0
