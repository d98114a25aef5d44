"""ONNX: ``<stem>.onnx`` written by torch.onnx, run by ONNX Runtime (or OpenCV's DNN module with ``--dnn``);
metadata in ``metadata_props``.

Options: ``--opset``, ``--dynamic`` (batch, height and width free), ``--simplify`` (onnxslim), ``--half`` (fp16
graph and input), ``--nms`` (single-label NMS in the graph, :mod:`detector.export.nms`), ``--int8`` (ONNX Runtime's
static quantization of the convolution trunk, :func:`quantize_onnx`). Every metadata value is JSON-encoded
(``"stride": "32"``); YOLOv5's files, whose values are Python literals, load too.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detector.engine.backends import (
    Backend,
    apply_metadata,
    end2end_to_detections,
    exported_input_shape,
    first_line,
    shape_from_dims,
)
from detector.errors import CheckpointError, ConfigError, ExportError
from detector.export.base import INPUT_NAME, ExportContext, Format, RawOutput, quiet_tracing, register_format
from detector.export.int8 import (
    GPTQ_IMAGES,
    IMAGE_LEVELS,
    calibration_images,
    calibration_inputs,
    conv_input_moments,
    gptq_round,
    split_graph,
)
from detector.export.metadata import decode_metadata_value, nms_metadata
from detector.export.nms import NMS_OUTPUT_NAMES, NMSModel
from detector.models.head import Detect

LOGGER = logging.getLogger(__name__)

RAW_OUTPUT_NAME = "output0"
MIN_OPSET, MAX_OPSET = 11, 20  # TopK/NonMaxSuppression need 11; torch's TorchScript-based ONNX exporter stops at 20
MIN_INT8_OPSET = 13  # --int8: per-channel weights need DequantizeLinear's axis attribute
# --int8: a convolution output read only by a SiLU is quantized from here up; SiLU(-6) = -0.015, so clipping below it
# moves no output by more than that, and the levels go where SiLU is not flat (quantize_onnx)
SILU_INPUT_FLOOR = -6.0


class OnnxBackend(Backend):
    """An ONNX model run by ONNX Runtime (CUDA provider when asked for and installed, else CPU)."""

    format_name = "ONNX"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        import onnxruntime

        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                LOGGER.warning("WARNING: onnxruntime has no CUDA provider (pip install onnxruntime-gpu); using CPU")
                self.device = torch.device("cpu")
        options = onnxruntime.SessionOptions()
        # Idle intra-op threads otherwise spin after each run, taking the CPU from the letterbox and NMS that
        # follow: on 2 cores this cost ~25% more CPU time for no lower latency (measured with yolov5n at 640).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(str(weights), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise CheckpointError(f"{weights}: ONNX Runtime cannot load it ({first_line(e)})") from e
        raw = self.session.get_modelmeta().custom_metadata_map
        apply_metadata(self, {k: decode_metadata_value(v) for k, v in raw.items()}, str(weights))
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_shape = shape_from_dims(model_input.shape)
        self.fp16 = model_input.type == "tensor(float16)"
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.end2end = self.end2end or set(NMS_OUTPUT_NAMES) <= set(self.output_names)

    def forward(self, images: Tensor) -> Tensor:
        array = images.detach().cpu().numpy()  # zero-copy on CPU
        outputs = self.session.run(self.output_names, {self.input_name: array})
        if self.end2end:
            by_name = dict(zip(self.output_names, outputs, strict=True))
            return end2end_to_detections(*(torch.from_numpy(by_name[n]) for n in NMS_OUTPUT_NAMES))
        return torch.from_numpy(outputs[0])


class OpenCVDnnBackend(Backend):
    """An ONNX model run by OpenCV's DNN module (``--dnn``, as in YOLOv5): OpenCV is a dependency of ours, so an
    exported model runs without ONNX Runtime. Raw-output float32 models (not ``--nms``, ``--half`` or ``--int8``
    files, whose operators OpenCV lacks or computes differently); CPU, or CUDA where OpenCV was built with it.
    The metadata (class names, stride, input size) is read with the ``onnx`` package when it is installed;
    without it, names come from ``--data`` and the input is taken as free."""

    format_name = "ONNX (OpenCV DNN)"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        import cv2

        metadata = _metadata_without_runtime(weights)
        apply_metadata(self, metadata, str(weights))
        refused = [flag for flag in ("--nms", "--half", "--int8") if metadata.get(flag[2:])]
        if refused:
            raise ConfigError(
                f"{weights}: exported with {refused[0]}, which OpenCV's DNN module does not run; drop --dnn (ONNX "
                "Runtime runs it)"
            )
        self.input_shape = exported_input_shape(metadata)
        try:
            self.net = cv2.dnn.readNetFromONNX(str(weights))
        except cv2.error as e:
            raise CheckpointError(f"{weights}: OpenCV's DNN module cannot load it ({first_line(e)})") from e
        outputs = self.net.getUnconnectedOutLayersNames()
        if len(outputs) != 1:  # e.g. an NMS graph whose metadata was lost: detections, not predictions
            raise ConfigError(
                f"{weights}: has {len(outputs)} outputs ({', '.join(outputs)}); --dnn runs models with one raw "
                "prediction output"
            )
        if device.type == "cuda":
            if cv2.cuda.getCudaEnabledDeviceCount() > 0:
                self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
                self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)
            else:
                LOGGER.warning("WARNING: --dnn: this OpenCV was built without CUDA; running on the CPU")
        self.device = torch.device("cpu")  # inputs and outputs pass through numpy either way

    def forward(self, images: Tensor) -> Tensor:
        self.net.setInput(images.detach().cpu().float().numpy())
        return torch.from_numpy(self.net.forward())


def _metadata_without_runtime(path: Path) -> dict[str, Any]:
    """``path``'s metadata (:meth:`OnnxFormat.read_metadata`, through the ``onnx`` package), or {} with a warning
    when that package is not installed."""
    try:
        return OnnxFormat().read_metadata(path)
    except ImportError:
        LOGGER.warning(
            "WARNING: --dnn: the onnx package reads the class names and input size stored in %s "
            "(pip install onnx); without it, names come from --data",
            path,
        )
        return {}


@register_format
class OnnxFormat(Format):
    """ONNX (--opset, --dynamic, --simplify, --half, --nms, --int8); metadata in ``metadata_props``; run by
    onnxruntime."""

    name = "onnx"
    title = "ONNX"
    suffixes = (".onnx",)
    required_packages = ("onnx", "onnxruntime")
    supports_nms = True
    supports_int8 = True

    def output_path(self, ctx: ExportContext) -> Path:
        return ctx.output_stem.with_suffix(".onnx")

    def is_half(self, ctx: ExportContext) -> bool:
        return ctx.config.half and not self.uses_int8(ctx)  # an int8 graph takes float32

    def skipped_options(self, ctx: ExportContext) -> dict[str, str]:
        skipped = super().skipped_options(ctx)
        if ctx.config.half and self.uses_int8(ctx):
            skipped["half"] = "not applied: the int8 graph takes float32 input and keeps its decode in float32"
        return skipped

    def write(self, ctx: ExportContext) -> Path:
        flavor = "nms" if self.uses_nms(ctx) else "raw"
        if self.uses_int8(ctx):
            return write_int8_onnx(ctx, self.output_path(ctx), flavor=flavor)
        half = self.is_half(ctx)
        path = write_onnx(ctx, self.output_path(ctx), flavor=flavor, half=half, simplify=ctx.config.simplify)
        if flavor == "raw" and not ctx.config.simplify:
            ctx._onnx_files.setdefault(("raw", half), path)  # OpenVINO can convert this one
        return path

    def load(self, path: Path, device: torch.device, half: bool) -> Backend:
        return OnnxBackend(path, device, half)

    def read_metadata(self, path: Path) -> dict[str, Any]:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: decode_metadata_value(p.value) for p in proto.metadata_props}

    def nms_reference_predictions(self, images: Tensor, ctx: ExportContext) -> tuple[Tensor, bool]:
        # The same graph without NMS, in the same runtime: its predictions are the ones the NMS op saw.
        from detector.engine.backends import load_backend

        if self.uses_int8(ctx):  # the raw graph quantized alike: same calibration, so the same trunk
            raw_file = ctx.work_dir / f"{ctx.output_stem.name}_raw_int8.onnx"
            if not raw_file.is_file():
                write_int8_onnx(ctx, raw_file, flavor="raw")
        else:
            raw_file = ctx.onnx_file("raw", self.is_half(ctx))
        return load_backend(raw_file, self.check_device(ctx))(images), True


def write_onnx(
    ctx: ExportContext, path: Path, *, flavor: str, half: bool, simplify: bool, for_openvino: bool = False
) -> Path:
    """Export the model to ONNX at ``path``: flavor "raw" (output0), "nms" (ONNX NonMaxSuppression) or
    "tensorrt" (EfficientNMS_TRT node, only TensorRT can run it). Metadata goes into ``metadata_props``.

    ``for_openvino`` makes the graph OpenVINO's CPU plugin runs fastest: traced in NHWC memory, so the Detect head
    takes its NHWC branch (channels last first), the layout OpenVINO's CPU convolutions produce (its int8 yolov5n
    at 640: 16.1 against 20.7 ms), and with the decode in its "affine" form (:attr:`Detect.traced_decode`: no
    split and concatenation of the 85-value rows; 3-4% less int8 latency). ONNX Runtime ran both 2-4% and about
    2% slower, so its own files keep the NCHW trace and the "slices" decode.
    """
    import onnx

    config = ctx.config
    model: nn.Module = RawOutput(ctx.model_in(half))
    if flavor != "raw":
        model = NMSModel(model, config, "tensorrt" if flavor == "tensorrt" else "onnx")
    example = ctx.example_input(ctx.export_shape, half=half)
    if for_openvino:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
        for module in model.modules():
            if isinstance(module, Detect):
                module.traced_decode = "affine"
    trace_to_onnx(model, example, path, opset=config.opset, nms=flavor != "raw", dynamic=config.dynamic)
    proto = onnx.load(str(path))
    if simplify:
        proto = _simplify_onnx(proto)
    if flavor != "raw":
        _set_detection_output_shapes(proto, config.topk_all)
    metadata = ctx.metadata if flavor == "raw" else nms_metadata(ctx.metadata, config)
    _set_metadata(proto, metadata)
    if flavor != "tensorrt":  # the checker does not know TRT:: plugin ops
        onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _set_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    """Replace the model's ``metadata_props`` with ``metadata``, each value JSON-encoded."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def write_int8_onnx(ctx: ExportContext, path: Path, *, flavor: str) -> Path:
    """The float32 graph of ``flavor`` ("raw" or "nms") written to the work folder, then quantized by
    :func:`quantize_onnx` and written to ``path``; its metadata gains ``"int8": true``."""
    import onnx

    float_file = write_onnx(
        ctx, ctx.work_dir / f"{path.stem}_float.onnx", flavor=flavor, half=False, simplify=ctx.config.simplify
    )
    proto = quantize_onnx(float_file, ctx)
    metadata = {p.key: decode_metadata_value(p.value) for p in proto.metadata_props if not p.key.startswith("onnx.")}
    _set_metadata(proto, {**metadata, "int8": True})
    onnx.save(proto, str(path))
    return path


