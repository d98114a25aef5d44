"""Export a DetectionModel to TorchScript, ONNX, OpenVINO IR and TensorRT, and check each file in its own runtime.

Every format is one :class:`ExportFormat` subclass registered in :data:`FORMATS` (a new format is one new class
with ``@register_format``). :class:`Exporter` prepares the model once (fused, eval, ``Detect.export`` so grids are
computed inside the graph), writes each requested format into the run folder, then runs the written file in its
own runtime (torch.jit, onnxruntime, OpenVINO, TensorRT) on the same input as the PyTorch model and compares:

* raw exports: the (B, N, 5 + nc) predictions must agree within 1e-3 (fp32; fp16 has a looser bound);
* ``--nms`` exports (ONNX, TensorRT): the final detections must equal our Python NMS
  (:func:`detector.ops.nms.non_max_suppression`) run on the same raw predictions.

A failed check is an :class:`~detector.errors.ExportError`: the bad file is deleted, the other formats are still
written, and :meth:`Exporter.run` raises after logging the results table. File layout and metadata are the contract
in docs/architecture.md ("Export formats"); :func:`read_metadata` reads it back for every format.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import difflib
import importlib
import importlib.util
import json
import logging
import math
import shutil
import struct
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.backends.xnnpack
import torchvision
import yaml
from torch import Tensor, nn

from detector.config import ExportConfig, build_config
from detector.engine.backends import decode_metadata_value, load_torchscript, split_engine_header
from detector.errors import ConfigError, DetectorError, ExportError
from detector.ops.nms import non_max_suppression
from detector.utils.files import file_size_mb, increment_path
from detector.utils.torch_utils import select_device

LOGGER = logging.getLogger(__name__)

METADATA_FORMAT = "detector-export-v1"
INPUT_NAME = "images"
RAW_OUTPUT_NAME = "output0"
NMS_OUTPUT_NAMES = ("num_dets", "det_boxes", "det_scores", "det_classes")
MIN_OPSET, MAX_OPSET = 11, 20  # TopK/NonMaxSuppression need 11; torch's TorchScript-based ONNX exporter stops at 20
FP32_TOLERANCE = 1e-3  # raw predictions vs PyTorch: |Δ| of scores, |Δ| / max(1, |value|) of pixel box values
FP16_SCORE_TOLERANCE = 2e-2  # fp16 keeps ~3 significant digits: scores within 0.02 ...
FP16_BOX_TOLERANCE = 1e-2  # ... and box values within 1%
TOLERANCES = {  # precision -> (statistic of |Δ|, bound for boxes, bound for scores) of the raw-prediction check
    "fp32": ("max", FP32_TOLERANCE, FP32_TOLERANCE),
    "fp16": ("max", FP16_BOX_TOLERANCE, FP16_SCORE_TOLERANCE),
    # int8 moves single outputs by up to ~0.3 (measured on yolov5n); the mean catches a broken graph instead
    "int8": ("mean", 0.1, 0.02),
}
NMS_MIN_MATCH_OTHER_RUNTIME = 0.9  # --nms check against PyTorch's predictions (TensorRT): near-ties may swap
CHECK_SEED = 0
CHECK_IMAGES = 4  # --data images the checks run on (cycled to fill a batch)

Runner = Callable[[Tensor], list[np.ndarray]]


# --------------------------------------------------------------------------------------------------------------------
# Results and metadata


@dataclass(frozen=True)
class ExportResult:
    """What happened to one format: where it went, how long it took, and how its check came out."""

    format: str  # registry name, e.g. "onnx"
    title: str  # display name, e.g. "ONNX"
    path: Path | None  # the written file or folder (None when skipped or failed)
    seconds: float = 0.0  # time to write it (the check not included)
    size_mb: float = 0.0
    check: str = ""  # e.g. "max |Δ| 3.1e-05 at 1x3x640x640"
    skipped: str | None = None  # why it was not attempted (missing runtime or device)
    error: str | None = None  # why it failed

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.error is None


def build_metadata(model: nn.Module, config: ExportConfig, imgsz: tuple[int, int]) -> dict[str, Any]:
    """The metadata stored with every export (keys in docs/architecture.md, "Export formats")."""
    strides = [int(s) for s in model.stride.tolist()]
    metadata: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "description": "detector YOLOv5-style detection model",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "names": list(model_names(model)),
        "stride": max(strides),
        "strides": strides,
        "imgsz": list(imgsz),
        "batch": config.batch_size,
        "dynamic": config.dynamic,
        "half": config.half,
        "nms": False,
    }
    return metadata


def nms_metadata(metadata: dict[str, Any], config: ExportConfig) -> dict[str, Any]:
    """``metadata`` for an export with NMS inside its graph: the NMS settings baked into it."""
    return {
        **metadata,
        "nms": True,
        "conf_thres": config.conf_thres,
        "iou_thres": config.iou_thres,
        "topk_all": config.topk_all,
        "topk_per_class": config.topk_per_class,
        "agnostic_nms": config.agnostic_nms,
    }


def model_names(model: nn.Module) -> list[str]:
    """Class names of a model as a list (index = class id); numbered names when it has none."""
    names = getattr(model, "names", None)
    num_classes = int(model.detect.nc)
    if isinstance(names, dict):
        names = [names[i] for i in sorted(names)]
    if not names or len(names) != num_classes:
        return [f"class{i}" for i in range(num_classes)]
    return [str(n) for n in names]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of an exported model, any format: .torchscript, .onnx, *_openvino_model/ (or its .xml), .engine.

    Returns {} when the file carries none (e.g. a TensorRT engine written without our header).
    """
    path = Path(path)
    if path.suffix == ".xml":
        path = path.parent
    if path.is_dir():
        meta_file = path / "metadata.yaml"
        return yaml.safe_load(meta_file.read_text(encoding="utf-8")) or {} if meta_file.is_file() else {}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported model not found")
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: decode_metadata_value(p.value) for p in proto.metadata_props}
    if path.suffix == ".engine":
        return split_engine_header(path.read_bytes())[0]
    return load_torchscript(path, torch.device("cpu"))[1]


