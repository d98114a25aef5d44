"""Learning-rate schedules per iteration against hand-computed curves and torch.optim.lr_scheduler's own, and warmup."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detector.config import Hyperparameters, ScheduleConfig
from detector.engine.optim import build_optimizer
from detector.engine.schedules import (
    LR_SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    LRSchedule,
    build_schedule,
    set_momentum,
    warmup,
    warmup_accumulate_steps,
    warmup_iterations,
)
from detector.errors import ConfigError

LR0 = 0.02


def sgd(momentum: float = 0.937) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=LR0, momentum=momentum)


def test_registry_holds_the_five_schedules_and_suggests_on_a_typo():
    assert set(LR_SCHEDULES) == {"linear", "cosine", "onecycle", "cosine-restarts", "plateau"}
    with pytest.raises(ConfigError, match="unknown; did you mean 'cosine'"):
        build_schedule("cosin", 10, 5, Hyperparameters())


def test_linear_and_cosine_follow_yolov5_at_epoch_starts_and_move_every_iteration():
    epochs, per_epoch, lrf = 100, 10, 0.01
    linear = LinearSchedule(epochs, per_epoch, lrf)
    cosine = CosineSchedule(epochs, per_epoch, lrf)
    for epoch in (0, 25, 50, 99):  # YOLOv5's per-epoch lambdas at the first iteration of each epoch
        assert linear.factor(epoch * per_epoch) == pytest.approx((1 - epoch / epochs) * (1 - lrf) + lrf)
        assert cosine.factor(epoch * per_epoch) == pytest.approx(
            ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1
        )
    assert linear.factor(505) == pytest.approx((1 - 50.5 / 100) * 0.99 + 0.01)  # between epochs 50 and 51
    assert linear.factor(1000) == pytest.approx(lrf) and cosine.factor(1000) == pytest.approx(lrf)
    assert linear.factor(5000) == pytest.approx(lrf)  # past the end: stays at the final rate


@pytest.mark.parametrize("optimizer_name", ["SGD", "Adam"])
def test_onecycle_equals_torch_one_cycle_lr_with_momentum_cycling(optimizer_name):
    epochs, per_epoch, lrf = 4, 25, 0.01
    hyp = Hyperparameters(lr0=LR0, lrf=lrf, momentum=0.95)
    settings = ScheduleConfig(onecycle_pct=0.3, onecycle_div=25.0, onecycle_min_momentum=0.85)
    ours = build_schedule("onecycle", epochs, per_epoch, hyp, settings)
    assert ours.has_warmup
    parameter = nn.Parameter(torch.zeros(2))
    if optimizer_name == "SGD":
        optimizer = torch.optim.SGD([parameter], lr=LR0, momentum=0.95)
    else:
        optimizer = torch.optim.Adam([parameter], lr=LR0, betas=(0.95, 0.999))
    theirs = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=LR0,
        total_steps=epochs * per_epoch,
        pct_start=0.3,
        div_factor=25.0,
        final_div_factor=1 / (25.0 * lrf),
        base_momentum=0.85,
        max_momentum=0.95,
    )
    mirror = sgd() if optimizer_name == "SGD" else torch.optim.Adam([nn.Parameter(torch.zeros(1))], betas=(0.9, 0.9))
    for iteration in range(epochs * per_epoch):
        group = optimizer.param_groups[0]
        assert ours.factor(iteration) * LR0 == pytest.approx(group["lr"], rel=1e-9), iteration
        set_momentum(mirror, ours.momentum(iteration))
        torch_momentum = group["momentum"] if optimizer_name == "SGD" else group["betas"][0]
        ours_momentum = mirror.param_groups[0].get("momentum") or mirror.param_groups[0]["betas"][0]
        assert ours_momentum == pytest.approx(torch_momentum, rel=1e-9), iteration
        optimizer.step()
        theirs.step()
    assert ours.factor(epochs * per_epoch - 1) == pytest.approx(lrf)  # ends at lr0 * lrf


@pytest.mark.parametrize(("t0", "t_mult"), [(3, 1), (2, 2)])
def test_cosine_restarts_equal_torch_sgdr_stepped_with_the_fractional_epoch(t0, t_mult):
    epochs, per_epoch, lrf = 14, 4, 0.05
    hyp = Hyperparameters(lr0=LR0, lrf=lrf)
    ours = build_schedule("cosine-restarts", epochs, per_epoch, hyp, ScheduleConfig(t0=t0, t_mult=t_mult))
    optimizer = sgd()
    theirs = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t0, T_mult=t_mult, eta_min=LR0 * lrf)
    restarts = 0
    for iteration in range(epochs * per_epoch):
        theirs.step(iteration / per_epoch)
        assert ours.factor(iteration) * LR0 == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9), iteration
        restarts += iteration > 0 and ours.factor(iteration) > ours.factor(iteration - 1)
    assert restarts == (4 if t_mult == 1 else 2)  # t0 3: restarts at epochs 3, 6, 9, 12; t0 2 x2: at 2, 6


def test_plateau_follows_torch_reduce_lr_on_plateau_and_round_trips_its_state():
    settings = ScheduleConfig(plateau_factor=0.5, plateau_patience=2, plateau_cooldown=1, plateau_threshold=1e-4)
    hyp = Hyperparameters(lr0=LR0, lrf=0.1)
    ours = build_schedule("plateau", 40, 3, hyp, settings)
    optimizer = sgd()
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=2, cooldown=1, threshold=1e-4, min_lr=LR0 * 0.1
    )
    fitness = [0.1, 0.2, 0.3, 0.3, 0.30001, 0.29, 0.31, 0.31, 0.31, 0.31, 0.31, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    reductions = 0
    for epoch, value in enumerate(fitness):
        before = ours.factor(epoch * 3)
        ours.on_epoch_end(epoch, value)
        theirs.step(value)
        assert ours.factor((epoch + 1) * 3) * LR0 == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9), epoch
        reductions += ours.factor((epoch + 1) * 3) < before
    assert reductions == 4 and ours.factor(0) == pytest.approx(0.1)  # 1, 0.5, 0.25, 0.125, then lrf (0.1)
    ours.on_epoch_end(99, None)  # an epoch without validation changes nothing
    restored = build_schedule("plateau", 40, 3, hyp, settings)
    restored.load_state_dict(ours.state_dict())
    assert restored.state_dict() == ours.state_dict()


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("onecycle", ScheduleConfig(onecycle_pct=1.0), "onecycle_pct"),
        ("cosine-restarts", ScheduleConfig(t0=0), "schedule.t0"),
        ("plateau", ScheduleConfig(plateau_factor=1.5), "plateau_factor"),
    ],
)
def test_bad_schedule_settings_are_one_line_errors(name, settings, message):
    with pytest.raises(ConfigError, match=message):
        build_schedule(name, 10, 5, Hyperparameters(), settings)


def test_a_new_schedule_is_one_registered_class():
    class Halving(LRSchedule):
        def factor(self, iteration: int) -> float:
            return 0.5 ** int(self.epoch_of(iteration))

    LR_SCHEDULES["halving-test"] = Halving
    try:
        schedule = build_schedule("halving-test", 10, 4, Hyperparameters())
        assert [schedule.factor(i) for i in (0, 3, 4, 9)] == [1.0, 1.0, 0.5, 0.25]
    finally:
        del LR_SCHEDULES["halving-test"]


# -- warmup ----------------------------------------------------------------------------------------------------------


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1))


def test_warmup_iterations():
    assert warmup_iterations(3.0, 500) == 1500
    assert warmup_iterations(3.0, 10) == 100  # at least 100 iterations
    assert warmup_iterations(0.0, 500) == 0  # explicitly off


def test_warmup_values_at_start_middle_and_end():
    hyp = Hyperparameters(lr0=0.01, momentum=0.937, warmup_momentum=0.8, warmup_bias_lr=0.1)
    optimizer = build_optimizer(small_model(), "SGD", lr=hyp.lr0, momentum=hyp.momentum)
    factor = LinearSchedule(100, 10, 0.01).factor(0)

    warmup(optimizer, 0, 200, factor, hyp)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"bias": pytest.approx(0.1), "weight": 0.0, "norm": 0.0}
    assert all(g["momentum"] == pytest.approx(0.8) for g in optimizer.param_groups)

    warmup(optimizer, 100, 200, factor, hyp)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"bias": pytest.approx(0.055), "weight": pytest.approx(0.005), "norm": pytest.approx(0.005)}
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.8685)

    warmup(optimizer, 200, 200, factor, hyp)
    assert all(g["lr"] == pytest.approx(0.01) for g in optimizer.param_groups)
    assert all(g["momentum"] == pytest.approx(0.937) for g in optimizer.param_groups)


def test_warmup_leaves_adam_betas_alone():
    hyp = Hyperparameters(lr0=0.001)
    optimizer = build_optimizer(small_model(), "Adam", lr=hyp.lr0, momentum=0.9)
    warmup(optimizer, 0, 100, 1.0, hyp)
    assert all(g["betas"] == (0.9, 0.999) and "momentum" not in g for g in optimizer.param_groups)
    assert optimizer.param_groups[1]["lr"] == 0.0


def test_warmup_accumulation_ramps_to_nominal_batch():
    assert warmup_accumulate_steps(0, 100, batch_size=16, nominal_batch_size=64) == 1
    assert warmup_accumulate_steps(50, 100, batch_size=16, nominal_batch_size=64) == 2  # 2.5 rounds to even
    assert warmup_accumulate_steps(100, 100, batch_size=16, nominal_batch_size=64) == 4
    assert warmup_accumulate_steps(100, 100, batch_size=128, nominal_batch_size=64) == 1
