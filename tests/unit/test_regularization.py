"""Stochastic depth and head dropout: rates by depth, identity in eval mode, torchvision's row-wise scaling."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from detector.models.blocks import Bottleneck
from detector.models.regularization import set_head_dropout, set_stochastic_depth
from detector.models.yolo import DetectionModel


@pytest.fixture(scope="module")
def model() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5n.yaml", nc=3).eval()


def test_rates_rise_linearly_with_depth_to_the_given_rate(model):
    regularised = copy.deepcopy(model)
    rates = set_stochastic_depth(regularised, 0.2)
    residual = [m for m in regularised.modules() if isinstance(m, Bottleneck) and m.add]
    assert len(rates) == len(residual) > 0  # yolov5n: the backbone's C3 bottlenecks (the head's have no shortcut)
    assert rates == pytest.approx([0.2 * (i + 1) / len(rates) for i in range(len(rates))])
    assert [m.drop_path.p for m in residual] == pytest.approx(rates)
    assert all(
        isinstance(m.drop_path, nn.Identity) for m in regularised.modules() if isinstance(m, Bottleneck) and not m.add
    )


def test_eval_mode_and_the_state_dict_are_unchanged(model):
    regularised = copy.deepcopy(model)
    set_stochastic_depth(regularised, 0.5)
    set_head_dropout(regularised, 0.5)
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(regularised.eval()(image), model(image), rtol=0, atol=0)
    assert regularised.state_dict().keys() == model.state_dict().keys()  # checkpoints and exports never see them


def test_a_dropped_sample_keeps_its_input_and_a_kept_one_is_rescaled():
    torch.manual_seed(1)
    block = Bottleneck(8, 8).train()
    block.drop_path = StochasticDepth(0.5, "row")
    x = torch.rand(64, 8, 4, 4)
    branch = block.cv2(block.cv1(x)).detach()
    out = block(x).detach()
    residual = out - x
    dropped = residual.flatten(1).abs().amax(1) == 0
    assert 0 < dropped.sum() < 64  # about half of the 64 samples
    torch.testing.assert_close(residual[~dropped], branch[~dropped] / 0.5)  # kept branches scaled by 1 / (1 - p)


def test_head_dropout_acts_in_training_only(model):
    regularised = copy.deepcopy(model)
    set_head_dropout(regularised, 0.5)
    assert isinstance(regularised.detect.dropout, nn.Dropout) and regularised.detect.dropout.p == 0.5
    image = torch.rand(1, 3, 64, 64)
    torch.manual_seed(0)
    with torch.no_grad():
        trained = regularised.train()(image)
    assert not all(torch.equal(a, b) for a, b in zip(trained, model.train()(image), strict=True))
    set_head_dropout(regularised, 0.0)
    assert isinstance(regularised.detect.dropout, nn.Identity)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        set_stochastic_depth(regularised, 1.0)
