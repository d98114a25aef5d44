"""The LR range test (detector.engine.lr_find): its geometric schedule, its stopping rule against a numpy reference,
the suggestion on known curves, and one real tiny run checked against the learning rates the optimizer stepped with."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from tiny_runs import make_tiny, tiny_config

from detector.cli.train import main as train_main
from detector.config import LRFindConfig
from detector.engine.lr_find import LRFinder, RangeTest, lr_find_figure, suggest_lr
from detector.errors import ConfigError


def test_learning_rates_grow_geometrically_from_min_to_max():
    test = RangeTest(LRFindConfig(iterations=50, min_lr=1e-6, max_lr=1.0))
    lrs = np.array([test.lr(step) for step in range(50)])
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1e6) ** (1 / 49), rtol=1e-12)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)


def smoothed_by_hand(losses: list[float], beta: float = 0.98) -> np.ndarray:
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**i))
    return np.array(smoothed)


def test_the_test_stops_when_the_smoothed_loss_exceeds_four_times_its_minimum():
    losses = [2.0 - 0.05 * i for i in range(30)] + [1.0 + 3.0 * i for i in range(1, 40)]
    reference = smoothed_by_hand(losses)
    first_divergent = next(i for i in range(len(reference)) if reference[i] > 4 * reference[: i + 1].min())
    test = RangeTest(LRFindConfig(iterations=1000))
    stops = [test.record(loss) for loss in losses[: first_divergent + 1]]
    assert stops == [False] * first_divergent + [True]
    np.testing.assert_allclose(test.smoothed, reference[: first_divergent + 1], rtol=1e-12)
    assert "diverged" in test.stop_reason

    finite_then_nan = RangeTest(LRFindConfig(iterations=1000))
    assert not finite_then_nan.record(1.0)
    assert finite_then_nan.record(float("nan")) and "non-finite" in finite_then_nan.stop_reason
    assert finite_then_nan.losses == [1.0]

    short = RangeTest(LRFindConfig(iterations=3))
    assert [short.record(1.0) for _ in range(3)] == [False, False, True]


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = np.logspace(-5, 0, 51)  # 10 points per decade: 1e-3 is index 20
    x = np.log10(lrs)
    curve = -np.tanh(2 * (x + 3)) + 10 * np.clip(x + 1, 0, None) ** 2  # steepest at 1e-3, minimum near 1e-1, then up
    curve[-3] -= 5  # a steeper drop after the minimum (a noisy divergent end) must not be picked
    assert curve[-3] > curve.min() + 1
    assert suggest_lr(lrs, curve) == pytest.approx(1e-3)
    curve[2] -= 0.5  # an early jump of the still-young average (steeper than at 1e-3) is skipped too
    assert suggest_lr(lrs, curve) == pytest.approx(1e-3)
    rising = np.linspace(1.0, 2.0, 10)  # the loss never falls: the minimum's lr / 10, below the range
    assert suggest_lr(np.logspace(-4, -1, 10), rising) == pytest.approx(1e-5)


def test_options_are_checked():
    for settings in (LRFindConfig(iterations=1), LRFindConfig(min_lr=0.0), LRFindConfig(min_lr=1.0, max_lr=0.1)):
        with pytest.raises(ConfigError, match="--lr-find"):
            RangeTest(settings)
    assert train_main(["--lr-find-iters", "10"]) == 2  # without --lr-find: a one-line error


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Built-in images and a yolov5n at 1/8 width; one torch thread (two crawl when other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lr_find")
    tiny = make_tiny(root, num_train=8, num_val=2)
    yield tiny
    torch.set_num_threads(threads)


def test_a_real_range_test_steps_at_the_scheduled_rates_and_stops_when_the_loss_diverges(tiny, tmp_path):
    settings = LRFindConfig(iterations=24, min_lr=1e-3, max_lr=1e5)
    finder = LRFinder(tiny_config(tiny, tmp_path, batch_size=1, nbs=2), settings)  # 2 batches per optimizer step
    stepped_at, forwards = [], []
    finder.optimizer.register_step_pre_hook(lambda optimizer, *_: stepped_at.append(optimizer.param_groups[1]["lr"]))
    finder.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    result = finder.run()

    assert "diverged" in result.stop_reason and len(result.lrs) < settings.iterations
    assert stepped_at[: len(result.lrs)] == pytest.approx(result.lrs, rel=1e-12)  # the rates the optimizer used
    np.testing.assert_allclose(np.diff(np.log(stepped_at)), np.log(1e8) / 23, rtol=1e-9)
    assert 2 * len(stepped_at) <= len(forwards) <= 2 * len(stepped_at) + 2  # nbs 2: two batches per step
    with open(result.save_dir / "lr_find.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(row["lr"]) for row in rows], result.lrs)
    np.testing.assert_allclose([float(row["loss"]) for row in rows], result.losses)
    np.testing.assert_allclose(smoothed_by_hand(result.losses), result.smoothed_losses, rtol=1e-9)
    assert not (result.save_dir / "weights").exists()  # no checkpoint, no training run
    assert not (result.save_dir / "lr_find.png").exists()  # --noplots (tiny_config's)

    axes = lr_find_figure(result).axes[0]  # what lr_find.png draws
    assert axes.get_xscale() == "log"
    np.testing.assert_allclose(axes.lines[1].get_xdata(), result.lrs)
    np.testing.assert_allclose(axes.lines[1].get_ydata(), result.smoothed_losses)
    assert axes.lines[-1].get_xdata()[0] == result.suggestion
