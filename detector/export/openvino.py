"""OpenVINO IR: ``<stem>_openvino_model/`` with ``<stem>.xml``, ``<stem>.bin`` and ``metadata.yaml``.

Converted from our raw ONNX file with ``openvino.convert_model`` and saved with ``openvino.save_model``.
``--half`` stores fp16 weights (the graph computes in fp32); ``--int8`` quantizes the convolution trunk with NNCF
(an optional package, ``pip install nncf``) calibrated on ``--data``'s validation images, the built-in dataset's
without ``--data``, and keeps the Detect decode in float (:mod:`detector.export.int8`).
The IR never holds NMS.
The backend computes in f32, or in bf16 when asked for half precision on a CPU with native bfloat16.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from detector.engine.backends import Backend, apply_metadata, first_line, shape_from_dims
from detector.errors import CheckpointError
from detector.export.base import ExportContext, Format, register_format
from detector.export.int8 import IMAGE_LEVELS, calibration_images, split_graph

LOGGER = logging.getLogger(__name__)

FOLDER_SUFFIX = "_openvino_model"
METADATA_FILE = "metadata.yaml"


class OpenVinoBackend(Backend):
    """An OpenVINO IR (``*_openvino_model/`` folder or its ``.xml``) compiled for the CPU with a latency hint."""

    format_name = "OpenVINO"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        import openvino

        if device.type != "cpu":
            LOGGER.warning("WARNING: the OpenVINO backend runs on the CPU; ignoring --device %s", device)
            self.device = torch.device("cpu")
        xml = _xml_file(weights)
        metadata_file = xml.parent / METADATA_FILE
        apply_metadata(self, _read_metadata_file(metadata_file), str(metadata_file))
        core = openvino.Core()
        try:
            model = core.read_model(str(xml))
        except RuntimeError as e:
            raise CheckpointError(f"{xml}: OpenVINO cannot read it ({first_line(e)})") from e
        partial_shape = model.inputs[0].get_partial_shape()
        self.input_shape = shape_from_dims(
            [d.get_length() if d.is_static else None for d in partial_shape]  # type: ignore[union-attr]
        )
        self.fp16 = False  # OpenVINO takes float32 inputs even for FP16-compressed weights
        # f32 unless half precision is asked for: on CPUs with bf16 units OpenVINO would otherwise compute in bf16
        self.inference_precision = inference_precision(half)
        compiled = core.compile_model(
            model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self.inference_precision}
        )
        self.request = compiled.create_infer_request()
        self.output = compiled.output(0)

    def __repr__(self) -> str:  # what it computes in: bf16 only when asked for (--half) on a CPU with native bf16
        return f"{super().__repr__()[:-1]}, inference_precision={self.inference_precision!r})"

    def forward(self, images: Tensor) -> Tensor:
        # share_inputs: OpenVINO reads the array in place (it copies one that is not contiguous). The output is
        # already a copy the request will not overwrite (share_outputs is off), so it is wrapped, not copied again:
        # at 640 each of those copies of the 8.6 MB output and 4.9 MB input cost 1-2 ms per image.
        result = self.request.infer({0: images.detach().cpu().numpy()}, share_inputs=True)
        return torch.from_numpy(result[self.output])


def inference_precision(half: bool) -> str:
    """OpenVINO's CPU inference precision: "bf16" for ``half`` on a CPU with native bfloat16 (AVX512-BF16, AMX),
    where it runs about 1.6x faster than f32 (yolov5n at 640), else "f32" (OpenVINO's CPU plugin has no fp16
    compute on x86 without AVX512-FP16, and emulated bf16 is slower than f32)."""
    from detector.utils.torch_utils import cpu_has_native_bf16, no_native_bf16_reason

    if not half:
        return "f32"
    if cpu_has_native_bf16():
        return "bf16"
    LOGGER.warning(f"WARNING: {no_native_bf16_reason()}; OpenVINO runs in f32")
    return "f32"


def _xml_file(weights: Path) -> Path:
    if weights.suffix.lower() == ".xml":
        return weights
    xml = next(iter(sorted(weights.glob("*.xml"))), None)
    if xml is None:
        raise CheckpointError(f"{weights}: OpenVINO folder has no .xml model")
    return xml


def _read_metadata_file(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


@register_format
class OpenVINOFormat(Format):
    """OpenVINO IR from our ONNX file; ``--half`` compresses the weights to fp16, ``--int8`` quantizes with NNCF."""

    name = "openvino"
    title = "OpenVINO"
    suffixes = (FOLDER_SUFFIX, ".xml")
    required_packages = ("openvino", "onnx")
    supports_int8 = True

    @classmethod
    def matches(cls, path: Path) -> bool:
        return (
            path.name.endswith(FOLDER_SUFFIX)
            or path.suffix.lower() == ".xml"
            or (path.is_dir() and any(path.glob("*.xml")))
        )

    def output_path(self, ctx: ExportContext) -> Path:
        return ctx.output_stem.parent / f"{ctx.output_stem.name}{FOLDER_SUFFIX}"

    def is_half(self, ctx: ExportContext) -> bool:
        return False  # the graph stays fp32; --half only compresses the stored weights

    def precision(self, ctx: ExportContext) -> str:
        if self.uses_int8(ctx):
            return "int8"
        return "fp16 weights" if ctx.config.half else "fp32"

    def int8_unavailable(self) -> str | None:
        try:
            import nncf  # noqa: F401  (optional: only --int8 needs it)
        except ImportError:
            return "NNCF is not installed (pip install nncf)"
        return None

    def write(self, ctx: ExportContext) -> Path:
        import openvino

        folder = self.output_path(ctx)
        folder.mkdir(parents=True, exist_ok=True)
        ov_model = openvino.convert_model(str(ctx.onnx_file("raw", half=False, for_openvino=True)))
        metadata = {**ctx.metadata, "int8": self.uses_int8(ctx)}
        if metadata["int8"]:
            ov_model = quantize_openvino(ov_model, ctx)
        openvino.save_model(ov_model, str(folder / f"{ctx.output_stem.name}.xml"), compress_to_fp16=ctx.config.half)
        (folder / METADATA_FILE).write_text(yaml.safe_dump(metadata, sort_keys=False), encoding="utf-8")
        return folder

    def load(self, path: Path, device: torch.device, half: bool) -> Backend:
        return OpenVinoBackend(path, device, half)

    def read_metadata(self, path: Path) -> dict[str, Any]:
        folder = path.parent if path.suffix.lower() == ".xml" else path
        return _read_metadata_file(folder / METADATA_FILE)


def quantize_openvino(ov_model: Any, ctx: ExportContext) -> Any:
    """Post-training int8 quantization with NNCF on letterboxed validation images (``--data``, else built-in).

    NNCF's ignored scope (:func:`openvino_float_ops`) is the Detect decode - left alone, NNCF puts a quantizer
    on its Multiply (the squared sigmoid of the box sizes). The head convolutions are quantized like the rest
    (int8 weights and input); OpenVINO gives their output in float. The quantizer of the image input is then
    pinned to the pixels' own 256 levels (:func:`pin_input_quantizers`): calibrated, its steps fell between them.
    """
    import nncf

    images = calibration_images(ctx)
    LOGGER.info(f"OpenVINO: int8 calibration on {len(images)} {ctx.check_source} images")
    dataset = nncf.Dataset(images, lambda image: ctx.letterboxed(image, ctx.imgsz)[None])
    ignored = nncf.IgnoredScope(names=sorted(openvino_float_ops(ov_model)))
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # not its INFO list of every op it leaves unquantized
    try:
        quantized = nncf.quantize(
            ov_model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(images), ignored_scope=ignored
        )
    finally:
        nncf_logger.setLevel(level)
    pin_input_quantizers(quantized)
    return quantized


def pin_input_quantizers(ov_model: Any) -> None:
    """Set every FakeQuantize that reads a model input to [0, 1] in :data:`IMAGE_LEVELS` levels - the input's own
    values, uint8 pixels / 255, which it then passes unchanged."""
    import openvino.opset13 as opset

    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize" or op.input_value(0).get_node().get_type_name() != "Parameter":
            continue
        for port, value in zip(range(1, 5), (0.0, 1.0, 0.0, 1.0), strict=True):  # input low/high, output low/high
            shape = op.input_value(port).get_shape()
            op.input(port).replace_source_output(opset.constant(np.full(shape, value, np.float32)).output(0))
        op.set_levels(IMAGE_LEVELS)


def openvino_float_ops(ov_model: Any) -> set[str]:
    """Friendly names of the ops of an OpenVINO model that int8 export leaves in float (constants left out): the
    decode after the head convolutions."""
    ops = ov_model.get_ordered_ops()
    inputs_of = {
        op.get_friendly_name(): [op.input_value(i).get_node().get_friendly_name() for i in range(op.get_input_size())]
        for op in ops
    }
    convolutions = [op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"]
    kinds = {op.get_friendly_name(): op.get_type_name() for op in ops}
    split = split_graph(inputs_of, convolutions)
    return {name for name in split.decode if kinds[name] not in ("Constant", "Result")}
