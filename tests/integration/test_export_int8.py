"""--int8 export (ONNX Runtime static quantization, OpenVINO with NNCF) on a tiny model and the tiny dataset, and
ONNX Runtime int8 of yolov5n.pt on coco128 (real data, skipped without ../shared).

Checked independently of the exporter's own check: the written files are run here in onnxruntime / OpenVINO and
compared with the PyTorch model on the dataset's real images, and their graphs are read to see that the
convolutions really are quantized and that nothing between the last convolution and the output is.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from tiny_models import yolov5_blocks_yaml
from torch import nn

from detector.data.augment import letterbox
from detector.export import export, read_metadata
from detector.export.base import validation_images
from detector.models.yolo import DetectionModel

pytestmark = [
    pytest.mark.fresh_process,  # compiles with OpenVINO (tests/conftest.py)
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

IMGSZ = 64
# int8 vs the fp32 PyTorch model on the calibration images: scores (0-1) and boxes (relative to their pixel value)
# move by at most these on average (measured: 7e-4 and 3e-3 for ONNX, 7e-4 and 2.5e-3 for OpenVINO) - and by
# something: the largest difference exceeds what an unquantized file shows (~1e-6; measured int8: 0.015).
MEAN_SCORE_TOLERANCE = 0.005
MEAN_BOX_TOLERANCE = 0.02
QUANTIZED_AT_LEAST = 1e-3


@pytest.fixture(scope="module")
def model() -> DetectionModel:
    """YOLOv5's blocks at 1/8 width with weights that keep activations at unit scale through the layers (PyTorch's
    default init shrinks them towards zero, where int8 and fp32 agree trivially), and raised objectness."""
    torch.manual_seed(0)
    model = DetectionModel(yolov5_blocks_yaml())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module not in model.detect.m:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for conv in model.detect.m:
            conv.bias.view(model.detect.na, -1)[:, 4] += 3.0
    return model.eval()


@pytest.fixture(scope="module")
def exported(model: DetectionModel, tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    project = tmp_path_factory.mktemp("int8")
    options = {"imgsz": IMGSZ, "int8": True, "data": tiny["data"], "project": str(project)}
    return export(model, include=("onnx", "openvino"), **options)


@pytest.fixture(scope="module")
def images(tiny: dict) -> torch.Tensor:
    """The tiny dataset's validation images (the calibration images), letterboxed as val.py and export do."""
    return torch.from_numpy(np.stack([_network_input(image, IMGSZ) for image in validation_images(tiny["data"], 4)]))


