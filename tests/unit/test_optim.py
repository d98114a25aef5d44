"""Optimiser parameter groups and batch-size scaling against hand-computed values (schedules: test_schedules.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detector.engine.optim import accumulate_steps, build_optimizer, parameter_groups, scaled_weight_decay
from detector.errors import ConfigError


def small_model() -> nn.Module:
    """2 convs without bias + 2 BN, 1 conv with bias, 1 GroupNorm, 1 Linear: 4 decayed, 3 norm, 4 bias tensors."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 1),
        nn.GroupNorm(2, 8),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def names_of(model: nn.Module, parameters: list[nn.Parameter]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in parameters}


def test_parameter_groups_membership():
    model = small_model()
    groups = parameter_groups(model)
    assert names_of(model, groups["weight"]) == {"0.weight", "2.weight", "4.weight", "7.weight"}
    assert names_of(model, groups["norm"]) == {"1.weight", "3.weight", "5.weight"}
    assert names_of(model, groups["bias"]) == {"1.bias", "3.bias", "4.bias", "5.bias", "7.bias"}
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_build_optimizer_groups_and_options(name):
    model = small_model()
    optimizer = build_optimizer(model, name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert [g["name"] for g in optimizer.param_groups] == ["bias", "weight", "norm"]
    assert [len(g["params"]) for g in optimizer.param_groups] == [5, 4, 3]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 5e-4, 0.0]
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    if name == "SGD":
        assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)
    else:
        assert isinstance(optimizer, torch.optim.AdamW if name == "AdamW" else torch.optim.Adam)
        assert all(g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)


def test_fused_sgd_step_equals_the_textbook_nesterov_update():
    model = nn.Linear(2, 1)
    optimizer = build_optimizer(model, "SGD", lr=0.1, momentum=0.9, weight_decay=0.01)
    weight0 = model.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        model.weight.grad = torch.ones_like(model.weight)
        model.bias.grad = torch.ones_like(model.bias)
        optimizer.step()
    # Nesterov SGD with decay 0.01 on the weight: g = 1 + 0.01 w; buf = 0.9 buf + g; w -= 0.1 (g + 0.9 buf).
    w, buf = weight0.clone(), torch.zeros_like(weight0)
    for _ in range(2):
        g = 1 + 0.01 * w
        buf = 0.9 * buf + g if buf.any() else g
        w = w - 0.1 * (g + 0.9 * buf)
    assert torch.allclose(model.weight.detach(), w, atol=1e-6)


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'RMSprop'.*SGD, Adam, AdamW"):
        build_optimizer(small_model(), "RMSprop")


def test_accumulation_and_weight_decay_scaling():
    assert [accumulate_steps(b, 64) for b in (1, 16, 24, 64, 128)] == [64, 4, 3, 1, 1]
    assert scaled_weight_decay(5e-4, batch_size=16, accumulate=4, nominal_batch_size=64) == pytest.approx(5e-4)
    assert scaled_weight_decay(5e-4, batch_size=24, accumulate=3, nominal_batch_size=64) == pytest.approx(
        5e-4 * 72 / 64
    )
    assert scaled_weight_decay(5e-4, batch_size=128, accumulate=1, nominal_batch_size=64) == pytest.approx(1e-3)


def test_yolov5n_groups_match_yolov5s_optimizer_log():
    from detector.models.yolo import DetectionModel

    # YOLOv5's train.py logs "57 weight(decay=0.0), 60 weight(decay=0.0005), 60 bias" for yolov5n/s.
    optimizer = build_optimizer(DetectionModel("yolov5n.yaml"), "SGD")
    assert [len(g["params"]) for g in optimizer.param_groups] == [60, 60, 57]