def write_engine_file(path: Path, metadata: dict[str, Any], engine: bytes) -> None:
    """TensorRT engine with our header: uint32 little-endian length, that many bytes of JSON, then the engine."""
    header = json.dumps(metadata).encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<I", len(header)))
        f.write(header)
        f.write(engine)


# --------------------------------------------------------------------------------------------------------------------
# NMS inside the graph


def boxes_and_scores(pred: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N, 5 + nc) decoded predictions -> boxes (B, N, 4) xyxy pixels and scores (B, N, nc) = obj * cls.

    Written with slices and cat (no in-place writes) so tracing gives a clean graph.
    """
    center, half_size = pred[..., :2], pred[..., 2:4] / 2
    boxes = torch.cat((center - half_size, center + half_size), -1)
    return boxes, pred[..., 5:] * pred[..., 4:5]


class _OnnxNonMaxSuppression(torch.autograd.Function):
    """ONNX's standard NonMaxSuppression op (onnxruntime and TensorRT's ONNX parser run it).

    forward() gives the same selection in PyTorch (needed for tracing): boxes (B, N, 4) xyxy, scores (B, C, N)
    -> selected (K, 3) int64 rows [batch, class, box], at most ``max_per_class`` per image and class, each with
    score > ``score_threshold``.
    """

    @staticmethod
    def forward(
        ctx: Any, boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float, score_threshold: float
    ) -> Tensor:
        batch_size, num_classes, _ = scores.shape
        selected = []
        for image in range(batch_size):
            class_index, box_index = (scores[image] > score_threshold).nonzero(as_tuple=True)
            candidate_scores = scores[image, class_index, box_index]
            keep = torchvision.ops.batched_nms(boxes[image, box_index], candidate_scores, class_index, iou_threshold)
            class_index, box_index = class_index[keep], box_index[keep]  # by descending score
            for cls in range(num_classes):
                in_class = box_index[class_index == cls][:max_per_class]
                batch_column = torch.full_like(in_class, image)
                selected.append(torch.stack((batch_column, torch.full_like(in_class, cls), in_class), 1))
        return torch.cat(selected) if selected else scores.new_zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(
        g: Any, boxes: Any, scores: Any, max_per_class: int, iou_threshold: float, score_threshold: float
    ) -> Any:
        max_output = g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32))
        score = g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_output, iou, score, center_point_box_i=0)


def _fixed_size_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor | None, selected: Tensor, topk_all: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Selected (K, 3) [batch, class, box] rows -> EfficientNMS-style fixed-size outputs, with no Python branches.

    boxes (B, N, 4), scores (B, N, C), labels (B, N) class ids when the NMS ran class-agnostic on one score column.
    Each image keeps its ``topk_all`` best selections: a (B, K) score matrix holds each selection in its own
    image's row and -1 elsewhere, padded with ``topk_all`` columns of -1 so TopK always has enough columns.
    Returns num_dets (B, 1) int32, det_boxes (B, topk_all, 4), det_scores (B, topk_all), det_classes (B, topk_all)
    int32; rows at or after num_dets are zeros.
    """
    batch_size, num_boxes, num_columns = scores.shape
    image, column, box = selected[:, 0], selected[:, 1], selected[:, 2]
    flat_box = image * num_boxes + box
    selected_scores = scores.reshape(-1)[flat_box * num_columns + column]  # (K,)
    selected_boxes = boxes.reshape(-1, 4)[flat_box]  # (K, 4)
    selected_classes = column if labels is None else labels.reshape(-1)[flat_box]

    image_ids = torch.arange(batch_size, device=boxes.device)
    per_image = torch.where(image[None, :] == image_ids[:, None], selected_scores[None, :], -1.0)  # (B, K)
    padding = torch.full_like(scores[:, 0, :1], -1.0).repeat(1, topk_all)  # (B, topk_all); shape from B only
    top_scores, top_index = torch.cat((per_image, padding), 1).topk(topk_all, dim=1)
    valid = top_scores > -0.5

    padded_boxes = torch.cat((selected_boxes, selected_boxes.new_zeros((topk_all, 4))), 0)
    padded_classes = torch.cat((selected_classes, selected_classes.new_zeros((topk_all,))), 0)
    num_dets = valid.sum(1, keepdim=True).to(torch.int32)
    det_boxes = padded_boxes[top_index] * valid[..., None].to(boxes.dtype)
    det_scores = torch.where(valid, top_scores, 0.0)
    det_classes = (padded_classes[top_index] * valid.to(padded_classes.dtype)).to(torch.int32)
    return num_dets, det_boxes, det_scores, det_classes