def quantize_onnx(source: Path, ctx: ExportContext) -> Any:
    """ONNX Runtime static quantization of ``source`` (QDQ format), calibrated on ``--data``: the quantized
    ModelProto, for the caller to save.

    Only the convolution trunk is quantized: int8 weights per output channel (symmetric), uint8 activations whose
    ranges are the mean over the calibration images of each image's minimum and maximum (less swayed by one
    outlier image than the overall extremes, as NNCF does). ONNX Runtime runs a Conv between QuantizeLinear nodes
    as an integer convolution (VNNI where the CPU has it), so it would quantize a convolution's output too: the
    Detect head's 1x1 convolutions stay float32 with the decode after them
    (:func:`detector.export.int8.split_graph`), so the logits that become boxes and scores are not rounded to
    256 levels.

    The convolutions reading the image keep 7-bit weights (in [-64, 64], still per channel). On x86 CPUs without
    AVX512-VNNI ONNX Runtime multiplies uint8 by int8 with VPMADDUBSW, which adds neighbouring products in int16:
    two pixels of 130 or more against 8-bit weights near 127 overflow it. Pixels are the network's brightest
    uint8 inputs (zero point 0, bright areas at 200-255); yolov5n's later layers, whose activations sit near their
    zero points, compute what the graph defines with 8 bits (a model with brighter inner activations can still
    overflow there; the exporter's check, run on the exporting CPU, then fails). yolov5n at 640 on coco128
    (rectangular batches), on an AVX2-only CPU: mAP50-95 0.325 with an 8-bit stem, 0.347 with 7 bits (run as
    written, as VNNI computes it: 0.348 and 0.343); 7-bit weights everywhere cost a point (0.335).

    A convolution whose output only a SiLU reads (``x * sigmoid(x)``, every one in YOLOv5's trunk) has that output
    quantized from :data:`SILU_INPUT_FLOOR` up rather than from its calibrated minimum (down to -85 in yolov5n),
    since SiLU maps everything below it to within 0.015 of zero: the 256 levels then cover the part of the range
    that reaches the next layer, in steps up to 4x finer (:func:`_floor_silu_inputs`). yolov5n at 640 on coco128:
    mAP50-95 0.347 -> 0.354 rectangular, 0.348 -> 0.351 square (as written: 0.343 -> 0.352, 0.345 -> 0.352).

    Each Concat's inputs and output then share one quantization, so that ONNX Runtime's integer Concat only copies
    (:func:`_share_concat_quantizers`), and the int8 weights are re-rounded by GPTQ on the first
    :data:`~detector.export.int8.GPTQ_IMAGES` calibration images (:func:`_round_weights_by_gptq`).
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    prepared = ctx.work_dir / f"{source.stem}_prepared.onnx"
    quantized_file = ctx.work_dir / f"{source.stem}_quantized.onnx"
    # ONNX Runtime's recommended preparation: shape inference and its basic graph optimizations (constant folding;
    # Identity nodes removed - torch's exporter feeds identical biases, e.g. of an untrained model, through them)
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    prepared_model = onnx.load(str(prepared))
    graph = prepared_model.graph
    producers = {output: node.name for node in graph.node for output in node.output}
    inputs_of = {node.name: [producers[i] for i in node.input if i in producers] for node in graph.node}
    split = split_graph(inputs_of, [node.name for node in graph.node if node.op_type == "Conv"])
    images = calibration_images(ctx)
    LOGGER.info(f"ONNX: int8 calibration on {len(images)} {ctx.check_source} images")
    try:
        quantize_static(
            str(prepared),
            str(quantized_file),
            _CalibrationReader(calibration_inputs(ctx, images)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=sorted(split.decode | split.head),
            extra_options={
                "CalibMovingAverage": True,  # mean of the per-image minima and maxima
                # the input's own levels, not calibrated: lossless (detector.export.int8.IMAGE_LEVELS)
                "TensorQuantOverrides": {
                    INPUT_NAME: [
                        {"scale": np.array(1 / (IMAGE_LEVELS - 1), np.float32), "zero_point": np.array(0, np.uint8)}
                    ],
                    # 7-bit weights where the pixels come in (docstring): no int16 saturation without VNNI
                    **{name: [{"reduce_range": True, "axis": 0}] for name in _image_convolution_weights(graph)},
                },
            },
        )
        quantized = onnx.load(str(quantized_file))
    finally:
        prepared.unlink(missing_ok=True)
        quantized_file.unlink(missing_ok=True)
    _floor_silu_inputs(quantized.graph, _silu_inputs(graph))
    _share_concat_quantizers(quantized.graph, prepared_model)
    _round_weights_by_gptq(quantized.graph, prepared_model, calibration_inputs(ctx, images[:GPTQ_IMAGES]))
    return quantized


def _silu_inputs(graph: Any) -> list[str]:
    """The outputs of the convolutions that only a SiLU reads: ``Mul(x, Sigmoid(x))``, as torch exports nn.SiLU."""
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        output = node.output[0]
        by_type = {reader.op_type: reader for reader in readers.get(output, [])}
        if (
            len(readers.get(output, [])) == 2
            and by_type.keys() == {"Sigmoid", "Mul"}
            and sorted(by_type["Mul"].input) == sorted([output, by_type["Sigmoid"].output[0]])
        ):
            found.append(output)
    return found


def _floor_silu_inputs(graph: Any, tensors: Sequence[str]) -> None:
    """Re-quantize each of ``tensors`` (convolution outputs that a SiLU reads) from :data:`SILU_INPUT_FLOOR` up to
    its calibrated maximum where its calibrated minimum lies below the floor (ONNX Runtime's own scale and zero
    point arithmetic; the quantizer and all its dequantizers share them)."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    quantizers = {node.input[0]: node for node in graph.node if node.op_type == "QuantizeLinear"}
    own = _read_with_own_parameters(graph, quantizers)
    for name in tensors:
        if name not in own:  # left in float, or a dequantizer with parameters of its own: left as calibrated
            continue
        scale_name, zero_point_name = quantizers[name].input[1:3]
        low, high = _quantized_range(initializers, scale_name, zero_point_name)
        if low >= SILU_INPUT_FLOOR:
            continue
        _set_quantization(
            initializers,
            scale_name,
            zero_point_name,
            *_quantization_of(initializers, zero_point_name, SILU_INPUT_FLOOR, high),
        )


