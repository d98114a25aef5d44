"""One loader for every weight format: ``load_backend(weights, device)`` picks a :class:`Backend` by suffix.

Every backend takes ``images`` float (B, 3, H, W) RGB 0-1 and returns the model's decoded predictions
(B, N, 5 + nc): xywh pixels of the input, objectness, class scores. Models exported with NMS inside the graph
(``end2end``) return final detections (B, K, 6) ``[x1, y1, x2, y2, confidence, class]`` instead, rows past the
detection count zero; :func:`detections_from_output` turns either into per-image detections.

Formats (file layout and metadata keys are agreed in docs/architecture.md, "Export formats"):

========================  =====================  ==================================================
suffix                    backend                metadata (names, stride, input shape)
========================  =====================  ==================================================
.pt / .pth                :class:`PyTorchBackend`     the checkpoint (ours or YOLOv5's, via load_model)
.torchscript              :class:`TorchScriptBackend` ``config.txt`` extra file (JSON)
.onnx                     :class:`OnnxBackend`        ``metadata_props`` (JSON values; YOLOv5's literals)
*_openvino_model/ , .xml  :class:`OpenVinoBackend`    ``metadata.yaml`` beside the .xml
.engine                   :class:`TensorRTBackend`    a length-prefixed JSON header before the engine
========================  =====================  ==================================================

A new format is one :class:`Backend` subclass decorated with :func:`register_backend` naming its suffixes.
"""

from __future__ import annotations

import ast
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from detector.errors import CheckpointError, ConfigError
from detector.ops.nms import non_max_suppression
from detector.utils.torch_utils import select_device

LOGGER = logging.getLogger(__name__)

BACKENDS: dict[str, type[Backend]] = {}  # suffix ('.onnx', '_openvino_model') -> backend class

# Test-time augmentation: (scale, flip left-right) passes whose predictions are merged before NMS.
_TTA_PASSES = ((1.0, False), (0.83, True), (0.67, False))
_PAD_VALUE = 114 / 255  # letterbox grey, so scaled TTA images are padded like the letterbox pads


def register_backend(*suffixes: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: ``load_backend`` uses the class for weights ending in any of ``suffixes``."""

    def add(cls: type[Backend]) -> type[Backend]:
        for suffix in suffixes:
            if suffix in BACKENDS:
                raise ValueError(f"suffix {suffix!r} is registered twice ({BACKENDS[suffix].__name__}, {cls.__name__})")
            BACKENDS[suffix] = cls
        cls.suffixes = tuple(suffixes)
        return cls

    return add


class Backend(ABC):
    """A loaded model of any format, called as ``backend(images) -> predictions``.

    Attributes set by every subclass:
        names: class names, index = class id (empty when the file stores none and no ``data`` YAML was given).
        stride: the largest output stride in pixels; input height and width must be multiples of it.
        fp16: whether the model runs in half precision (inputs are converted by :meth:`__call__`).
        device: where inputs are expected and outputs returned.
        input_shape: (batch, 3, height, width) with None for every free dimension; all None = fully dynamic.
        end2end: outputs are final detections (NMS inside the graph), see the module docstring.
    """

    suffixes: ClassVar[tuple[str, ...]] = ()
    format_name: ClassVar[str] = ""

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        self.weights = weights
        self.device = device
        self.names: list[str] = []
        self.stride = 32
        self.fp16 = False
        self.input_shape: tuple[int | None, int | None, int | None, int | None] = (None, 3, None, None)
        self.end2end = False
        self._augment_warned = False

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor:
        """Run the model on ``images`` (B, 3, H, W) already in the backend's dtype and on its device."""

    @property
    def fixed_hw(self) -> tuple[int, int] | None:
        """(height, width) the model only accepts, or None when any multiple of ``stride`` works."""
        height, width = self.input_shape[2], self.input_shape[3]
        return (height, width) if height is not None and width is not None else None

    @property
    def fixed_batch(self) -> int | None:
        """The only batch size the model accepts, or None when it is free."""
        return self.input_shape[0]

    @property
    def dynamic(self) -> bool:
        """Whether batch, height and width are all free."""
        return self.fixed_hw is None and self.fixed_batch is None

    @property
    def nc(self) -> int:
        return len(self.names)

    def __call__(self, images: Tensor, augment: bool = False) -> Tensor:
        """Predictions for ``images`` float (B, 3, H, W) RGB 0-1 -> float32 (B, N, 5 + nc), or (B, K, 6) if end2end.

        ``augment`` merges the predictions of scaled and flipped copies (test-time augmentation); it needs a
        backend with free height and width and no NMS inside, and is skipped with a warning otherwise.
        """
        dtype = torch.float16 if self.fp16 else torch.float32
        images = images.to(self.device, dtype, non_blocking=True)
        with torch.inference_mode():
            if augment and self._can_augment():
                return self._forward_augmented(images)
            return self.forward(images).float()

    def _can_augment(self) -> bool:
        if self.fixed_hw is None and not self.end2end:
            return True
        if not self._augment_warned:
            LOGGER.warning("WARNING: --augment needs a model with free input size and no built-in NMS; ignored")
            self._augment_warned = True
        return False

    def _forward_augmented(self, images: Tensor) -> Tensor:
        width = images.shape[3]
        merged = []
        for scale, flip in _TTA_PASSES:
            scaled = images.flip(-1) if flip else images
            if scale != 1.0:
                scaled = _scale_and_pad(scaled, scale, self.stride)
            predictions = self.forward(scaled).float()
            predictions[..., :4] /= scale
            if flip:
                predictions[..., 0] = width - predictions[..., 0]
            merged.append(predictions)
        return torch.cat(merged, dim=1)

    def warmup(self, imgsz: tuple[int, int] = (640, 640)) -> None:
        """One throw-away inference so CUDA kernels and memory pools are ready before timing starts."""
        height, width = self.fixed_hw or imgsz
        batch = self.fixed_batch or 1
        self(torch.zeros(batch, 3, height, width, device=self.device))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.weights)!r}, device={self.device}, classes={self.nc}, "
            f"stride={self.stride}, fp16={self.fp16}, input_shape={self.input_shape})"
        )


