"""ONNX int8 export: a Concat's inputs and output share one quantization
(detector.export.onnx._share_concat_quantizers), checked on hand-built QDQ graphs against the float graph they
quantize, both run by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from detector.export.onnx import MAX_SHARED_STEP_RATIO, _share_concat_quantizers  # noqa: E402

RNG = np.random.default_rng(0)
WEIGHT = RNG.normal(0, 0.3, (3, 4, 1, 1)).astype(np.float32)  # a 1x1 convolution over the 4 concatenated channels
BIAS = RNG.normal(0, 0.5, 3).astype(np.float32)


def _quantization(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    scale = np.float32((high - low) / 255)
    return scale, np.uint8(round(-low / scale))


def _graphs(range_a: float, range_b: float) -> tuple[object, object]:
    """The float graph Concat(a, b) -> Conv, and its QDQ form as ONNX Runtime's quantizer writes it: a, b and the
    Concat output each with its own uint8 quantization over [0, its range] (the output's calibrated a little below
    the larger input's, as per-image averages of maxima come out), int8 weights per channel, an int32 bias."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 4, 4]) for name in ("a", "b")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    float_graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["c"], axis=1), helper.make_node("Conv", ["c", "w", "bias"], ["y"])],
        "float",
        inputs,
        [output],
        [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(BIAS, "bias")],
    )
    ranges = {"a": range_a, "b": range_b, "c": 0.95 * max(range_a, range_b)}
    initializers = []
    for name, high in ranges.items():
        scale, zero_point = _quantization(0.0, high)
        initializers.append(numpy_helper.from_array(scale, f"{name}_scale"))
        initializers.append(numpy_helper.from_array(zero_point, f"{name}_zp"))

    def quantized(name: str) -> list[object]:
        parameters = [f"{name}_scale", f"{name}_zp"]
        return [
            helper.make_node("QuantizeLinear", [name, *parameters], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", *parameters], [f"{name}_dq"]),
        ]

    weight_scale = (np.abs(WEIGHT).reshape(3, -1).max(1) / 127).astype(np.float32)
    bias_scale = (_quantization(0.0, ranges["c"])[0] * weight_scale).astype(np.float32)
    initializers += [
        numpy_helper.from_array(np.round(WEIGHT / weight_scale[:, None, None, None]).astype(np.int8), "w_q"),
        numpy_helper.from_array(weight_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zp"),
        numpy_helper.from_array(np.round(BIAS / bias_scale).astype(np.int32), "bias_q"),
        numpy_helper.from_array(bias_scale, "bias_scale"),
        numpy_helper.from_array(np.zeros(3, np.int32), "bias_zp"),
    ]
    nodes = [
        *quantized("a"),
        *quantized("b"),
        helper.make_node("Concat", ["a_dq", "b_dq"], ["c"], axis=1),
        *quantized("c"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=0),
        helper.make_node("DequantizeLinear", ["bias_q", "bias_scale", "bias_zp"], ["bias_dq"], axis=0),
        helper.make_node("Conv", ["c_dq", "w_dq", "bias_dq"], ["y"]),
    ]
    quantized_graph = helper.make_graph(nodes, "qdq", inputs, [output], initializers)
    opset = [helper.make_opsetid("", 17)]
    return helper.make_model(float_graph, opset_imports=opset), helper.make_model(quantized_graph, opset_imports=opset)


def _run(model: object, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _parameters(model: object) -> dict[str, float]:
    return {t.name: float(numpy_helper.to_array(t).ravel()[0]) for t in model.graph.initializer if "_scale" in t.name}


def test_a_concat_of_similar_ranges_shares_one_quantization_and_keeps_the_float_bias() -> None:
    float_model, quantized = _graphs(1.0, 1.5)
    feeds = {name: RNG.uniform(0, high, (1, 2, 4, 4)).astype(np.float32) for name, high in (("a", 1.0), ("b", 1.5))}
    _share_concat_quantizers(quantized.graph, float_model)
    parameters = _parameters(quantized)
    step = 1.5 / 255  # the union of [0, 1] and [0, 1.5]
    assert parameters["a_scale"] == parameters["b_scale"] == parameters["c_scale"] == pytest.approx(step)
    initializers = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert initializers["a_zp"] == initializers["b_zp"] == initializers["c_zp"] == 0
    np.testing.assert_array_equal(initializers["bias_scale"], np.float32(step) * initializers["w_scale"])
    bias = initializers["bias_q"] * initializers["bias_scale"].astype(np.float64)
    # quantized again at the Concat's new scale (it was calibrated at 0.95 x 1.5), from the float bias
    assert np.all(np.abs(bias - BIAS) <= 0.5 * initializers["bias_scale"])
    # what ONNX Runtime computes from the file: the float graph, but for half a step of each input (no second
    # rounding at the Concat), the weights' half steps and the bias's; twice that bound allowed
    got, expected = _run(quantized, feeds), _run(float_model, feeds)
    tolerance = step * np.abs(WEIGHT).sum(axis=(1, 2, 3)).max() + np.abs(WEIGHT).max() / 127 * 4 * 1.5
    assert np.abs(got - expected).max() < tolerance
    assert np.abs(got - expected).max() > 0  # it is quantized


def test_a_concat_of_very_different_ranges_keeps_its_own_quantizations() -> None:
    float_model, quantized = _graphs(1.0, 1.01 * MAX_SHARED_STEP_RATIO)
    before = _parameters(quantized)
    bias_before = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}["bias_q"]
    _share_concat_quantizers(quantized.graph, float_model)
    assert _parameters(quantized) == before
    np.testing.assert_array_equal(
        {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}["bias_q"], bias_before
    )