def _read_with_own_parameters(graph: Any, quantizers: dict[str, Any]) -> set[str]:
    """The quantized tensors (keys of ``quantizers``) whose every DequantizeLinear reads its quantizer's own scale
    and zero point initializers: those can be re-quantized by changing the initializers alone."""
    read: dict[str, set[tuple[str, ...]]] = {}  # a quantizer's output -> the (scale, zero point) names read from it
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            read.setdefault(node.input[0], set()).add(tuple(node.input[1:3]))
    return {
        tensor
        for tensor, quantizer in quantizers.items()
        if read.get(quantizer.output[0], set()) <= {tuple(quantizer.input[1:3])}
    }


def _quantized_range(initializers: dict[str, Any], scale_name: str, zero_point_name: str) -> tuple[float, float]:
    """The real values of the lowest and highest integer level of a quantization (float64)."""
    import numpy as np
    from onnx import numpy_helper

    scale = numpy_helper.to_array(initializers[scale_name]).astype(np.float64)
    zero_point = numpy_helper.to_array(initializers[zero_point_name])
    levels = np.iinfo(zero_point.dtype)
    low, high = ((level - zero_point.astype(np.float64)) * scale for level in (levels.min, levels.max))
    return float(low), float(high)


def _quantization_of(initializers: dict[str, Any], zero_point_name: str, low: float, high: float) -> tuple[Any, Any]:
    """ONNX Runtime's float32 scale and zero point for the range [low, high], in the integer type of the zero point
    ``zero_point_name`` names."""
    import numpy as np
    from onnx import numpy_helper
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    kind = numpy_helper.to_array(initializers[zero_point_name]).dtype
    levels = np.iinfo(kind)
    zero_point, scale = compute_scale_zp(
        np.array(low, np.float32), np.array(high, np.float32), np.array(levels.min, kind), np.array(levels.max, kind)
    )
    return scale.astype(np.float32), zero_point.astype(kind)


