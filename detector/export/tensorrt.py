"""TensorRT: ``<stem>.engine``, built from our ONNX file with the tensorrt Python API (NVIDIA GPU and CUDA only).

The file is our JSON metadata header (:func:`detector.export.metadata.write_engine_file`) followed by the
serialized engine; engines without the header (e.g. from trtexec) load too, without names. ``--half`` sets the FP16
builder flag (input and outputs stay float32), ``--workspace`` caps the builder's memory pool (GiB), ``--dynamic``
adds an optimisation profile for batch 1..``--batch-size`` and sizes from one stride up to ``--imgsz``, ``--nms``
appends the EfficientNMS_TRT plugin behind a single-label score mask (:mod:`detector.export.nms`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detector.engine.backends import Backend, apply_metadata, end2end_to_detections, shape_from_dims
from detector.errors import CheckpointError, ConfigError, ExportError
from detector.export.base import INPUT_NAME, ExportContext, Format, register_format
from detector.export.metadata import nms_metadata, split_engine_header, write_engine_file
from detector.export.nms import NMS_OUTPUT_NAMES


class TensorRTBackend(Backend):
    """A serialized TensorRT engine (our length-prefixed JSON header optional), run on CUDA with torch buffers."""

    format_name = "TensorRT"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        try:
            import tensorrt
        except ImportError as e:
            raise ConfigError(f"{weights}: TensorRT engines need the 'tensorrt' package and a CUDA GPU") from e
        if device.type != "cuda":
            raise ConfigError(f"{weights}: TensorRT engines run only on CUDA; pass --device 0 on a machine with a GPU")
        metadata, engine_bytes = split_engine_header(weights.read_bytes())
        apply_metadata(self, metadata, str(weights))
        logger = tensorrt.Logger(tensorrt.Logger.WARNING)
        tensorrt.init_libnvinfer_plugins(logger, "")  # registers EfficientNMS_TRT, which --nms engines hold
        with torch.cuda.device(device):
            self.engine = tensorrt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise CheckpointError(f"{weights}: TensorRT cannot deserialize this engine (built by another version?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == tensorrt.TensorIOMode.INPUT for n in names}
        self.input_name = next(n for n in names if is_input[n])
        self.output_names = [n for n in names if not is_input[n]]
        self.output_dtypes = {
            n: torch.from_numpy(np.empty(0, tensorrt.nptype(self.engine.get_tensor_dtype(n)))).dtype
            for n in self.output_names
        }
        self.input_shape = shape_from_dims(list(self.engine.get_tensor_shape(self.input_name)))
        self.fp16 = self.engine.get_tensor_dtype(self.input_name) == tensorrt.DataType.HALF
        self.end2end = self.end2end or set(NMS_OUTPUT_NAMES) <= set(self.output_names)

    def forward(self, images: Tensor) -> Tensor:
        images = images.contiguous()
        self.context.set_input_shape(self.input_name, tuple(images.shape))
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.output_dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.weights}: TensorRT execution failed")
        if self.end2end:
            return end2end_to_detections(*(outputs[n] for n in NMS_OUTPUT_NAMES))
        return outputs[self.output_names[0]]


@register_format
class TensorRTFormat(Format):
    """TensorRT engine built from our ONNX file (CUDA only); see the module docstring for the options."""

    name = "engine"
    title = "TensorRT"
    suffixes = (".engine",)
    required_packages = ("tensorrt",)
    supports_nms = True

    def unavailable(self, ctx: ExportContext | None) -> str | None:
        reasons = []
        if not torch.cuda.is_available():
            reasons.append("no CUDA device")
        if importlib.util.find_spec("tensorrt") is None:
            reasons.append("the tensorrt package is not installed (pip install tensorrt)")
        if reasons:
            return f"TensorRT export needs an NVIDIA GPU with CUDA and tensorrt: {' and '.join(reasons)}"
        return None

    def output_path(self, ctx: ExportContext) -> Path:
        return ctx.output_stem.with_suffix(".engine")

    def check_device(self, ctx: ExportContext) -> torch.device:
        return ctx.device if ctx.device.type == "cuda" else torch.device("cuda", 0)

    def profile_shapes(self, ctx: ExportContext) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes of the optimisation profile (all equal without --dynamic)."""
        shape = ctx.export_shape
        if not ctx.config.dynamic:
            return shape, shape, shape
        smallest = (1, 3, ctx.max_stride, ctx.max_stride)
        return smallest, shape, shape

    def check_shapes(self, ctx: ExportContext) -> list[tuple[int, int, int, int]]:
        shapes = [ctx.export_shape]
        if ctx.config.dynamic:  # a second shape inside the profile: smaller batch and height
            height, width = ctx.imgsz
            smaller = max(ctx.max_stride, (height // 2) // ctx.max_stride * ctx.max_stride)
            shapes.append((max(1, ctx.config.batch_size // 2), 3, smaller, width))
        return shapes

    def write(self, ctx: ExportContext) -> Path:
        import tensorrt as trt

        flavor = "tensorrt" if self.uses_nms(ctx) else "raw"
        onnx_path = ctx.onnx_file(flavor, half=False)  # fp32 graph; --half is a builder flag
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")  # registers EfficientNMS_TRT for the ONNX parser
        builder = trt.Builder(logger)
        network_flags = 0
        if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode (and the default) from 10
            network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(network_flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors or 'no reason given'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(ctx.config.workspace * (1 << 30)))
        if ctx.config.half:
            if not getattr(builder, "platform_has_fast_fp16", True):  # the query is gone from TensorRT 10.15
                raise ExportError("--half: this GPU has no fast FP16 support in TensorRT")
            config.set_flag(trt.BuilderFlag.FP16)
        if ctx.config.dynamic:
            profile = builder.create_optimization_profile()
            minimum, optimum, maximum = self.profile_shapes(ctx)
            profile.set_shape(INPUT_NAME, minimum, optimum, maximum)
            config.add_optimization_profile(profile)
        with torch.cuda.device(self.check_device(ctx)):
            serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(
                "TensorRT engine build failed (the TensorRT log above says why; a larger --workspace may help)"
            )
        metadata = nms_metadata(ctx.metadata, ctx.config) if flavor != "raw" else dict(ctx.metadata)
        path = self.output_path(ctx)
        write_engine_file(path, metadata, bytes(serialized))
        return path

    def load(self, path: Path, device: torch.device, half: bool) -> Backend:
        return TensorRTBackend(path, device, half)

    def read_metadata(self, path: Path) -> dict[str, Any]:
        return split_engine_header(path.read_bytes())[0]
