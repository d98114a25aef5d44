"""ModelEMA: the decay ramp and one update against hand computation, integer buffers, wrappers, save/restore."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detector.engine.ema import ModelEMA
from detector.utils.torch_utils import unwrap_model


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 2, 1))


def test_decay_follows_the_ramp():
    ema = ModelEMA(small_model(), decay=0.9999, tau=2000)
    assert ema.decay(0) == 0.0
    assert ema.decay(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema.decay(100_000) == pytest.approx(0.9999, abs=1e-12)


def test_one_update_matches_hand_computation():
    model = small_model()
    ema = ModelEMA(model, tau=10.0, updates=4)
    before = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        model[1].running_mean.fill_(2.0)
    model(torch.randn(2, 3, 8, 8))  # a training step: BN statistics and num_batches_tracked change
    ema.update(model)

    decay = 0.9999 * (1 - math.exp(-5 / 10.0))  # the fifth update
    assert ema.updates == 5
    after, current = ema.ema.state_dict(), model.state_dict()
    for name, value in after.items():
        if value.dtype.is_floating_point:
            expected = decay * before[name] + (1 - decay) * current[name]
            assert torch.allclose(value, expected, atol=1e-6), name
    assert after["1.num_batches_tracked"].item() == 1 == current["1.num_batches_tracked"].item()


def test_decay_zero_follows_the_model_exactly():
    """hyp ema_decay 0 (no averaging): after each update the average is the model as trained."""
    model = small_model()
    ema = ModelEMA(model, decay=0.0, tau=2000)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0).add_(0.5)
    ema.update(model)
    for name, value in ema.ema.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_ema_is_a_frozen_eval_copy():
    model = small_model()
    ema = ModelEMA(model)
    assert not ema.ema.training
    assert not any(p.requires_grad for p in ema.ema.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ema.ema[0].weight, model[0].weight)  # a copy, not shared storage


def test_update_from_a_data_parallel_wrapper():
    model = small_model()
    original_bias = model[3].bias.detach().clone()
    ema = ModelEMA(nn.DataParallel(model))
    assert not isinstance(ema.ema, nn.DataParallel)
    with torch.no_grad():
        model[3].bias.fill_(1.0)
    ema.update(nn.DataParallel(model))
    decay = ema.decay(1)
    assert torch.allclose(ema.ema[3].bias, decay * original_bias + (1 - decay), atol=1e-6)


def test_state_round_trip_keeps_updates_and_weights():
    model = small_model()
    ema = ModelEMA(model)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.mul_(1.1)
        ema.update(model)
    state = ema.state_dict()
    restored = ModelEMA(small_model())
    restored.load_state_dict(state)
    assert restored.updates == 3
    for name, value in ema.ema.state_dict().items():
        assert torch.equal(restored.ema.state_dict()[name], value)


def test_unwrap_model_returns_the_module_inside_a_wrapper():
    model = small_model()
    assert unwrap_model(nn.DataParallel(model)) is model
    assert unwrap_model(model) is model