def _set_quantization(
    initializers: dict[str, Any], scale_name: str, zero_point_name: str, scale: Any, zero_point: Any
) -> None:
    """Write ``scale`` and ``zero_point`` into the initializers of those names (shared by a quantizer and its
    dequantizers)."""
    from onnx import numpy_helper

    initializers[scale_name].CopyFrom(numpy_helper.from_array(scale, scale_name))
    initializers[zero_point_name].CopyFrom(numpy_helper.from_array(zero_point, zero_point_name))


# operators whose quantized output ONNX Runtime gives the quantization of their first input (so they can run on the
# integer values as they are); Concat joins them when its inputs and output share one quantization too
_PASS_THROUGH_OPERATORS = ("Resize", "MaxPool")
# a Concat group keeps its own quantizations where the shared one's step would exceed a member's by more than this
# (branches of very different ranges: the narrow one would lose too many levels); yolov5n's groups reach 1.56
MAX_SHARED_STEP_RATIO = 2.0


def _share_concat_quantizers(graph: Any, float_model: Any) -> None:
    """Give every quantized Concat's inputs and output one scale and zero point, over the union of their calibrated
    ranges, so that ONNX Runtime's integer Concat copies its inputs instead of re-quantizing each one (a rounding
    less at every C3 block and neck join). Tensors linked through Concat, Resize and MaxPool form one group
    (:func:`_concat_groups`); the int32 biases of the convolutions that read a changed tensor are quantized again
    from ``float_model``'s (the graph before quantization) at the new scale.

    A group whose shared step would exceed a member's own by more than :data:`MAX_SHARED_STEP_RATIO` keeps its
    calibrated quantizations. yolov5n at 640 (ONNX Runtime on a VNNI CPU): 0.89-0.91x of ONNX Runtime fp32's batch-1
    latency against 0.94-0.95x before (alternated in one process); the score error against fp32 unchanged, mAP50-95
    0.3598 on average over four calibration sets against 0.3575.
    """
    import numpy as np
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    quantizers = {node.input[0]: node for node in graph.node if node.op_type == "QuantizeLinear"}
    bias_of = {node.input[2]: node.name for node in float_model.graph.node if node.op_type == "Conv" and node.input[2:]}
    float_biases = {  # convolution -> its float bias
        bias_of[tensor.name]: numpy_helper.to_array(tensor)
        for tensor in float_model.graph.initializer
        if tensor.name in bias_of
    }

    def array(name: str) -> Any:
        return numpy_helper.to_array(initializers[name])

    new_scales: dict[str, Any] = {}  # tensor -> its new scale (float32)
    for members in _concat_groups(graph, producers, quantizers):
        parameters = [quantizers[tensor].input[1:3] for tensor in members]  # (scale, zero point) initializer names
        if len({array(zero_point_name).dtype for _, zero_point_name in parameters}) > 1:
            continue  # uint8 and int8 activations side by side: left as calibrated
        lows, highs = zip(*(_quantized_range(initializers, *names) for names in parameters), strict=True)
        scale, zero_point = _quantization_of(initializers, parameters[0][1], min(lows), max(highs))
        if float(scale) > MAX_SHARED_STEP_RATIO * min(float(array(scale_name)) for scale_name, _ in parameters):
            continue
        for tensor, names in zip(members, parameters, strict=True):
            _set_quantization(initializers, *names, scale, zero_point)
            new_scales[tensor] = scale
    for node in graph.node:  # the int32 biases: scale = input scale x weight scale, as ONNX Runtime fuses them
        source = _quantized_source(node.input[0], producers) if node.op_type == "Conv" else None
        if source not in new_scales or node.name not in float_biases:
            continue
        weight_dequantizer, bias_dequantizer = producers.get(node.input[1]), producers.get(node.input[2])
        if weight_dequantizer is None or bias_dequantizer is None or bias_dequantizer.op_type != "DequantizeLinear":
            continue
        levels_name, bias_scale_name = bias_dequantizer.input[:2]
        bias_scale = (new_scales[source] * array(weight_dequantizer.input[1])).astype(np.float32)
        bias_levels = np.round(float_biases[node.name].astype(np.float64) / bias_scale.astype(np.float64))
        initializers[levels_name].CopyFrom(numpy_helper.from_array(bias_levels.astype(np.int32), levels_name))
        initializers[bias_scale_name].CopyFrom(numpy_helper.from_array(bias_scale, bias_scale_name))