def _scale_and_pad(images: Tensor, scale: float, stride: int) -> Tensor:
    """Resize (B, 3, H, W) by ``scale`` (bilinear), then pad right/bottom with letterbox grey to a stride multiple."""
    height, width = images.shape[2:]
    new_height, new_width = int(height * scale), int(width * scale)
    resized = F.interpolate(images, size=(new_height, new_width), mode="bilinear", align_corners=False)
    pad_height, pad_width = -new_height % stride, -new_width % stride
    return F.pad(resized, (0, pad_width, 0, pad_height), value=_PAD_VALUE)


# --------------------------------------------------------------------------------------------------------------------
# Choosing and loading


def backend_suffix(weights: str | Path) -> str:
    """The registry key of a weights path: its suffix, or '_openvino_model' for an OpenVINO folder."""
    path = Path(weights)
    if path.name.endswith("_openvino_model") or (path.is_dir() and any(path.glob("*.xml"))):
        return "_openvino_model"
    return path.suffix.lower()


def load_backend(
    weights: str | Path, device: str | torch.device = "", half: bool = False, data: str | Path | None = None
) -> Backend:
    """Load ``weights`` of any supported format on ``device`` ("", "cpu", "0", ...).

    ``half`` runs in FP16 where the format allows it (CUDA only; ignored with a warning on CPU). ``data`` is an
    optional dataset YAML whose class names are used when the weights store none (or to rename them).
    Errors (missing file, unknown suffix, missing runtime) are one-line :class:`CheckpointError`/:class:`ConfigError`.
    """
    path = Path(weights)
    suffix = backend_suffix(path)
    if suffix not in BACKENDS:
        known = ", ".join(sorted(s if s.startswith(".") else f"*{s}/" for s in BACKENDS))
        raise CheckpointError(f"{path}: unsupported weights format '{suffix or path.name}' (supported: {known})")
    if not path.exists():
        raise CheckpointError(f"{path}: weights not found")
    torch_device = select_device(device)
    if half and torch_device.type != "cuda":
        LOGGER.warning("WARNING: --half needs a CUDA device; running in FP32 on %s", torch_device.type.upper())
        half = False
    backend = BACKENDS[suffix](path, torch_device, half)
    if data:
        backend.names = list(_names_from_data(data, backend.names))
    if not backend.names:
        LOGGER.warning("WARNING: %s stores no class names; labels will be class numbers (pass --data)", path)
    return backend


def _names_from_data(data: str | Path, current: Sequence[str]) -> tuple[str, ...]:
    from detector.data.dataset_config import load_dataset_config

    names = load_dataset_config(data, check_paths=False, download=False).names
    if current and len(current) != len(names):
        raise ConfigError(f"{data}: has {len(names)} class names but the model predicts {len(current)} classes")
    return names


def parse_names(raw: Any, where: str) -> list[str]:
    """Class names from metadata: a list, or a {id: name} mapping with int or numeric-string keys."""
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        try:
            by_id = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: class names mapping needs integer keys, got {list(raw)[:5]}") from e
        if sorted(by_id) != list(range(len(by_id))):
            raise CheckpointError(f"{where}: class ids in the names mapping must be 0..{len(by_id) - 1}")
        return [by_id[i] for i in range(len(by_id))]
    if isinstance(raw, (list, tuple)):
        return [str(v) for v in raw]
    raise CheckpointError(f"{where}: class names must be a list or a mapping, got {type(raw).__name__}")