class _TensorRTEfficientNMS(torch.autograd.Function):
    """TensorRT's EfficientNMS_TRT plugin (TensorRT's ONNX parser maps the TRT::EfficientNMS_TRT node to it).

    forward() computes the same fixed-size outputs in PyTorch so the graph can be traced: boxes (B, N, 4) xyxy,
    scores (B, N, C) -> num_dets (B, 1) int32, det_boxes (B, K, 4), det_scores (B, K), det_classes (B, K) int32.
    """

    @staticmethod
    def forward(
        ctx: Any, boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_output: int,
        agnostic: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        labels = None
        if agnostic:
            scores, labels = scores.max(2, keepdim=True)
        selected = _OnnxNonMaxSuppression.forward(
            None, boxes, scores.transpose(1, 2), max_output, iou_threshold, score_threshold
        )
        return _fixed_size_detections(boxes, scores, labels, selected, max_output)

    @staticmethod
    def symbolic(
        g: Any, boxes: Any, scores: Any, iou_threshold: float, score_threshold: float, max_output: int,
        agnostic: bool,
    ) -> Any:  # fmt: skip
        return g.op(
            "TRT::EfficientNMS_TRT",
            boxes,
            scores,
            background_class_i=-1,
            box_coding_i=0,  # corners: x1, y1, x2, y2
            iou_threshold_f=iou_threshold,
            max_output_boxes_i=max_output,
            plugin_version_s="1",
            score_activation_i=0,  # scores are already probabilities
            score_threshold_f=score_threshold,
            class_agnostic_i=int(agnostic),
            outputs=4,
        )


class NMSModel(nn.Module):
    """A detection model followed by NMS, for export: images (B, 3, H, W) -> EfficientNMS-layout detections.

    ``flavor`` "onnx" uses the standard ONNX NonMaxSuppression op (per class, at most ``topk_per_class`` boxes per
    class and image); "tensorrt" uses the EfficientNMS_TRT plugin node (no per-class cap). Either way the outputs
    are num_dets (B, 1) int32, det_boxes (B, topk_all, 4) float32 xyxy pixels, det_scores (B, topk_all) float32,
    det_classes (B, topk_all) int32. NMS runs in float32 even for a half model (ONNX's op is float32-only).
    """

    def __init__(self, model: nn.Module, config: ExportConfig, flavor: str = "onnx") -> None:
        super().__init__()
        if flavor not in ("onnx", "tensorrt"):
            raise ValueError(f"flavor must be 'onnx' or 'tensorrt', got {flavor!r}")
        self.model = model
        self.flavor = flavor
        self.conf_thres = config.conf_thres
        self.iou_thres = config.iou_thres
        self.topk_all = config.topk_all
        self.topk_per_class = config.topk_per_class
        self.agnostic = config.agnostic_nms

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        boxes, scores = boxes_and_scores(self.model(images).float())
        if self.flavor == "tensorrt":
            return _TensorRTEfficientNMS.apply(
                boxes, scores, self.iou_thres, self.conf_thres, self.topk_all, self.agnostic
            )
        labels = None
        max_per_class = self.topk_per_class
        if self.agnostic:
            scores, labels = scores.max(2, keepdim=True)  # one NMS over every box, each with its best class
            max_per_class = self.topk_all
        selected = _OnnxNonMaxSuppression.apply(
            boxes, scores.transpose(1, 2), max_per_class, self.iou_thres, self.conf_thres
        )
        return _fixed_size_detections(boxes, scores, labels, selected, self.topk_all)


class RawOutput(nn.Module):
    """Wraps a model so the exported graph has exactly one output: the decoded (B, N, 5 + nc) predictions."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        output = self.model(images)
        return output[0] if isinstance(output, (tuple, list)) else output


def reference_detections(pred: Tensor, config: ExportConfig) -> list[Tensor]:
    """What an ``--nms`` export must output, from our Python NMS on the same raw predictions.

    pred (B, N, 5 + nc) -> per image (n, 6) [x1, y1, x2, y2, score, class], by descending score, with the exported
    graph's caps applied: ``topk_per_class`` per class (class-aware NMS only), then ``topk_all`` per image.
    """
    agnostic = config.agnostic_nms
    detections = non_max_suppression(
        pred.float(),
        conf_thres=config.conf_thres,
        iou_thres=config.iou_thres,
        agnostic=agnostic,
        multi_label=not agnostic,  # ONNX/TensorRT NMS keep a box once per class above the threshold
        max_det=pred.shape[1] * max(1, pred.shape[2] - 5),
        max_nms=pred.shape[1] * max(1, pred.shape[2] - 5),
    )
    capped = []
    for image_detections in detections:
        if not agnostic:
            classes = image_detections[:, 5].long()
            rank_in_class = torch.zeros_like(classes)
            for cls in classes.unique():
                in_class = (classes == cls).nonzero().flatten()  # already by descending score
                rank_in_class[in_class] = torch.arange(len(in_class))
            image_detections = image_detections[rank_in_class < config.topk_per_class]
        capped.append(image_detections[: config.topk_all])
    return capped


def compare_detections(
    outputs: Sequence[np.ndarray],
    expected: Sequence[Tensor],
    atol: float,
    borderline_score: float | None = None,
    min_match_fraction: float = 1.0,
) -> tuple[int, str | None]:
    """Match EfficientNMS-layout ``outputs`` against ``expected`` per-image (n, 6) detections.

    A detection matches one of the same class whose score agrees within ``atol`` and box within ``atol`` of its
    largest coordinate. With ``borderline_score``, detections scoring below it may be missing on either side (a
    score within rounding of the threshold can fall either way). ``min_match_fraction`` < 1 tolerates a few
    unmatched detections: when the raw predictions come from another runtime, two boxes with near-equal scores
    can swap which one NMS keeps. Returns (number matched, None) or (number matched, what differs).
    """
    num_dets, boxes, scores, classes = (np.asarray(o) for o in outputs)
    matched, unmatched, first_problem = 0, 0, None
    for image, want in enumerate(expected):
        want = want.detach().cpu().double().numpy()
        count = int(num_dets[image].reshape(-1)[0])
        got = np.concatenate(
            (boxes[image, :count], scores[image, :count, None], classes[image, :count, None]), 1
        ).astype(np.float64)
        if count < boxes.shape[1] and (np.abs(boxes[image, count:]).max(initial=0) > 0 or scores[image, count:].any()):
            return matched, f"image {image}: rows after num_dets={count} are not zero"
        used = np.zeros(len(got), bool)
        for row in want:
            close = (
                ~used
                & (got[:, 5] == row[5])
                & (np.abs(got[:, :4] - row[:4]).max(1, initial=0) <= atol * max(1.0, np.abs(row[:4]).max()))
                & (np.abs(got[:, 4] - row[4]) <= atol)
            )
            if close.any():
                used[np.argmax(close)] = True
                matched += 1
            elif borderline_score is None or row[4] >= borderline_score:
                unmatched += 1
                first_problem = first_problem or f"image {image}: expected {_format_detection(row)} is missing"
        for row in got[~used]:
            if borderline_score is None or row[4] >= borderline_score:
                unmatched += 1
                first_problem = first_problem or f"image {image}: unexpected {_format_detection(row)}"
    if unmatched > (1 - min_match_fraction) * (matched + unmatched):
        return matched, f"{unmatched} unmatched detections, first: {first_problem}"
    return matched, None


def _format_detection(row: np.ndarray) -> str:
    x1, y1, x2, y2, score, cls = row.tolist()
    return f"class {int(cls)} score {score:.4f} box ({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f})"


# --------------------------------------------------------------------------------------------------------------------
# Shared state of one export run


@dataclass
class ExportContext:
    """Everything a format needs: the prepared model, the options, where to write, and cached intermediate files."""

    config: ExportConfig
    model: nn.Module  # fused, eval, Detect.export on, float32, on ``device``; outputs (B, N, 5 + nc)
    metadata: dict[str, Any]
    imgsz: tuple[int, int]  # (height, width)
    device: torch.device
    output_stem: Path  # run folder / weights stem: formats add their suffix
    work_dir: Path  # temporary files (e.g. an ONNX file that only OpenVINO needs), removed after the run
    _half_model: nn.Module | None = None
    _onnx_files: dict[tuple[str, bool], Path] = field(default_factory=dict)
    _predictions: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a format could not do as asked, shown with its result
    check_images: list[np.ndarray] = field(default_factory=list)  # BGR images from --data for the checks

    @property
    def max_stride(self) -> int:
        return int(self.metadata["stride"])

    @property
    def export_shape(self) -> tuple[int, int, int, int]:
        return (self.config.batch_size, 3, *self.imgsz)

    def model_in(self, half: bool) -> nn.Module:
        """The model in fp32, or an fp16 copy (made once)."""
        if not half:
            return self.model
        if self._half_model is None:
            self._half_model = copy.deepcopy(self.model).half()
        return self._half_model

    def example_input(self, shape: Sequence[int], half: bool = False) -> Tensor:
        """The (B, 3, H, W) input the checks run, in [0, 1]: --data's first validation images letterboxed to
        (H, W) when --data is given (real scenes give real detections for the --nms check), else a deterministic
        pattern of smooth random blobs."""
        batch, channels, height, width = shape
        if self.check_images:
            images = [
                self.letterboxed(self.check_images[i % len(self.check_images)], (height, width)) for i in range(batch)
            ]
            image = torch.from_numpy(np.stack(images)).to(self.device)
        else:
            generator = torch.Generator().manual_seed(CHECK_SEED)
            coarse = torch.rand((batch, channels, max(1, height // 16), max(1, width // 16)), generator=generator)
            image = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
            noise = torch.rand((batch, channels, height, width), generator=generator) * 0.1
            image = (image * 0.9 + noise).clamp(0, 1).to(self.device)
        return image.half() if half else image

    def letterboxed(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A BGR uint8 image -> (3, H, W) float32 RGB 0-1, letterboxed to ``size`` (height, width) as val.py does."""
        from detector.data.augment import letterbox

        image, _ = letterbox(image, size, stride=self.max_stride, auto=False)
        return np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)).astype(np.float32) / 255

    @torch.inference_mode()
    def torch_predictions(self, images: Tensor, half: bool = False) -> Tensor:
        """Raw (B, N, 5 + nc) predictions of the PyTorch model (fp32 or its fp16 copy) as float32, on the CPU.

        Cached per input: every format is checked on the same few inputs.
        """
        key = (tuple(images.shape), str(images.dtype), half, float(images.float().sum()))
        if key not in self._predictions:
            model = self.model_in(half)
            dtype = torch.float16 if half else torch.float32
            self._predictions[key] = RawOutput(model).eval()(images.to(self.device, dtype)).float().cpu()
        return self._predictions[key]

    def onnx_file(self, flavor: str, half: bool) -> Path:
        """An ONNX file of this model in ``work_dir`` (made once per flavor/precision): "raw", "nms" or "tensorrt"."""
        key = (flavor, half)
        if key not in self._onnx_files or not self._onnx_files[key].is_file():
            path = self.work_dir / f"{self.output_stem.name}_{flavor}{'_fp16' if half else ''}.onnx"
            write_onnx(self, path, flavor=flavor, half=half, simplify=False)
            self._onnx_files[key] = path
        return self._onnx_files[key]