def _quantized_source(tensor: str, producers: dict[str, Any]) -> str | None:
    """The float tensor whose QuantizeLinear feeds the DequantizeLinear that produces ``tensor``, if any."""
    dequantizer = producers.get(tensor)
    if dequantizer is None or dequantizer.op_type != "DequantizeLinear":
        return None
    quantizer = producers.get(dequantizer.input[0])
    return quantizer.input[0] if quantizer is not None and quantizer.op_type == "QuantizeLinear" else None


def _concat_groups(graph: Any, producers: dict[str, Any], quantizers: dict[str, Any]) -> list[list[str]]:
    """The quantized tensors that Concat, Resize and MaxPool nodes link (each node's quantized inputs - the first
    only for Resize and MaxPool - with its quantized output), as groups of two or more whose quantizers' parameters
    nothing outside the group reads or shares (ONNX Runtime gives Resize and MaxPool outputs their input's
    initializers): each group can share one scale and zero point. ``producers`` maps each tensor to the node
    writing it, ``quantizers`` each quantized tensor to its QuantizeLinear."""
    own = _read_with_own_parameters(graph, quantizers)
    parent: dict[str, str] = {}  # union-find

    def root(tensor: str) -> str:
        while parent.setdefault(tensor, tensor) != tensor:
            tensor = parent[tensor]
        return tensor

    for node in graph.node:
        if node.output[0] not in quantizers or node.op_type not in ("Concat", *_PASS_THROUGH_OPERATORS):
            continue
        for name in node.input if node.op_type == "Concat" else node.input[:1]:
            source = _quantized_source(name, producers)
            if source is not None:
                parent[root(source)] = root(node.output[0])
    groups: dict[str, list[str]] = {}
    for tensor in list(parent):
        groups.setdefault(root(tensor), []).append(tensor)
    users: dict[str, set[str]] = {}  # a scale or zero point initializer -> the tensors quantized with it
    for tensor, quantizer in quantizers.items():
        for name in quantizer.input[1:3]:
            users.setdefault(name, set()).add(tensor)
    return [
        members
        for members in groups.values()
        if len(members) > 1
        and all(
            tensor in own and all(users[name] <= set(members) for name in quantizers[tensor].input[1:3])
            for tensor in members
        )
    ]


