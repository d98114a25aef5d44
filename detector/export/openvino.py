"""OpenVINO IR: ``<stem>_openvino_model/`` with ``<stem>.xml``, ``<stem>.bin`` and ``metadata.yaml``.

Converted from our raw ONNX file with ``openvino.convert_model`` and saved with ``openvino.save_model``.
``--half`` stores fp16 weights (the graph computes in fp32); ``--int8`` quantizes with NNCF (an optional package,
``pip install nncf``) calibrated on ``--data``'s validation images, the built-in dataset's without ``--data``.
The IR never holds NMS.
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
from detector.export.base import ExportContext, Format, register_format, validation_images

LOGGER = logging.getLogger(__name__)

FOLDER_SUFFIX = "_openvino_model"
METADATA_FILE = "metadata.yaml"
INT8_CALIBRATION_IMAGES = 300  # at most this many validation images calibrate --int8


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
        # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise compute in bf16 and shift the boxes
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        self.request = compiled.create_infer_request()
        self.output = compiled.output(0)

    def forward(self, images: Tensor) -> Tensor:
        result = self.request.infer({0: images.detach().cpu().numpy()})
        return torch.from_numpy(np.array(result[self.output]))


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
        ov_model = openvino.convert_model(str(ctx.onnx_file("raw", half=False)))
        metadata = {**ctx.metadata, "int8": self.uses_int8(ctx)}
        if metadata["int8"]:
            ov_model = quantize_int8(ov_model, ctx)
        openvino.save_model(ov_model, str(folder / f"{ctx.output_stem.name}.xml"), compress_to_fp16=ctx.config.half)
        (folder / METADATA_FILE).write_text(yaml.safe_dump(metadata, sort_keys=False), encoding="utf-8")
        return folder

    def load(self, path: Path, device: torch.device, half: bool) -> Backend:
        return OpenVinoBackend(path, device, half)

    def read_metadata(self, path: Path) -> dict[str, Any]:
        folder = path.parent if path.suffix.lower() == ".xml" else path
        return _read_metadata_file(folder / METADATA_FILE)


def quantize_int8(ov_model: Any, ctx: ExportContext) -> Any:
    """Post-training int8 quantization with NNCF on letterboxed validation images (``--data``, else built-in)."""
    import nncf

    images = validation_images(ctx.config.data, INT8_CALIBRATION_IMAGES)
    calibration = [ctx.letterboxed(image, ctx.imgsz)[None] for image in images]
    LOGGER.info(f"OpenVINO: int8 calibration on {len(calibration)} {ctx.check_source} images")
    dataset = nncf.Dataset(calibration, lambda image: image)
    return nncf.quantize(ov_model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(calibration))