def decode_metadata_value(value: str) -> Any:
    """A metadata string as written by our exporter (JSON), or by YOLOv5 (Python literals such as a names dict).

    Python literals are parsed with ``ast.literal_eval``, which accepts only literals and never runs code.
    """
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def _apply_metadata(backend: Backend, metadata: Mapping[str, Any], where: str) -> None:
    """Set names, stride, fp16 and the fixed input shape from export metadata (ours or YOLOv5's keys)."""
    backend.names = parse_names(metadata.get("names"), where)
    if "stride" in metadata:
        backend.stride = int(metadata["stride"])
    backend.fp16 = bool(metadata.get("half", backend.fp16))
    backend.end2end = bool(metadata.get("nms", False))


def _shape_from_dims(dims: Sequence[Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """(B, 3, H, W) with None for symbolic or negative (dynamic) dimensions."""
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if len(fixed) != 4:
        raise CheckpointError(f"expected a 4-D (B, 3, H, W) model input, got dims {list(dims)}")
    return fixed[0], fixed[1], fixed[2], fixed[3]


# --------------------------------------------------------------------------------------------------------------------
# PyTorch: our checkpoints and YOLOv5's release files


@register_backend(".pt", ".pth")
class PyTorchBackend(Backend):
    """A ``.pt`` checkpoint (ours, or YOLOv5's release format) loaded with ``load_model`` and fused."""

    format_name = "PyTorch"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        from detector.models.loading import load_model

        self.model = load_model(weights, device=device, fuse=True).eval()
        if half:
            self.model.half()
        self.fp16 = half
        self.names = [str(n) for n in self.model.names]
        self.stride = int(max(int(s) for s in self.model.stride))

    def forward(self, images: Tensor) -> Tensor:
        output = self.model(images)
        return output[0] if isinstance(output, (tuple, list)) else output

    def _forward_augmented(self, images: Tensor) -> Tensor:
        # The model's own TTA also drops the prediction levels that do not fit each scale (YOLOv5's behaviour).
        return self.model(images, augment=True).float()


# --------------------------------------------------------------------------------------------------------------------
# TorchScript


@register_backend(".torchscript")
class TorchScriptBackend(Backend):
    """A ``torch.jit`` file; metadata is the JSON ``config.txt`` extra file (ours, or YOLOv5's ``shape`` key)."""

    format_name = "TorchScript"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        self.model, metadata = load_torchscript(weights, device)
        _apply_metadata(self, metadata, str(weights))
        parameters = getattr(self.model, "parameters", None)  # lite modules have none to inspect
        parameter = next(parameters(), None) if parameters is not None else None
        if parameter is not None:
            self.fp16 = parameter.dtype == torch.float16
        self.input_shape = _exported_input_shape(metadata)

    def forward(self, images: Tensor) -> Tensor:
        output = self.model(images)
        return output[0] if isinstance(output, (tuple, list)) else output


def load_torchscript(path: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """A ``torch.jit`` file in eval mode and its metadata (the JSON ``config.txt`` extra file, {} if absent)."""
    extra_files = {"config.txt": ""}
    try:
        model = torch.jit.load(str(path), map_location=device, _extra_files=extra_files).eval()
    except RuntimeError:  # export --optimize writes a lite-interpreter file, which needs the mobile loader
        from torch.jit.mobile import _load_for_lite_interpreter

        try:
            model = _load_for_lite_interpreter(str(path), map_location=device, _extra_files=extra_files)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable TorchScript file ({_first_line(e)})") from e
    text = extra_files["config.txt"]
    return model, json.loads(text) if text else {}


def _exported_input_shape(metadata: Mapping[str, Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """A traced model's input shape: free when exported with ``dynamic``, else the export's batch and imgsz."""
    if metadata.get("dynamic", False):
        return None, 3, None, None
    if "imgsz" in metadata:
        height, width = (list(metadata["imgsz"]) * 2)[:2]
        return int(metadata.get("batch", 1)), 3, int(height), int(width)
    if "shape" in metadata:  # YOLOv5's exports
        return _shape_from_dims([int(d) for d in metadata["shape"]])
    return None, 3, None, None


# --------------------------------------------------------------------------------------------------------------------
# ONNX Runtime


@register_backend(".onnx")
class OnnxBackend(Backend):
    """An ONNX model run by ONNX Runtime (CUDA provider when asked for and installed, else CPU)."""

    format_name = "ONNX"
    _END2END_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        import onnxruntime

        providers = ["CPUExecutionProvider"]
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
            raise CheckpointError(f"{weights}: ONNX Runtime cannot load it ({_first_line(e)})") from e
        raw = self.session.get_modelmeta().custom_metadata_map
        _apply_metadata(self, {k: decode_metadata_value(v) for k, v in raw.items()}, str(weights))
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_shape = _shape_from_dims(model_input.shape)
        self.fp16 = model_input.type == "tensor(float16)"
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.end2end = self.end2end or set(self._END2END_OUTPUTS) <= set(self.output_names)

    def forward(self, images: Tensor) -> Tensor:
        array = images.detach().cpu().numpy()  # zero-copy on CPU
        outputs = self.session.run(self.output_names, {self.input_name: array})
        if self.end2end:
            by_name = dict(zip(self.output_names, outputs, strict=True))
            return end2end_to_detections(*(torch.from_numpy(by_name[n]) for n in self._END2END_OUTPUTS))
        return torch.from_numpy(outputs[0])


def end2end_to_detections(num_dets: Tensor, boxes: Tensor, scores: Tensor, classes: Tensor) -> Tensor:
    """EfficientNMS-layout outputs -> (B, K, 6) ``[x1, y1, x2, y2, score, class]``; rows past ``num_dets`` zeroed."""
    detections = torch.cat([boxes.float(), scores.float().unsqueeze(-1), classes.float().unsqueeze(-1)], dim=-1)
    valid = torch.arange(detections.shape[1], device=detections.device)[None] < num_dets.reshape(-1, 1)
    return detections * valid.unsqueeze(-1)


# --------------------------------------------------------------------------------------------------------------------
# OpenVINO


@register_backend("_openvino_model", ".xml")
class OpenVinoBackend(Backend):
    """An OpenVINO IR (``*_openvino_model/`` folder or its ``.xml``) compiled for the CPU with a latency hint."""

    format_name = "OpenVINO"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        import openvino

        if device.type != "cpu":
            LOGGER.warning("WARNING: the OpenVINO backend runs on the CPU; ignoring --device %s", device)
            self.device = torch.device("cpu")
        xml = weights if weights.suffix.lower() == ".xml" else next(iter(sorted(weights.glob("*.xml"))), None)
        if xml is None:
            raise CheckpointError(f"{weights}: OpenVINO folder has no .xml model")
        metadata_file = xml.parent / "metadata.yaml"
        metadata = yaml.safe_load(metadata_file.read_text(encoding="utf-8")) if metadata_file.is_file() else {}
        _apply_metadata(self, metadata or {}, str(metadata_file))
        core = openvino.Core()
        try:
            model = core.read_model(str(xml))
        except RuntimeError as e:
            raise CheckpointError(f"{xml}: OpenVINO cannot read it ({_first_line(e)})") from e
        partial_shape = model.inputs[0].get_partial_shape()
        self.input_shape = _shape_from_dims(
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


# --------------------------------------------------------------------------------------------------------------------
# TensorRT


@register_backend(".engine")
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
        _apply_metadata(self, metadata, str(weights))
        logger = tensorrt.Logger(tensorrt.Logger.WARNING)
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
        self.input_shape = _shape_from_dims(list(self.engine.get_tensor_shape(self.input_name)))
        self.fp16 = self.engine.get_tensor_dtype(self.input_name) == tensorrt.DataType.HALF
        self.end2end = self.end2end or set(OnnxBackend._END2END_OUTPUTS) <= set(self.output_names)

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
            return end2end_to_detections(*(outputs[n] for n in OnnxBackend._END2END_OUTPUTS))
        return outputs[self.output_names[0]]


def split_engine_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(metadata, engine bytes) of an .engine file: our files start with a uint32 LE length and that much JSON.

    Engines without the header (e.g. built by trtexec) come back whole, with empty metadata.
    """
    if len(data) > 4:
        length = int.from_bytes(data[:4], "little")
        if 0 < length <= len(data) - 4:
            try:
                metadata = json.loads(data[4 : 4 + length].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                metadata = None
            if isinstance(metadata, dict):
                return metadata, data[4 + length :]
    return {}, data


# --------------------------------------------------------------------------------------------------------------------
# From outputs to detections


def detections_from_output(
    output: Tensor,
    end2end: bool,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    max_det: int = 300,
    multi_label: bool = False,
) -> list[Tensor]:
    """Per-image (n, 6) ``[x1, y1, x2, y2, conf, class]`` in input pixels from any backend's output.

    Raw outputs go through :func:`non_max_suppression`; end2end outputs (NMS done in the graph) are only
    filtered by ``conf_thres``/``classes`` and cut to ``max_det``.
    """
    if not end2end:
        return non_max_suppression(
            output, conf_thres, iou_thres, classes=classes, agnostic=agnostic, multi_label=multi_label, max_det=max_det
        )
    results = []
    for detections in output:
        keep = detections[:, 4] > conf_thres
        if classes is not None:
            wanted = torch.as_tensor(list(classes), device=detections.device, dtype=detections.dtype)
            keep &= (detections[:, 5:6] == wanted).any(1)
        kept = detections[keep]
        results.append(kept[kept[:, 4].argsort(descending=True)][:max_det])
    return results


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
