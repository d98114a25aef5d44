"""GPTQ rounding of int8 weights (detector.export.int8): the convolution inputs' second moments against torch's own
convolution, and the rounding against hand-computed cases and round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from detector.export.int8 import conv_input_moments, gptq_round


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [
        ((3, 3), (1, 1), (1, 1), (1, 1)),
        ((6, 6), (2, 2), (2, 2), (1, 1)),
        ((3, 1), (2, 1), (1, 0), (2, 1)),
        ((1, 1), (1, 1), (0, 0), (1, 1)),
    ],
)
def test_conv_input_moments_weigh_a_convolutions_output_energy(kernel, stride, padding, dilation) -> None:
    """For any weight W, the squared sum of conv2d(x, W) is sum((W @ M) * W) with M the inputs' second moments:
    checked against torch's conv2d, with the map split into stripes of one output row (max_elements tiny) and whole."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64)
    weight = torch.randn(5, 3, *kernel, dtype=torch.float64)
    energy = float(F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation).square().sum())
    flat = weight.reshape(5, -1)
    for max_elements in (1, 1 << 23):
        moments = conv_input_moments(x, kernel, stride, padding, dilation, max_elements=max_elements)
        assert moments.shape == (flat.shape[1],) * 2
        assert float(((flat @ moments) * flat).sum()) == pytest.approx(energy, rel=1e-5)  # float32 products


def test_gptq_moves_a_rounding_error_onto_a_correlated_input() -> None:
    """Two inputs that are always equal, weights 0.6 and 0.6 (output 1.2 x), scale 1: round-to-nearest gives 1 and 1
    (2 x, off by 0.8 x). GPTQ rounds the first to 1 and moves its error -0.4 onto the second, whose weight 0.2
    then rounds to 0: output x, off by 0.2 x."""
    moments = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    rounded = gptq_round(torch.tensor([[0.6, 0.6]]), moments, torch.tensor([1.0]), qmax=127)
    assert rounded.tolist() == [[1.0, 0.0]]


def test_gptq_is_round_to_nearest_for_uncorrelated_inputs_and_stays_in_range() -> None:
    torch.manual_seed(1)
    weight = torch.randn(8, 40, dtype=torch.float64)
    scale = weight.abs().amax(1) / 127
    nearest = torch.clamp(torch.round(weight / scale[:, None]), -127, 127)
    diagonal = torch.diag(torch.rand(40, dtype=torch.float64) + 0.5)
    assert torch.equal(gptq_round(weight, diagonal, scale, qmax=127), nearest)
    seven_bits = gptq_round(weight, diagonal, scale * 2, qmax=64)  # 7-bit weights: clamped to [-64, 64]
    assert seven_bits.abs().max() <= 64 and torch.equal(seven_bits, torch.round(seven_bits))


def test_gptq_output_error_is_below_round_to_nearest_on_correlated_inputs() -> None:
    """Inputs with strongly correlated channels (as neighbouring pixels and feature maps are): the rounded layer's
    output error on them, |(W - scale * Q) X|^2, falls well below round-to-nearest's; more than 300 columns cross
    the 128-column blocks."""
    torch.manual_seed(2)
    mixing = torch.randn(300, 300, dtype=torch.float64) / 300**0.5 + torch.eye(300, dtype=torch.float64) * 0.1
    inputs = mixing @ torch.randn(300, 4000, dtype=torch.float64)
    weight = torch.randn(16, 300, dtype=torch.float64) * 0.05
    scale = weight.abs().amax(1) / 127
    moments = inputs @ inputs.T
    gptq = gptq_round(weight, moments, scale, qmax=127)
    nearest = torch.round(weight / scale[:, None])
    assert gptq.abs().max() <= 127 and torch.equal(gptq, torch.round(gptq))

    def error(levels: torch.Tensor) -> float:
        return float(((weight - levels * scale[:, None]) @ inputs).square().sum())

    assert error(gptq) < 0.6 * error(nearest)  # 0.48 here
