"""detector.models.acnet: ACNet blocks fold into one 3x3 conv with the same outputs, in a block and in a model, and
their checkpoints load and fold like plain ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import yolov5_blocks_yaml
from torch import nn

from detector.config import TrainConfig
from detector.models.acnet import ACConv, convert_to_acnet
from detector.models.blocks import Conv
from detector.models.loading import checkpoint_model_entries, load_model
from detector.models.loss import DetectionLoss
from detector.models.yolo import DetectionModel
from detector.utils.checkpoint import save_checkpoint


def _randomise_norms(module: nn.Module, seed: int = 0) -> None:
    """Trained-looking BatchNorms: random scales, shifts and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            channels = norm.num_features
            norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(channels, generator=generator))
            norm.running_mean.copy_(torch.randn(channels, generator=generator))
            norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)


@pytest.mark.parametrize(("stride", "groups"), [(1, 1), (2, 1), (2, 8)])
def test_block_equals_its_three_branches_and_folds_into_one_conv(stride: int, groups: int) -> None:
    torch.manual_seed(0)
    block = ACConv(8, 16, 3, stride, groups=groups).eval()
    _randomise_norms(block)
    x = torch.randn(2, 8, 9, 10)

    def branch(conv: nn.Conv2d, norm: nn.BatchNorm2d, padding: tuple[int, int]) -> torch.Tensor:
        y = F.conv2d(x, conv.weight, stride=stride, padding=padding, groups=groups)
        return F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps)

    with torch.no_grad():
        expected = F.silu(
            branch(block.conv, block.bn, (1, 1))
            + branch(block.conv_h, block.bn_h, (0, 1))
            + branch(block.conv_v, block.bn_v, (1, 0))
        )
        unfolded = block(x)
        block.fuse()
        folded = block(x)
    torch.testing.assert_close(unfolded, expected)
    torch.testing.assert_close(folded, unfolded, rtol=0, atol=1e-4)
    assert block.folded and block.conv.kernel_size == (3, 3) and block.conv.bias is not None
    assert [name for name, _ in block.named_children()] == ["conv", "bn", "act"]  # branches gone


def test_conversion_replaces_only_3x3_convs_and_keeps_their_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(Conv(4, 8, 3, 2), Conv(8, 8, 1), Conv(8, 8, 5), Conv(8, 8, 3, dilation=2))
    square_weight = layer[0].conv.weight.clone()
    converted = convert_to_acnet(layer)
    assert [type(m).__name__ for m in converted] == ["ACConv", "Conv", "Conv", "Conv"]
    assert torch.equal(converted[0].conv.weight, square_weight)  # plain weights transfer into the 3x3 branch
    assert isinstance(convert_to_acnet(Conv(4, 8, 3)), ACConv)  # a layer that is itself a 3x3 Conv


def _trained_acnet_model() -> DetectionModel:
    """The YOLOv5-blocks model with ACNet, one SGD step on random images and boxes (finite loss checked)."""
    torch.manual_seed(0)
    model = DetectionModel(yolov5_blocks_yaml(), acnet=True)
    loss_fn = DetectionLoss(model, TrainConfig().hyp)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scale_before = model.model[1].bn_h.weight.clone()
    assert not scale_before.any()  # the branches start silent: the block starts as its 3x3 conv
    loss = sum(loss_fn(model(images), targets).values())
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.model[1].bn_h.weight, scale_before)  # the asymmetric branches train
    _randomise_norms(model)
    return model.eval()


def test_model_with_acnet_trains_and_folds_into_the_plain_architecture() -> None:
    model = _trained_acnet_model()
    plain = DetectionModel(yolov5_blocks_yaml())
    three_by_three = sum(isinstance(m, Conv) and m.conv.kernel_size == (3, 3) for m in plain.modules())
    assert sum(isinstance(m, ACConv) for m in model.modules()) == three_by_three > 0
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unfused = model.forward_raw(images)
        fused = model.fuse().forward_raw(images)
        # Folded, it is the plain model's fused architecture: its weights load into that model, same outputs.
        plain.fuse().load_state_dict(model.state_dict())
        plain_outputs = plain.eval().forward_raw(images)
    for a, b, c in zip(unfused, fused, plain_outputs, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
        torch.testing.assert_close(c, b)


def test_checkpoint_of_an_acnet_model_loads_and_loads_fused(tmp_path) -> None:
    model = _trained_acnet_model()
    path = tmp_path / "acnet.pt"
    save_checkpoint(checkpoint_model_entries(model), path)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    loaded, fused = load_model(path), load_model(path, fuse=True)
    assert loaded.yaml["acnet"] is True and not any(isinstance(m, ACConv) and m.folded for m in loaded.modules())
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(loaded(images), expected)
        torch.testing.assert_close(fused(images), expected, rtol=1e-4, atol=1e-3)  # decoded: boxes in pixels
    with pytest.raises(ValueError, match="cannot checkpoint a fused model"):
        checkpoint_model_entries(fused)


def test_a_converted_conv_starts_as_the_conv_it_replaces() -> None:
    # Zero-initialised branch scales: converting a trained model (--acnet --weights ...) keeps its outputs, in
    # training (batch statistics) and in eval mode, until the scales have trained.
    torch.manual_seed(0)
    conv = Conv(4, 8, 3, 1)
    block = ACConv.from_conv(conv)
    images = torch.rand(2, 4, 16, 16)
    for mode in (True, False):
        conv.train(mode), block.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(block(images), conv(images))
