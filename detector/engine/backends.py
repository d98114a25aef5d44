"""One loader for every weight format: ``load_backend(weights, device)`` returns a :class:`Backend`.

Every backend takes ``images`` float (B, 3, H, W) RGB 0-1 and returns the model's decoded predictions
(B, N, 5 + nc): xywh pixels of the input, objectness, class scores. Models exported with NMS inside the graph
(``end2end``) return final detections (B, K, 6) ``[x1, y1, x2, y2, confidence, class]`` instead, rows past the
detection count zero; :func:`detections_from_output` turns either into per-image detections.

``.pt``/``.pth`` checkpoints (ours or YOLOv5's) load here as :class:`PyTorchBackend`. Every other format is a
``detector.export.Format`` in ``detector/export/`` that both writes its file (export.py) and loads it (its ``load``
returns the Backend), so detect.py, val.py and the check after every export share one loader per format:

- ``.torchscript``: ``detector.export.torchscript`` (metadata in the ``config.txt`` extra file, JSON);
- ``.onnx``: ``detector.export.onnx``, ONNX Runtime (``metadata_props``: JSON values, or YOLOv5's literals);
- ``*_openvino_model/`` or its ``.xml``: ``detector.export.openvino`` (``metadata.yaml`` beside the .xml);
- ``.engine``: ``detector.export.tensorrt`` (a length-prefixed JSON header before the engine).

A new format is one ``Format`` subclass with ``@register_format`` (README.md, "A new export format").
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detector.errors import CheckpointError, ConfigError
from detector.models.release import resolve_release_weights
from detector.models.yolo import augmented_forward
from detector.ops.nms import non_max_suppression
from detector.utils.torch_utils import half_precision_dtype, no_native_bf16_reason, select_device

LOGGER = logging.getLogger(__name__)

PYTORCH_SUFFIXES = (".pt", ".pth")  # checkpoints, the format every export starts from


class Backend(ABC):
    """A loaded model of any format, called as ``backend(images) -> predictions``.

    Attributes set by every subclass:
        names: class names, index = class id (empty when the file stores none and no ``data`` YAML was given).
        stride: the largest output stride in pixels; input height and width must be multiples of it.
        strides: the stride of each output level, in output order (empty when the file does not say).
        fp16: whether the model runs in half precision (inputs are converted by :meth:`__call__`).
        device: where inputs are expected and outputs returned.
        input_shape: (batch, 3, height, width) with None for every free dimension; all None = fully dynamic.
        end2end: outputs are final detections (NMS inside the graph), see the module docstring.
    """

    format_name = ""  # shown in logs, e.g. "ONNX"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        self.weights = weights
        self.device = device
        self.names: list[str] = []
        self.stride = 32
        self.strides: tuple[int, ...] = ()
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

        ``augment`` is test-time augmentation (:func:`detector.models.yolo.augmented_forward`, the same as the
        PyTorch model's); it needs free height and width and no NMS inside, and is skipped with a warning otherwise.
        """
        dtype = torch.float16 if self.fp16 else torch.float32
        images = images.to(self.device, dtype, non_blocking=True)
        with torch.inference_mode():
            if augment and self._can_augment():
                return augmented_forward(self.forward, images, self.strides or (self.stride,)).float()
            return self.forward(images).float()

    def _can_augment(self) -> bool:
        if self.fixed_hw is None and not self.end2end:
            return True
        if not self._augment_warned:
            LOGGER.warning("WARNING: --augment needs a model with free input size and no built-in NMS; ignored")
            self._augment_warned = True
        return False

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


# --------------------------------------------------------------------------------------------------------------------
# Choosing and loading