# --------------------------------------------------------------------------------------------------------------------
# The format registry


class ExportFormat(ABC):
    """One export format: how to write it, how to run the written file for the check, and when it is available."""

    name: ClassVar[str]  # the --include value
    title: ClassVar[str]  # the name in the results table
    supports_nms: ClassVar[bool] = False  # whether --nms puts NMS into this format's graph

    def unavailable(self, ctx: ExportContext) -> str | None:
        """Why this format cannot be written here (missing package/device), or None."""
        return None

    @abstractmethod
    def output_path(self, ctx: ExportContext) -> Path:
        """Where the file (or folder) goes."""

    @abstractmethod
    def write(self, ctx: ExportContext) -> Path:
        """Write the export and return its path."""

    @abstractmethod
    def load(self, path: Path, ctx: ExportContext) -> Runner:
        """A function running the written file in its own runtime: images (B, 3, H, W) -> list of outputs."""

    def uses_nms(self, ctx: ExportContext) -> bool:
        return self.supports_nms and ctx.config.nms

    def is_half(self, ctx: ExportContext) -> bool:
        return ctx.config.half

    def check_shapes(self, ctx: ExportContext) -> list[tuple[int, int, int, int]]:
        """Input shapes the check runs: the export shape, plus another batch and size for --dynamic."""
        shapes = [ctx.export_shape]
        if ctx.config.dynamic:
            height, width = ctx.imgsz
            smaller = max(ctx.max_stride, (height // 2) // ctx.max_stride * ctx.max_stride)
            shapes.append((ctx.config.batch_size + 1, 3, smaller, width))
        return shapes

    def nms_reference_predictions(self, images: Tensor, ctx: ExportContext) -> tuple[Tensor, bool]:
        """Raw predictions the NMS check starts from, and whether they came from this format's own runtime
        (then results must match exactly; from PyTorch, borderline detections may differ by rounding)."""
        return ctx.torch_predictions(images, half=self.is_half(ctx)), False


FORMATS: dict[str, type[ExportFormat]] = {}


def register_format(cls: type[ExportFormat]) -> type[ExportFormat]:
    """Class decorator adding an export format to :data:`FORMATS` under ``cls.name``."""
    if cls.name in FORMATS:
        raise ValueError(f"export format {cls.name!r} is registered twice")
    FORMATS[cls.name] = cls
    return cls


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence TracerWarnings and the TorchScript-based ONNX exporter's deprecation notice during export.

    Tracer warnings flag Python values frozen into a trace; the check after every export runs the file at a
    second input shape with --dynamic, which is what catches a wrongly frozen shape.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.jit.trace/load announce TorchScript's deprecation; it stays the way to write .torchscript files
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        yield


def write_onnx(ctx: ExportContext, path: Path, *, flavor: str, half: bool, simplify: bool) -> Path:
    """Export the model to ONNX at ``path``: flavor "raw" (output0), "nms" (ONNX NonMaxSuppression) or
    "tensorrt" (EfficientNMS_TRT node, only TensorRT can run it). Metadata goes into ``metadata_props``."""
    import onnx

    config = ctx.config
    model = RawOutput(ctx.model_in(half))
    if flavor != "raw":
        model = NMSModel(model, config, "tensorrt" if flavor == "tensorrt" else "onnx")
    example = ctx.example_input(ctx.export_shape, half=half)
    trace_to_onnx(model, example, path, opset=config.opset, nms=flavor != "raw", dynamic=config.dynamic)
    proto = onnx.load(str(path))
    if simplify:
        proto = _simplify_onnx(proto)
    if flavor != "raw":
        _set_detection_output_shapes(proto, config.topk_all)
    metadata = ctx.metadata if flavor == "raw" else nms_metadata(ctx.metadata, config)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    if flavor != "tensorrt":  # the checker does not know TRT:: plugin ops
        onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


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
    with _quiet_tracing(), torch.inference_mode(False), torch.no_grad():
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


# --------------------------------------------------------------------------------------------------------------------
# Formats


@register_format
class TorchScriptFormat(ExportFormat):
    """TorchScript by tracing; names/stride in ``_extra_files["config.txt"]``. --optimize: mobile lite file."""

    name = "torchscript"
    title = "TorchScript"

    def unavailable(self, ctx: ExportContext) -> str | None:
        if ctx.config.optimize and not torch.backends.xnnpack.enabled:  # type: ignore[attr-defined]
            return "--optimize needs a PyTorch build with XNNPACK (this one has none); export without --optimize"
        return None

    def output_path(self, ctx: ExportContext) -> Path:
        return ctx.output_stem.with_suffix(".torchscript")

    def write(self, ctx: ExportContext) -> Path:
        path = self.output_path(ctx)
        half = self.is_half(ctx)
        example = ctx.example_input(ctx.export_shape, half=half)
        with _quiet_tracing(), torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(RawOutput(ctx.model_in(half)).eval(), example, strict=False, check_trace=False)
        extra_files = {"config.txt": json.dumps(ctx.metadata)}
        if ctx.config.optimize:
            from torch.utils.mobile_optimizer import optimize_for_mobile

            optimize_for_mobile(traced)._save_for_lite_interpreter(str(path), _extra_files=extra_files)
        else:
            traced.save(str(path), _extra_files=extra_files)
        return path

    def load(self, path: Path, ctx: ExportContext) -> Runner:
        if ctx.config.optimize:
            from torch.jit.mobile import _load_for_lite_interpreter

            module = _load_for_lite_interpreter(str(path), map_location=ctx.device)
        else:
            module = torch.jit.load(str(path), map_location=ctx.device)
        half = self.is_half(ctx)

        def run(images: Tensor) -> list[np.ndarray]:
            with torch.inference_mode():
                output = module(images.to(ctx.device, torch.float16 if half else torch.float32))
            return [output.float().cpu().numpy()]

        return run


def _onnx_runner(path: Path, half: bool) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> list[np.ndarray]:
        array = images.detach().cpu().numpy().astype(np.float16 if half else np.float32)
        return list(session.run(None, {INPUT_NAME: array}))

    return run


@register_format
class OnnxFormat(ExportFormat):
    """ONNX (--opset, --dynamic, --simplify, --half, --nms); metadata in ``metadata_props``; checked in onnxruntime."""

    name = "onnx"
    title = "ONNX"
    supports_nms = True

    def unavailable(self, ctx: ExportContext) -> str | None:
        return _missing_packages("onnx", "onnxruntime")

    def output_path(self, ctx: ExportContext) -> Path:
        return ctx.output_stem.with_suffix(".onnx")

    def write(self, ctx: ExportContext) -> Path:
        flavor = "nms" if self.uses_nms(ctx) else "raw"
        path = write_onnx(
            ctx, self.output_path(ctx), flavor=flavor, half=self.is_half(ctx), simplify=ctx.config.simplify
        )
        if flavor == "raw" and not ctx.config.simplify:
            ctx._onnx_files.setdefault(("raw", self.is_half(ctx)), path)  # OpenVINO can convert this one
        return path

    def load(self, path: Path, ctx: ExportContext) -> Runner:
        return _onnx_runner(path, self.is_half(ctx))

    def nms_reference_predictions(self, images: Tensor, ctx: ExportContext) -> tuple[Tensor, bool]:
        # The same graph without NMS, in the same runtime: its predictions are the ones the NMS op saw.
        raw = _onnx_runner(ctx.onnx_file("raw", self.is_half(ctx)), self.is_half(ctx))(images)[0]
        return torch.from_numpy(raw).float(), True


def _missing_packages(*modules: str) -> str | None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs the Python package(s) {', '.join(missing)} (pip install {' '.join(missing)})"
    return None


@register_format
class OpenVINOFormat(ExportFormat):
    """OpenVINO IR converted from our ONNX file with openvino.convert_model, saved with openvino.save_model.

    ``--half`` stores fp16 weights (compress_to_fp16); ``--int8`` quantizes with NNCF when it is installed.
    """

    name = "openvino"
    title = "OpenVINO"

    def unavailable(self, ctx: ExportContext) -> str | None:
        return _missing_packages("openvino", "onnx")

    def output_path(self, ctx: ExportContext) -> Path:
        return ctx.output_stem.parent / f"{ctx.output_stem.name}_openvino_model"

    def is_half(self, ctx: ExportContext) -> bool:
        return False  # the graph stays fp32; --half only compresses the stored weights

    def write(self, ctx: ExportContext) -> Path:
        import openvino

        folder = self.output_path(ctx)
        folder.mkdir(parents=True, exist_ok=True)
        ov_model = openvino.convert_model(str(ctx.onnx_file("raw", half=False)))
        metadata = dict(ctx.metadata)
        metadata["int8"] = False
        if ctx.config.int8:
            missing = _missing_packages("nncf")
            if missing:
                ctx.notes.append(
                    f"int8 skipped: NNCF quantization {missing}; the IR is {'fp16' if ctx.config.half else 'fp32'}"
                )
            else:
                ov_model = _quantize_int8(ov_model, ctx)
                metadata["int8"] = True
        openvino.save_model(ov_model, str(folder / f"{ctx.output_stem.name}.xml"), compress_to_fp16=ctx.config.half)
        (folder / "metadata.yaml").write_text(yaml.safe_dump(metadata, sort_keys=False), encoding="utf-8")
        return folder

    def load(self, path: Path, ctx: ExportContext) -> Runner:
        import openvino

        core = openvino.Core()
        # fp32 arithmetic whatever the CPU's default (bf16 on CPUs with AMX/AVX512-BF16), so the check is exact.
        compiled = core.compile_model(
            str(path / f"{ctx.output_stem.name}.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
        output = compiled.output(0)

        def run(images: Tensor) -> list[np.ndarray]:
            return [np.asarray(compiled(images.detach().cpu().float().numpy())[output])]

        return run


def _quantize_int8(ov_model: Any, ctx: ExportContext) -> Any:
    """Post-training int8 quantization with NNCF on up to 300 letterboxed images of --data's validation set."""
    import nncf

    images = [ctx.letterboxed(image, ctx.imgsz)[None] for image in dataset_images(ctx.config.data, limit=300)]
    dataset = nncf.Dataset(images, lambda image: image)
    return nncf.quantize(ov_model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(images))


def dataset_images(data: str, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` BGR (H, W, 3) uint8 validation images of a dataset YAML ("" = the built-in dataset).

    Unreadable files are skipped with a warning; none readable is an ExportError naming the dataset.
    """
    import cv2

    from detector.data.dataset import find_images
    from detector.data.dataset_config import load_dataset_config

    images = []
    for file, _ in find_images(load_dataset_config(data).val)[:limit]:
        image = cv2.imread(str(file))
        if image is None:
            LOGGER.warning(f"skipping unreadable image {file}")
            continue
        images.append(image)
    if not images:
        raise ExportError(f"--data {data!r}: no readable images in its validation set")
    return images


@register_format
class TensorRTFormat(ExportFormat):
    """TensorRT engine built from our ONNX file with the tensorrt Python API (CUDA only).

    --half sets the FP16 builder flag (input and outputs stay float32), --workspace caps the builder's memory
    pool (GiB), --dynamic adds an optimisation profile for batch 1..--batch-size and sizes from one stride up to
    --imgsz, --nms appends the EfficientNMS_TRT plugin. The file starts with our JSON metadata header.
    """

    name = "engine"
    title = "TensorRT"
    supports_nms = True

    def unavailable(self, ctx: ExportContext) -> str | None:
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

    def cuda_device(self, ctx: ExportContext) -> torch.device:
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
        with torch.cuda.device(self.cuda_device(ctx)):
            serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(
                "TensorRT engine build failed (the TensorRT log above says why; a larger --workspace may help)"
            )
        metadata = nms_metadata(ctx.metadata, ctx.config) if flavor != "raw" else dict(ctx.metadata)
        path = self.output_path(ctx)
        write_engine_file(path, metadata, bytes(serialized))
        return path

    def load(self, path: Path, ctx: ExportContext) -> Runner:
        import tensorrt as trt

        device = self.cuda_device(ctx)
        _, engine_bytes = split_engine_header(path.read_bytes())
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise ExportError(f"{path}: TensorRT could not deserialize the engine it just built")
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

        def run(images: Tensor) -> list[np.ndarray]:
            images = images.to(device, torch.float32).contiguous()
            context.set_input_shape(INPUT_NAME, tuple(images.shape))
            context.set_tensor_address(INPUT_NAME, images.data_ptr())
            buffers = []
            for name in outputs:
                dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
                buffer = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=device)
                context.set_tensor_address(name, buffer.data_ptr())
                buffers.append(buffer)
            stream = torch.cuda.current_stream(device)
            if not context.execute_async_v3(stream.cuda_stream):
                raise ExportError(f"{path}: TensorRT inference failed")
            stream.synchronize()
            return [b.float().cpu().numpy() if b.is_floating_point() else b.cpu().numpy() for b in buffers]

        return run


# --------------------------------------------------------------------------------------------------------------------
# The exporter


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` ready to export: float32 on ``device``, eval, BatchNorm fused, no gradients, and
    ``Detect.export`` on so grids are computed from the input shape inside the graph."""
    model = copy.deepcopy(model).to(device).float().eval()
    if hasattr(model, "fuse"):
        model = model.fuse() or model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    detect = getattr(model, "detect", None)
    if detect is None or not hasattr(detect, "export"):
        raise ExportError("the model has no Detect head with an export mode (expected a detector DetectionModel)")
    detect.export = True
    return model


class Exporter:
    """Writes the formats of ``config.include`` and checks each against the PyTorch model.

    ``Exporter(config).run()`` loads ``config.weights``; ``run(model)`` exports an in-memory DetectionModel.
    Returns one :class:`ExportResult` per format, or raises ExportError (after logging the table) if any failed.
    """

    def __init__(self, config: ExportConfig) -> None:
        self.config = config
        validate_config(config)

    def run(self, model: nn.Module | None = None) -> list[ExportResult]:
        config = self.config
        device = select_device(config.device)
        if model is None:
            if not config.weights:
                raise ConfigError("--weights: expected a model file (.pt), got nothing")
            from detector.models.loading import load_model

            model = load_model(config.weights, device=str(device))
        started = time.perf_counter()
        model = prepare_model(model, device)
        imgsz = export_image_size(config.imgsz, int(model.stride.max()))
        stem = Path(config.weights).stem if config.weights else "model"
        run_dir = increment_path(Path(config.project) / config.name, exist_ok=config.exist_ok)
        if config.inplace:
            LOGGER.info("--inplace has no effect: the exported Detect head never writes into its inputs")
        if config.nms and not any(FORMATS[name].supports_nms for name in config.include):
            LOGGER.warning(f"--nms applies to {_nms_formats()} only; {', '.join(config.include)} stay raw")
        LOGGER.info(
            f"Exporting {stem} ({len(model_names(model))} classes, input {config.batch_size}x3x{imgsz[0]}x{imgsz[1]}"
            f"{', dynamic' if config.dynamic else ''}{', fp16' if config.half else ''}"
            f"{', NMS in graph' if config.nms else ''}) to {run_dir}"
        )
        with tempfile.TemporaryDirectory(prefix=".export-", dir=run_dir) as work_dir:
            ctx = ExportContext(
                config=config,
                model=model,
                metadata=build_metadata(model, config, imgsz),
                imgsz=imgsz,
                device=device,
                output_stem=run_dir / stem,
                work_dir=Path(work_dir),
                check_images=dataset_images(config.data, limit=CHECK_IMAGES) if config.data else [],
            )
            results = [export_format(FORMATS[name](), ctx) for name in config.include]
        LOGGER.info(results_table(results))
        LOGGER.info(f"Export finished in {time.perf_counter() - started:.1f}s, results in {run_dir}")
        failed = [r for r in results if r.error]
        if failed:
            raise ExportError("; ".join(f"{r.title}: {r.error}" for r in failed))
        if not any(r.ok for r in results):  # asked for formats, got none: a script must not take that as success
            raise ExportError("nothing exported: " + "; ".join(f"{r.title} skipped ({r.skipped})" for r in results))
        return results


def export_format(fmt: ExportFormat, ctx: ExportContext) -> ExportResult:
    """Write one format and check it; problems become the result's ``skipped``/``error``, never an exception."""
    reason = fmt.unavailable(ctx)
    if reason:
        LOGGER.info(f"{fmt.title}: skipped, {reason}")
        return ExportResult(fmt.name, fmt.title, None, skipped=reason)
    LOGGER.info(f"{fmt.title}: exporting with {_runtime_versions(fmt.name)}...")
    path = fmt.output_path(ctx)
    ctx.notes.clear()
    started = time.perf_counter()
    try:
        with _quiet_tracing():
            path = fmt.write(ctx)
            seconds = time.perf_counter() - started
            check = check_export(fmt, path, ctx)
    except DetectorError as e:
        _remove(path)
        return ExportResult(fmt.name, fmt.title, None, time.perf_counter() - started, error=str(e))
    except Exception as e:  # a converter's own failure (torch.onnx, OpenVINO, TensorRT): report it in one line
        LOGGER.debug(f"{fmt.title} export failed", exc_info=True)
        _remove(path)
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        error = f"export failed with {type(e).__name__}: {first_line}"
        return ExportResult(fmt.name, fmt.title, None, time.perf_counter() - started, error=error)
    for note in ctx.notes:
        LOGGER.warning(f"{fmt.title}: {note}")
    check = "; ".join([check, *ctx.notes])
    LOGGER.info(f"{fmt.title}: {path} ({file_size_mb(path):.1f} MB, {seconds:.1f}s), check {check}")
    return ExportResult(fmt.name, fmt.title, path, seconds, file_size_mb(path), check)


def _remove(path: Path) -> None:
    """Delete a failed export so nothing downstream picks up a bad file."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_export(fmt: ExportFormat, path: Path, ctx: ExportContext) -> str:
    """Run the written file in its runtime at every check shape and compare with PyTorch; ExportError if off."""
    runner = fmt.load(path, ctx)
    half = fmt.is_half(ctx)
    if fmt.name == "openvino" and read_metadata(path).get("int8"):
        precision = "int8"
    elif half or (fmt.name == "openvino" and ctx.config.half):
        precision = "fp16"
    else:
        precision = "fp32"
    reports = []
    for shape in fmt.check_shapes(ctx):
        images = ctx.example_input(shape, half=half)
        outputs = runner(images)
        shape_text = "x".join(map(str, shape))
        if fmt.uses_nms(ctx):
            reports.append(_check_nms(fmt, outputs, images, ctx, precision != "fp32", shape_text))
        else:
            expected = ctx.torch_predictions(images, half=half)
            reports.append(_check_raw(outputs, expected, TOLERANCES[precision], shape_text))
    return "; ".join(reports)


def _check_raw(outputs: list[np.ndarray], expected: Tensor, tolerance: tuple[str, float, float], where: str) -> str:
    """Raw predictions vs PyTorch: the max (or mean, for int8) |Δ| of scores, and of boxes relative to their values.

    Box columns are pixels (up to the input size), so float32 rounding alone moves them by ~1e-5 of their value;
    the bound applies to |Δ| / max(1, |value|) there, and to |Δ| for the 0-1 scores.
    """
    got = torch.from_numpy(np.asarray(outputs[0])).float()
    expected = expected.cpu()
    if got.shape != expected.shape:
        raise ExportError(f"output shape {tuple(got.shape)} != PyTorch's {tuple(expected.shape)} at {where}")
    if not torch.isfinite(got).all():
        raise ExportError(f"predictions contain NaN or infinity at {where}")
    statistic, box_bound, score_bound = tolerance
    reduce = _max_or_zero if statistic == "max" else _mean_or_zero
    difference = (got - expected).abs()
    box_error = reduce(difference[..., :4] / expected[..., :4].abs().clamp(min=1))
    score_error = reduce(difference[..., 4:])
    report = f"scores {statistic} |Δ| {score_error:.1e}, boxes {statistic} |Δ|/value {box_error:.1e} at {where}"
    if box_error > box_bound or score_error > score_bound:
        raise ExportError(
            f"predictions differ from PyTorch beyond the tolerance (scores {score_bound:g}, boxes {box_bound:g}): "
            f"{report}"
        )
    return report


def _mean_or_zero(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0


def _max_or_zero(values: Tensor) -> float:
    return float(values.max()) if values.numel() else 0.0


def _check_nms(
    fmt: ExportFormat, outputs: list[np.ndarray], images: Tensor, ctx: ExportContext, lossy: bool, where: str
) -> str:
    if len(outputs) != 4:
        raise ExportError(f"expected 4 NMS outputs {NMS_OUTPUT_NAMES}, got {len(outputs)} at {where}")
    predictions, same_runtime = fmt.nms_reference_predictions(images, ctx)
    expected = reference_detections(predictions, ctx.config)
    atol = 1e-4 if same_runtime else (FP16_SCORE_TOLERANCE if lossy else FP32_TOLERANCE)
    # A score within rounding of the threshold may fall on either side, even between two graphs in one runtime.
    borderline = ctx.config.conf_thres + atol
    fraction = 1.0 if same_runtime else NMS_MIN_MATCH_OTHER_RUNTIME
    matched, problem = compare_detections(outputs, expected, atol, borderline, min_match_fraction=fraction)
    if problem:
        raise ExportError(f"NMS output differs from Python NMS on the same predictions at {where}: {problem}")
    total = sum(len(e) for e in expected)
    if total == 0:
        hint = "" if ctx.check_images else " (--data gives the check real images)"
        return f"no detections above --conf-thres on the check input{hint}, as Python NMS at {where}"
    return f"{matched}/{total} detections = Python NMS at {where}"


def _runtime_versions(name: str) -> str:
    modules = {"torchscript": ["torch"], "onnx": ["onnx", "onnxruntime"], "openvino": ["openvino"]}
    modules["engine"] = ["tensorrt"]
    versions = []
    for module in modules.get(name, []):
        spec = importlib.util.find_spec(module)
        if spec is not None:
            versions.append(f"{module} {getattr(importlib.import_module(module), '__version__', '?')}")
    return ", ".join(versions) or "no runtime"


def results_table(results: Sequence[ExportResult]) -> str:
    """The results as an aligned text table: format, file, size, time, check (or why skipped/failed)."""
    rows = [("Format", "File", "Size", "Time", "Check")]
    for r in results:
        if r.ok:
            rows.append((r.title, str(r.path), f"{r.size_mb:.1f} MB", f"{r.seconds:.1f}s", f"ok: {r.check}"))
        else:
            status = f"skipped: {r.skipped}" if r.skipped else f"FAILED: {r.error}"
            rows.append((r.title, "-", "-", f"{r.seconds:.1f}s" if r.error else "-", status))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ]
    return "\n".join(lines)


def _nms_formats() -> str:
    return ", ".join(name for name, cls in FORMATS.items() if cls.supports_nms)


def export_image_size(imgsz: Sequence[int], stride: int) -> tuple[int, int]:
    """(height, width) from one or two numbers, each rounded up to a multiple of ``stride`` (with a warning)."""
    if len(imgsz) not in (1, 2):
        raise ConfigError(f"--imgsz: expected one or two numbers (height width), got {list(imgsz)}")
    height, width = (imgsz[0], imgsz[0]) if len(imgsz) == 1 else imgsz
    rounded = tuple(max(stride, math.ceil(v / stride) * stride) for v in (height, width))
    if rounded != (height, width):
        LOGGER.warning(
            f"--imgsz {height} {width} rounded up to {rounded[0]} {rounded[1]}, a multiple of stride {stride}"
        )
    return rounded  # type: ignore[return-value]


def validate_config(config: ExportConfig) -> None:
    """One-line ConfigError for options that cannot work, before any work is done."""
    if not config.include:
        raise ConfigError(f"--include: expected one or more of {', '.join(FORMATS)}")
    for name in config.include:
        if name not in FORMATS:
            close = difflib.get_close_matches(name, FORMATS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"--include: unknown format {name!r}{hint} (choose from {', '.join(FORMATS)})")
    if any(v < 1 for v in config.imgsz):
        raise ConfigError(f"--imgsz: expected positive sizes, got {list(config.imgsz)}")
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size: expected at least 1, got {config.batch_size}")
    if not MIN_OPSET <= config.opset <= MAX_OPSET:
        raise ConfigError(f"--opset: expected {MIN_OPSET}..{MAX_OPSET} (torch's ONNX exporter), got {config.opset}")
    for flag, value in (("--conf-thres", config.conf_thres), ("--iou-thres", config.iou_thres)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{flag}: expected a value in [0, 1], got {value}")
    for flag, value in (("--topk-all", config.topk_all), ("--topk-per-class", config.topk_per_class)):
        if value < 1:
            raise ConfigError(f"{flag}: expected at least 1, got {value}")
    if config.workspace <= 0:
        raise ConfigError(f"--workspace: expected a positive size in GiB, got {config.workspace}")
    if config.optimize and config.device not in ("", "cpu"):
        raise ConfigError(f"--optimize: TorchScript mobile optimisation is CPU-only, got --device {config.device}")


def export(weights: str | Path | nn.Module, **options: Any) -> dict[str, Path]:
    """Export a model: ``detector.export("best.pt", include=("onnx",), imgsz=320, dynamic=True)``.

    ``weights`` is a .pt path or an in-memory DetectionModel; ``options`` are ExportConfig fields (the flags of
    export.py with underscores). Returns {format: path} of the written files (skipped formats absent);
    raises ExportError when an export fails its check.
    """
    model = weights if isinstance(weights, nn.Module) else None
    source = "" if model is not None else str(weights)
    config = build_config(ExportConfig, ("detector.export()", {**options, "weights": source}))
    results = Exporter(config).run(model)
    return {r.format: r.path for r in results if r.ok and r.path is not None}