def _network_input(image: np.ndarray, size: int) -> np.ndarray:
    """A BGR image letterboxed to size x size as val.py and export do: (3, size, size) RGB float32 in 0-1."""
    boxed, _ = letterbox(image, (size, size), stride=32, auto=False)
    return boxed[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 255


def _assert_int8_close(got: np.ndarray, expected: torch.Tensor) -> None:
    difference = (torch.from_numpy(np.asarray(got, np.float32)) - expected).abs()
    score_error = float(difference[..., 4:].mean())
    box_error = float((difference[..., :4] / expected[..., :4].abs().clamp(min=1)).mean())
    assert score_error < MEAN_SCORE_TOLERANCE and box_error < MEAN_BOX_TOLERANCE, (score_error, box_error)
    assert float(difference.max()) > QUANTIZED_AT_LEAST  # the file computes in int8, not in float


def _decode_and_head(inputs_of: dict[str, list[str]], output: str, convolutions: set[str]) -> tuple[set, set]:
    """Walking back from ``output`` to the first convolutions: the nodes passed (the decode) and the convolutions
    reached (the Detect head's)."""
    decode, head, stack = {output}, set(), [output]
    while stack:
        for producer in inputs_of[stack.pop()]:
            if producer in convolutions:
                head.add(producer)
            elif producer not in decode:
                decode.add(producer)
                stack.append(producer)
    return decode, head


def _reads_quantized(node: str, inputs_of: dict[str, list[str]], kinds: dict[str, str]) -> bool:
    """Whether ``node`` is a FakeQuantize, or a Concat/MaxPool (which keep int8 values int8) of such nodes."""
    if kinds[node] in ("Concat", "MaxPool"):
        return all(_reads_quantized(n, inputs_of, kinds) for n in inputs_of[node])
    return kinds[node] == "FakeQuantize"


def test_onnx_int8_quantizes_the_convolutions_keeps_the_decode_float_and_matches_pytorch(
    exported: dict[str, Path], model: DetectionModel, images: torch.Tensor
) -> None:
    path = exported["onnx"]
    assert read_metadata(path)["int8"] is True
    graph = onnx.load(str(path)).graph
    producers = {output: node for node in graph.node for output in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    convolutions = {node.name: node for node in graph.node if node.op_type == "Conv"}
    assert len(convolutions) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    inputs_of = {node.name: [producers[i].name for i in node.input if i in producers] for node in graph.node}
    decode, head = _decode_and_head(inputs_of, producers[graph.output[0].name].name, set(convolutions))
    assert len(head) == model.detect.nl
    for name in set(convolutions) - head:  # int8 weights and a uint8 input: ONNX Runtime's integer convolution
        activation, weight = (producers[i] for i in convolutions[name].input[:2])
        assert activation.op_type == weight.op_type == "DequantizeLinear", name
        assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT8, name
        assert producers[activation.input[0]].op_type == "QuantizeLinear", name
    # the image's quantizer holds its pixels exactly: scale 1/255, zero point 0 (not calibrated)
    (image_quantizer,) = [node for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] == "images"]
    scale, zero_point = (onnx.numpy_helper.to_array(initializers[name]) for name in image_quantizer.input[1:3])
    assert np.isclose(scale, 1 / 255, rtol=1e-6, atol=0) and zero_point == 0 and zero_point.dtype == np.uint8
    for name in head:  # float32 weights, so the logits are never rounded to 256 levels ...
        assert initializers[convolutions[name].input[1]].data_type == onnx.TensorProto.FLOAT, name
    # ... and every node from the Detect convolutions to output0 computes in float
    kinds = {node.name: node.op_type for node in graph.node}
    assert {"Sigmoid", "Mul", "Add", "Concat"} <= {kinds[name] for name in decode}
    assert not [name for name in decode if kinds[name] in ("QuantizeLinear", "DequantizeLinear")]

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(images)
    _assert_int8_close(
        np.concatenate([session.run(None, {"images": image[None].numpy()})[0] for image in images]), expected
    )


def test_openvino_int8_quantizes_the_convolutions_keeps_the_decode_float_and_matches_pytorch(
    exported: dict[str, Path], model: DetectionModel, images: torch.Tensor
) -> None:
    import openvino

    assert read_metadata(exported["openvino"])["int8"] is True
    core = openvino.Core()
    ov_model = core.read_model(str(next(exported["openvino"].glob("*.xml"))))
    ops = ov_model.get_ordered_ops()
    inputs_of = {
        op.get_friendly_name(): [op.input_value(i).get_node().get_friendly_name() for i in range(op.get_input_size())]
        for op in ops
    }
    kinds = {op.get_friendly_name(): op.get_type_name() for op in ops}
    int8_constants = {
        op.get_friendly_name()
        for op in ops
        if kinds[op.get_friendly_name()] == "Constant" and op.get_element_type() == openvino.Type.i8
    }
    convolutions = {n for n, kind in kinds.items() if kind == "Convolution"}
    for conv in convolutions:  # NNCF: a quantized activation ...
        activation, weight = inputs_of[conv]
        assert _reads_quantized(activation, inputs_of, kinds), conv
        # ... and int8 weights: an i8 constant, dequantized
        assert _decode_and_head(inputs_of, weight, set())[0] & int8_constants, conv
    # the image's quantizer holds its pixels exactly: [0, 1] in 256 levels (NNCF's calibrated range is replaced)
    (image_quantizer,) = [
        op
        for op in ops
        if op.get_type_name() == "FakeQuantize" and kinds[inputs_of[op.get_friendly_name()][0]] == "Parameter"
    ]
    assert image_quantizer.get_levels() == 256
    bounds = [image_quantizer.input_value(port).get_node().get_data() for port in range(1, 5)]
    assert [float(np.unique(b).item()) for b in bounds] == [0.0, 1.0, 0.0, 1.0]
    result = next(n for n, kind in kinds.items() if kind == "Result")
    decode, head = _decode_and_head(inputs_of, result, convolutions)
    assert len(head) == model.detect.nl  # OpenVINO computes them in int8 and gives their output in float
    assert {"Sigmoid", "Multiply", "Add", "Concat"} <= {kinds[n] for n in decode}
    assert not [n for n in decode if kinds[n] in ("FakeQuantize", "Split", "VariadicSplit")]  # the "affine" form

    compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with torch.no_grad():
        expected = model(images)
    _assert_int8_close(np.concatenate([compiled(image[None].numpy())[0] for image in images]), expected)


def test_openvino_in_half_precision_computes_in_bf16_where_the_cpu_has_it(
    model: DetectionModel, images: torch.Tensor, tmp_path: Path
) -> None:
    """The OpenVINO backend loaded in half precision compiles with the bf16 hint on a CPU with native bfloat16
    (f32 elsewhere): its predictions then differ from the f32 run, by bf16's rounding (8-bit mantissa) only."""
    from detector.export import OpenVINOFormat
    from detector.utils.torch_utils import cpu_has_native_bf16

    folder = export(model, include=("openvino",), imgsz=IMGSZ, project=str(tmp_path))["openvino"]
    full, half = (OpenVINOFormat().load(folder, torch.device("cpu"), half=h) for h in (False, True))
    assert full.inference_precision == "f32"
    assert half.inference_precision == ("bf16" if cpu_has_native_bf16() else "f32")
    with torch.no_grad():
        expected = model(images)
    got = torch.cat([half(image[None]) for image in images])
    difference = (got - expected).abs()
    assert float(difference[..., 4:].mean()) < MEAN_SCORE_TOLERANCE
    assert float((difference[..., :4] / expected[..., :4].abs().clamp(min=1)).mean()) < MEAN_BOX_TOLERANCE
    if cpu_has_native_bf16():
        assert float(difference.max()) > QUANTIZED_AT_LEAST  # really computed in bf16


def test_onnx_int8_below_opset_13_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from detector.config import ExportConfig
    from detector.errors import ConfigError
    from detector.export import Exporter

    with pytest.raises(ConfigError, match=r"--opset: --int8 ONNX needs 13 or newer .*got 11"):
        Exporter(ExportConfig(include=("onnx",), int8=True, opset=11, project=str(tmp_path)))
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def yolov5n_int8(yolov5n_weights: Path, coco128_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """yolov5n.pt exported to int8 ONNX at 320, calibrated on coco128 (real data)."""
    return export(
        str(yolov5n_weights),
        include=("onnx",),
        imgsz=320,
        int8=True,
        data=str(coco128_dir / "coco128.yaml"),
        project=str(tmp_path_factory.mktemp("yolov5n-int8")),
    )["onnx"]


def test_onnx_int8_of_yolov5n_computes_on_this_cpu_what_its_graph_says(yolov5n_int8: Path, shared_images: Path) -> None:
    """ONNX Runtime's integer convolution on x86 CPUs without AVX512-VNNI multiplies uint8 activations by int8 weights
    with VPMADDUBSW, whose pairwise int16 sums overflow for bright pixels against 8-bit weights: yolov5n's stem did
    (scores off by up to 0.9 on such a CPU). The stem's weights keep 7 bits, so the fused integer kernels give what
    the file's QuantizeLinear/DequantizeLinear nodes define (run as written, unfused). With VNNI both hold anyway."""
    path = yolov5n_int8
    graph = onnx.load(str(path)).graph
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    (image_quantizer,) = [node for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] == "images"]
    (image,) = [node.output[0] for node in graph.node if node.input[0] == image_quantizer.output[0]]
    (stem,) = [node for node in graph.node if node.op_type == "Conv" and node.input[0] == image]
    stem_weights, stem_scales = producers[stem.input[1]].input[:2]
    levels, scales = initializers[stem_weights], initializers[stem_scales]
    assert np.abs(levels).max() <= 64 and scales.shape == levels.shape[:1]  # 7 bits, per output channel
    others = [  # the head's convolutions have float weights, no producer
        np.abs(initializers[producers[node.input[1]].input[0]]).max()
        for node in graph.node
        if node.op_type == "Conv" and node is not stem and node.input[1] in producers
    ]
    assert len(others) > 50 and min(others) == 127  # the other convolutions keep 8 bits

    unfused = onnxruntime.SessionOptions()
    unfused.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    as_written = onnxruntime.InferenceSession(str(path), unfused, providers=["CPUExecutionProvider"])
    for picture in sorted(shared_images.glob("*.jpg")):
        batch = _network_input(cv2.imread(str(picture)), 320)[None]
        got, expected = (session.run(None, {"images": batch})[0] for session in (fused, as_written))
        scores = np.abs(got[..., 4:] - expected[..., 4:])
        # rounding one level differently here and there moves scores by ~1e-3 on average; overflowed sums by more
        assert float(scores.mean()) < 2e-3, (picture.name, scores.mean(), scores.max())


def test_onnx_int8_of_yolov5n_quantizes_silu_inputs_from_the_floor_up(yolov5n_int8: Path) -> None:
    """Each convolution output that only a SiLU reads is quantized over [-6, its calibrated maximum] (yolov5n's
    calibrated minima reach -73 at 320, which spent up to 90% of the 256 levels where SiLU is within 0.015 of zero);
    the quantizer and the SiLU's Sigmoid and Mul all read the same scale and zero point, so ONNX Runtime's fused
    kernels use the floored range too."""
    from detector.export.onnx import SILU_INPUT_FLOOR

    graph = onnx.load(str(yolov5n_int8)).graph
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    floored = 0
    for quantizer in [node for node in graph.node if node.op_type == "QuantizeLinear"]:
        producer = producers.get(quantizer.input[0])
        if producer is None or producer.op_type != "Conv":
            continue
        readers = [node for node in graph.node if quantizer.output[0] in node.input]
        assert {node.op_type for node in readers} == {"DequantizeLinear"}
        assert all(node.input[1:3] == quantizer.input[1:3] for node in readers)  # one scale, one zero point
        silu = {node.op_type for reader in readers for node in graph.node if reader.output[0] in node.input}
        assert silu == {"Sigmoid", "Mul"}  # yolov5n: every quantized convolution output feeds a SiLU
        scale = float(initializers[quantizer.input[1]])
        low = -float(initializers[quantizer.input[2]]) * scale
        assert low >= SILU_INPUT_FLOOR - scale  # the zero point rounds the floor by less than a step
        floored += abs(low - SILU_INPUT_FLOOR) <= scale
    assert floored >= 20  # 35 of the 57 calibrated below -6 at 320


def test_onnx_int8_of_yolov5n_concatenates_without_requantizing_and_keeps_its_biases(
    yolov5n_int8: Path, yolov5n_weights: Path
) -> None:
    """Every quantized Concat reads its inputs with its output's scale and zero point (ONNX Runtime's integer Concat
    then copies them instead of re-quantizing each); the convolutions reading a tensor whose scale that changed keep
    their float biases (the fused PyTorch model's, within half a bias step) with the bias scale ONNX Runtime fuses:
    the input scale times the weight scale, in float32."""
    from detector.models.loading import load_model

    graph = onnx.load(str(yolov5n_int8)).graph
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    quantizers = {node.input[0]: node for node in graph.node if node.op_type == "QuantizeLinear"}

    def parameters(names: list[str]) -> tuple[float, int]:
        return float(initializers[names[0]]), int(initializers[names[1]])

    concatenations = [node for node in graph.node if node.op_type == "Concat" and node.output[0] in quantizers]
    assert len(concatenations) >= 13  # 8 C3 blocks, SPPF, 4 neck joins
    for node in concatenations:
        output = parameters(quantizers[node.output[0]].input[1:3])
        inputs = [parameters(producers[name].input[1:3]) for name in node.input]
        assert all(dequantized == output for dequantized in inputs), (node.name, inputs, output)

    fused = dict(load_model(yolov5n_weights, fuse=True).named_modules())
    checked = 0
    for node in graph.node:
        if node.op_type != "Conv" or node.input[1] not in producers:  # the head's float convolutions
            continue
        input_scale = initializers[producers[node.input[0]].input[1]]
        weight_scale = initializers[producers[node.input[1]].input[1]]
        levels_name, bias_scale_name = producers[node.input[2]].input[:2]
        bias_scale = initializers[bias_scale_name]
        np.testing.assert_array_equal(bias_scale, (input_scale * weight_scale).astype(np.float32))
        # torch's exporter names scopes like /model/model.2/m/m.0/cv1/conv/Conv: a container, then "container.index"
        scopes = node.name.strip("/").split("/")[:-1]
        after = [*scopes[1:], ""]
        path = [scope for scope, next_ in zip(scopes, after, strict=True) if not next_.startswith(f"{scope}.")]
        module = fused[".".join(path)]
        expected = module.bias.detach().numpy().astype(np.float64)
        error = np.abs(initializers[levels_name] * bias_scale.astype(np.float64) - expected)
        assert np.all(error <= 0.5 * bias_scale + 1e-7), (node.name, float((error / bias_scale).max()))
        checked += 1
    assert checked == 57


def test_onnx_int8_weights_are_gptq_rounded_except_where_gptq_does_not_apply(tiny: dict, tmp_path: Path) -> None:
    """The trunk's ordinary convolutions get GPTQ's weights (not each one's nearest step: some differ, by a step
    or so, and all stay within [-127, 127]); a grouped convolution keeps ONNX Runtime's round-to-nearest. The
    float weights come from the fused PyTorch model, the steps from the file's own per-channel scales."""
    backbone = [list(layer) for layer in yolov5_blocks_yaml()["backbone"]]
    backbone[1] = [-1, 1, "DWConv", [128, 3, 2]]  # 8 -> 16 channels in 8 groups at this width
    torch.manual_seed(0)
    model = DetectionModel(yolov5_blocks_yaml(backbone=backbone)).eval()
    path = export(model, include=("onnx",), imgsz=IMGSZ, int8=True, data=tiny["data"], project=str(tmp_path))["onnx"]
    fused = {
        name: module.weight.detach().numpy()
        for name, module in model.fuse().named_modules()
        if isinstance(module, nn.Conv2d) and module not in model.detect.m
    }
    graph = onnx.load(str(path)).graph
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    moved, grouped = [], []
    for node in graph.node:
        if node.op_type != "Conv" or node.input[1] not in producers:
            continue  # the head's float convolutions
        levels_name, scale_name = producers[node.input[1]].input[:2]
        levels, scale = initializers[levels_name], initializers[scale_name]
        # the initializer "model.model.1.conv.weight_quantized" holds the fused weights of module "model.1.conv"
        weight = fused[levels_name.removeprefix("model.").removesuffix(".weight_quantized")]
        nearest = np.clip(np.round(weight / scale[:, None, None, None]), -127, 127)
        if any(a.name == "group" and a.i > 1 for a in node.attribute):
            grouped.append(np.array_equal(levels, nearest))
        else:
            assert np.abs(levels).max() <= 127 and np.abs(levels - nearest).max() <= 4
            moved.append(float((levels != nearest).mean()))
    assert grouped == [True]
    assert len(moved) > 5 and max(moved) > 0.05  # GPTQ moved weights off their nearest step