def load_backend(
    weights: str | Path | Sequence[str | Path],
    device: str | torch.device = "",
    half: bool = False,
    data: str | Path | None = None,
    dnn: bool = False,
) -> Backend:
    """Load ``weights`` of any supported format on ``device`` ("", "cpu", "0", ...).

    ``half`` runs in FP16 where the format allows it on CUDA; on a CPU with native bfloat16 (AVX512-BF16, AMX) a
    ``.pt`` runs under bf16 autocast instead, elsewhere on the CPU it is ignored with a warning. ``data`` is an
    optional dataset YAML whose class names are used when the weights store none (or to rename them).
    Several weights (a list or tuple of two or more) load as one :class:`EnsembleBackend`. ``dnn`` runs ``.onnx``
    files with OpenCV's DNN module instead of ONNX Runtime (``detector.export.onnx.OpenCVDnnBackend``).
    Errors (missing file, unknown suffix, missing runtime) are one-line :class:`CheckpointError`/:class:`ConfigError`.
    """
    if not isinstance(weights, (str, Path)):
        paths = [Path(w) for w in weights]
        if not paths:
            raise ConfigError("--weights is empty: give one weights file, or several for an ensemble")
        if len(paths) > 1:
            paths = [resolve_release_weights(path) for path in paths]
            for path in paths:  # every file before any is loaded (a model can take seconds)
                if not path.exists():
                    raise CheckpointError(f"{path}: weights not found")
            if dnn and not any(path.suffix.lower() == ".onnx" for path in paths):
                raise ConfigError("--dnn runs .onnx files with OpenCV's DNN module; none of the --weights is one")
            # --dnn applies to the ensemble's ONNX files; the other formats run as always
            members = [load_backend(p, device, half, data, dnn and p.suffix.lower() == ".onnx") for p in paths]
            return EnsembleBackend(members)
        weights = paths[0]
    from detector.export.base import FORMATS, format_for_path  # the package registers every format on import

    path = resolve_release_weights(weights)  # a bare 'yolov5s.pt' not on disk: fetched from YOLOv5's release
    is_checkpoint = path.suffix.lower() in PYTORCH_SUFFIXES
    weights_format = None if is_checkpoint else format_for_path(path)
    if not is_checkpoint and weights_format is None:
        known = [
            *PYTORCH_SUFFIXES,
            *(s if s.startswith(".") else f"*{s}/" for f in FORMATS.values() for s in f.suffixes),
        ]
        raise CheckpointError(
            f"{path}: unsupported weights format '{path.suffix or path.name}' (supported: {', '.join(sorted(known))})"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: weights not found")
    if dnn and path.suffix.lower() != ".onnx":
        raise ConfigError(f"--dnn runs .onnx files with OpenCV's DNN module, not {path.name}")
    torch_device = select_device(device)
    bf16_capable = is_checkpoint or getattr(weights_format, "name", "") == "openvino"  # bf16 on the CPU: these two
    cpu_bf16 = half and bf16_capable and half_precision_dtype(torch_device) == torch.bfloat16
    if half and torch_device.type != "cuda" and not cpu_bf16:
        LOGGER.warning(
            "WARNING: --half needs a CUDA device, or a .pt or OpenVINO model on a CPU with native bfloat16; running "
            "in FP32 on %s%s",
            torch_device.type.upper(),
            f" ({no_native_bf16_reason()})" if torch_device.type == "cpu" and bf16_capable else "",
        )
        half = False
    if weights_format is None:
        backend: Backend = PyTorchBackend(path, torch_device, half)
    elif dnn:
        from detector.export.onnx import OpenCVDnnBackend

        backend = OpenCVDnnBackend(path, torch_device, half)
    else:
        backend = weights_format().load(path, torch_device, half)
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


def apply_metadata(backend: Backend, metadata: Mapping[str, Any], where: str) -> None:
    """Set names, stride(s), fp16 and end2end from export metadata (ours or YOLOv5's keys)."""
    backend.names = parse_names(metadata.get("names"), where)
    if "stride" in metadata:
        backend.stride = int(metadata["stride"])
    if "strides" in metadata:  # ours; YOLOv5's exports store only the largest stride
        backend.strides = tuple(int(s) for s in metadata["strides"])
    backend.fp16 = bool(metadata.get("half", backend.fp16))
    backend.end2end = bool(metadata.get("nms", False))


def shape_from_dims(dims: Sequence[Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """(B, 3, H, W) with None for symbolic or negative (dynamic) dimensions."""
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if len(fixed) != 4:
        raise CheckpointError(f"expected a 4-D (B, 3, H, W) model input, got dims {list(dims)}")
    return fixed[0], fixed[1], fixed[2], fixed[3]


def exported_input_shape(metadata: Mapping[str, Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """A traced model's input shape from its metadata: free when exported ``dynamic``, else the export's batch
    and imgsz (YOLOv5's exports: their ``shape`` key); all free when the metadata says nothing."""
    if metadata.get("dynamic", False):
        return None, 3, None, None
    if "imgsz" in metadata:
        height, width = (list(metadata["imgsz"]) * 2)[:2]
        return int(metadata.get("batch", 1)), 3, int(height), int(width)
    if "shape" in metadata:
        return shape_from_dims([int(d) for d in metadata["shape"]])
    return None, 3, None, None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (runtimes raise multi-line errors), or its type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------------------------------
# PyTorch: our checkpoints and YOLOv5's release files


class PyTorchBackend(Backend):
    """A ``.pt`` checkpoint (ours, or YOLOv5's release format) loaded with ``load_model`` and fused."""

    format_name = "PyTorch"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        from detector.models.loading import load_model

        self.model = load_model(weights, device=device, fuse=True).eval()
        # --half: fp16 weights on CUDA; on the CPU bf16 autocast (weights stay fp32, the Detect head decodes in fp32)
        self.autocast_dtype = torch.bfloat16 if half and device.type == "cpu" else None
        if half and self.autocast_dtype is None:
            self.model.half()
        self.fp16 = half and self.autocast_dtype is None
        self.names = [str(n) for n in self.model.names]
        self.strides = tuple(int(s) for s in self.model.stride.tolist())
        self.stride = max(self.strides)

    def forward(self, images: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            output = self.model(images)
        return output[0] if isinstance(output, (tuple, list)) else output


# --------------------------------------------------------------------------------------------------------------------
# Several models as one: --weights a.pt b.pt


class EnsembleBackend(Backend):
    """Models of one dataset's classes run on the same input, their raw predictions joined before NMS.

    ``--weights a.pt b.onnx`` (YOLOv5's model ensembling): every member predicts on the same letterboxed batch
    (each in its own format and precision, each with ``--augment`` when asked) and the (B, N_i, 5 + nc) outputs are
    concatenated along the anchors, so one NMS chooses among all members' boxes. Members must predict the same
    number of classes and return raw predictions (not exported with ``--nms``); the input must be a multiple of the
    largest member stride and fit every member's fixed input size. The class names are the first member's.
    """

    format_name = "Ensemble"

    def __init__(self, members: Sequence[Backend]) -> None:
        first = members[0]
        super().__init__(first.weights, first.device, False)
        self.members = list(members)
        for member in self.members:
            if member.end2end:
                raise ConfigError(
                    f"{member.weights}: exported with --nms (final detections); an ensemble joins raw predictions, "
                    "so export its members without --nms"
                )
            if member.nc != first.nc:
                raise ConfigError(
                    f"{member.weights}: predicts {member.nc} classes but {first.weights} predicts {first.nc}; "
                    "an ensemble's models must share their classes"
                )
            if member.names != first.names:
                LOGGER.warning(
                    "WARNING: class names of %s differ from %s's; the ensemble uses the latter",
                    member.weights,
                    first.weights,
                )
        self.names = list(first.names)
        self.stride = max(member.stride for member in self.members)
        self.strides = tuple(sorted({s for member in self.members for s in member.strides}))
        self.input_shape = _common_input_shape(self.members)

    def forward(self, images: Tensor) -> Tensor:
        return self(images)

    def __call__(self, images: Tensor, augment: bool = False) -> Tensor:
        """Each member's predictions for ``images`` (converted by each member to its device and dtype), joined on
        the first member's device (an ONNX member may run on the CPU beside a CUDA one)."""
        return torch.cat([member(images, augment=augment).to(self.device) for member in self.members], dim=1)

    def warmup(self, imgsz: tuple[int, int] = (640, 640)) -> None:
        for member in self.members:
            member.warmup(self.fixed_hw or imgsz)

    def __repr__(self) -> str:
        return f"{type(self).__name__}([{', '.join(map(repr, self.members))}])"


def _common_input_shape(members: Sequence[Backend]) -> tuple[int | None, int | None, int | None, int | None]:
    """The input every member accepts: each fixed dimension fixed alike (or free) in all members."""
    shape: list[int | None] = []
    for axis, label in enumerate(("batch size", "channels", "height", "width")):
        fixed = {member.input_shape[axis] for member in members} - {None}
        if len(fixed) > 1:
            listing = ", ".join(f"{m.weights}: {m.input_shape[axis]}" for m in members)
            raise ConfigError(f"the ensemble's models take different fixed input {label}s ({listing})")
        shape.append(fixed.pop() if fixed else None)
    return shape[0], shape[1], shape[2], shape[3]


# --------------------------------------------------------------------------------------------------------------------
# From outputs to detections


def end2end_to_detections(num_dets: Tensor, boxes: Tensor, scores: Tensor, classes: Tensor) -> Tensor:
    """EfficientNMS-layout outputs -> (B, K, 6) ``[x1, y1, x2, y2, score, class]``; rows past ``num_dets`` zeroed."""
    detections = torch.cat([boxes.float(), scores.float().unsqueeze(-1), classes.float().unsqueeze(-1)], dim=-1)
    valid = torch.arange(detections.shape[1], device=detections.device)[None] < num_dets.reshape(-1, 1)
    return detections * valid.unsqueeze(-1)


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