def _round_weights_by_gptq(graph: Any, float_model: Any, inputs: Iterator[Any]) -> None:
    """Re-round the int8 weights of ``graph``'s quantized convolutions by GPTQ (:func:`detector.export.int8.
    gptq_round`), each weighed by its inputs' second moments in ``float_model`` (the graph before quantization)
    on ``inputs``; ONNX Runtime's per-channel scales, and so the biases' int32 scales, stay as they are.

    yolov5n at 640 on coco128 (ONNX Runtime on a VNNI CPU, rectangular batches), four calibration sets each
    exported both ways: the mean |error| of the confident anchors' scores against fp32 falls by 11-16% in each
    (mean 0.0237 -> 0.0205) and mAP50-95 rises in each (mean 0.350 -> 0.3575; fp32 0.370). Convolutions with
    groups, asymmetric or automatic padding, weights with a zero point or weights computed in the graph keep ONNX
    Runtime's rounding.
    """
    import numpy as np
    import onnxruntime
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    dequantizers = {node.output[0]: node for node in graph.node if node.op_type == "DequantizeLinear"}
    float_convolutions = {node.name: node for node in float_model.graph.node if node.op_type == "Conv"}
    float_weights = {tensor.name: tensor for tensor in float_model.graph.initializer}
    targets = {}  # convolution -> (its float input, float weight, int8 weight, scale, conv parameters)
    for node in graph.node:
        weight_dequantizer = dequantizers.get(node.input[1]) if node.op_type == "Conv" else None
        if weight_dequantizer is None or node.name not in float_convolutions:
            continue
        quantized_name, scale_name = weight_dequantizer.input[:2]
        zero_point_name = weight_dequantizer.input[2] if len(weight_dequantizer.input) > 2 else ""
        float_conv = float_convolutions[node.name]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        pads = list(attributes.get("pads", [0, 0, 0, 0]))
        if (
            attributes.get("group", 1) != 1
            or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or len(pads) != 4
            or pads[:2] != pads[2:]
            or float_conv.input[1] not in float_weights
            or (zero_point_name and np.any(numpy_helper.to_array(initializers[zero_point_name]) != 0))
        ):
            continue
        kernel = numpy_helper.to_array(initializers[quantized_name]).shape[2:]
        parameters = (kernel, attributes.get("strides", [1, 1]), pads[:2], attributes.get("dilations", [1, 1]))
        targets[node.name] = (float_conv.input[0], float_conv.input[1], quantized_name, scale_name, parameters)
    if not targets:
        return
    probe = copy.deepcopy(float_model)  # the float graph, with every quantized convolution's input as an output
    conv_inputs = sorted({target[0] for target in targets.values()})
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in conv_inputs)
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    moments: dict[str, Any] = {}
    count = 0
    for image in inputs:
        count += 1
        values = dict(zip(conv_inputs, session.run(conv_inputs, {INPUT_NAME: image}), strict=True))
        for name, (input_name, *_, parameters) in targets.items():
            moment = conv_input_moments(torch.from_numpy(values[input_name]), *parameters)
            moments[name] = moments[name] + moment if name in moments else moment
    if not moments:  # no calibration image: ONNX Runtime's rounding stays
        return
    for name, (_, weight_name, quantized_name, scale_name, _) in targets.items():
        old = numpy_helper.to_array(initializers[quantized_name])
        weight = torch.from_numpy(numpy_helper.to_array(float_weights[weight_name]).reshape(len(old), -1).copy())
        scale = torch.from_numpy(numpy_helper.to_array(initializers[scale_name]).copy())
        rounded = gptq_round(weight, moments[name], scale, qmax=int(np.abs(old).max()))
        new = rounded.numpy().astype(old.dtype).reshape(old.shape)
        initializers[quantized_name].CopyFrom(numpy_helper.from_array(new, quantized_name))
    LOGGER.info(f"ONNX: int8 weights of {len(targets)} convolutions rounded by GPTQ on {count} calibration images")


def _image_convolution_weights(graph: Any) -> list[str]:
    """The weight initializers of the convolutions that read the network input (YOLOv5's stem)."""
    return [node.input[1] for node in graph.node if node.op_type == "Conv" and node.input[0] == INPUT_NAME]


class _CalibrationReader:
    """ONNX Runtime's calibration data reader protocol (``get_next``: one input dict, then None) over images."""

    def __init__(self, inputs: Iterator[Any]) -> None:
        self.inputs = inputs

    def get_next(self) -> dict[str, Any] | None:
        image = next(self.inputs, None)
        return None if image is None else {INPUT_NAME: image}


def trace_to_onnx(module: nn.Module, example: Tensor, path: Path, *, opset: int, nms: bool, dynamic: bool) -> None:
    """torch.onnx.export with our tensor names: input ``images``; output ``output0``, or the four NMS outputs.

    ``dynamic`` frees the input's batch/height/width and the outputs' batch (and N of output0).
    """
    output_names = list(NMS_OUTPUT_NAMES) if nms else [RAW_OUTPUT_NAME]
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
        dynamic_axes.update({name: {0: "batch"} for name in output_names})
        if not nms:
            dynamic_axes[RAW_OUTPUT_NAME] = {0: "batch", 1: "anchors"}
    module.eval()  # the exporter restores the module's mode afterwards, recursively: a wrapper must be eval too
    with quiet_tracing(), torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,  # the torch.export-based exporter needs onnxscript and cannot map our NMS Functions
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _simplify_onnx(proto: Any) -> Any:
    """Constant folding and graph clean-up with onnxslim (--simplify)."""
    try:
        import onnxslim
    except ImportError as e:
        raise ExportError("--simplify needs onnxslim (pip install onnxslim)") from e
    return onnxslim.slim(proto)


def _set_detection_output_shapes(proto: Any, topk_all: int) -> None:
    """Write the fixed detection count into the NMS outputs' declared shapes (tracing leaves it symbolic)."""
    for output in proto.graph.output:
        if output.name in NMS_OUTPUT_NAMES[1:]:
            dims = output.type.tensor_type.shape.dim
            if len(dims) >= 2:
                dims[1].ClearField("dim_param")
                dims[1].dim_value = topk_all
