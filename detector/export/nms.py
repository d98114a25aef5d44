"""NMS inside an exported graph (``--nms``), its Python reference, and the comparison of the two.

:class:`NMSModel` appends NMS to a detection model for export. It is single-label, like detect.py
(:func:`detector.ops.nms.non_max_suppression` with ``multi_label=False``): each box competes only in its best
class (objectness x class score), so a box is never reported twice under two classes. Two flavors:

* ``"onnx"``: the standard ONNX ``NonMaxSuppression`` op (onnxruntime, OpenCV DNN, TensorRT's parser run it), with
  at most ``topk_per_class`` boxes per class and image;
* ``"tensorrt"``: TensorRT's ``EfficientNMS_TRT`` plugin node (only TensorRT runs it). The plugin itself is
  multi-label (it takes every class score above the threshold), so the graph hands it scores where every class but
  each box's best is -1, which no threshold in [0, 1] passes: single-label too. What the plugin cannot express:
  ``topk_per_class`` (it has no per-class cap); it keeps scores equal to the threshold (Python: strictly above),
  and it takes at most 5000 candidates per image into NMS (Python: 30000).

Both give TensorRT's EfficientNMS layout: num_dets (B, 1) int32, det_boxes (B, topk_all, 4) float32 xyxy pixels
of the network input, det_scores (B, topk_all) float32, det_classes (B, topk_all) int32; rows at or after num_dets
are zeros. :func:`reference_detections` is what they must output, computed with our Python NMS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detector.config import ExportConfig
from detector.ops.nms import non_max_suppression
from detector.ops.torchvision_kernels import batched_nms

NMS_OUTPUT_NAMES = ("num_dets", "det_boxes", "det_scores", "det_classes")
NMS_FLAVORS = ("onnx", "tensorrt")
_NOT_THIS_CLASS = -1.0  # the score of every class but a box's best: below any threshold in [0, 1]


def boxes_and_scores(pred: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N, 5 + nc) decoded predictions -> boxes (B, N, 4) xyxy pixels and scores (B, N, nc) = obj * cls.

    Written with slices and cat (no in-place writes) so tracing gives a clean graph.
    """
    center, half_size = pred[..., :2], pred[..., 2:4] / 2
    boxes = torch.cat((center - half_size, center + half_size), -1)
    return boxes, pred[..., 5:] * pred[..., 4:5]


def best_class_scores(scores: Tensor) -> Tensor:
    """(B, N, C) scores with every class but each box's best set to -1: single-label input for a per-class NMS.

    Ties go to the lowest class id, as ``scores.max`` in the Python NMS. Traces to ArgMax, Equal and Where.
    """
    best = scores.argmax(2, keepdim=True)
    class_ids = torch.arange(scores.shape[2], device=scores.device).view(1, 1, -1)
    return torch.where(class_ids == best, scores, _NOT_THIS_CLASS)  # a scalar: no (B, N, C) constant in the graph


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
            keep = batched_nms(boxes[image, box_index], candidate_scores, class_index, iou_threshold)
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
    Like the plugin it takes every (box, class) score above the threshold; :class:`NMSModel` makes that one class
    per box with :func:`best_class_scores`.
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
    """A detection model followed by single-label NMS, for export: images (B, 3, H, W) -> EfficientNMS layout.

    ``model`` returns decoded (B, N, 5 + nc) predictions. ``flavor`` "onnx" uses the standard ONNX
    NonMaxSuppression op (per class, at most ``topk_per_class`` boxes per class and image); "tensorrt" uses the
    EfficientNMS_TRT plugin node (no per-class cap). NMS runs in float32 even for a half model (ONNX's op is
    float32-only). See the module docstring for the outputs.
    """

    def __init__(self, model: nn.Module, config: ExportConfig, flavor: str = "onnx") -> None:
        super().__init__()
        if flavor not in NMS_FLAVORS:
            raise ValueError(f"flavor must be one of {NMS_FLAVORS}, got {flavor!r}")
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
                boxes, best_class_scores(scores), self.iou_thres, self.conf_thres, self.topk_all, self.agnostic
            )
        if self.agnostic:  # one NMS over every box, each with its best class
            scores, labels = scores.max(2, keepdim=True)
            selected = _OnnxNonMaxSuppression.apply(
                boxes, scores.transpose(1, 2), self.topk_all, self.iou_thres, self.conf_thres
            )
            return _fixed_size_detections(boxes, scores, labels, selected, self.topk_all)
        scores = best_class_scores(scores)
        selected = _OnnxNonMaxSuppression.apply(
            boxes, scores.transpose(1, 2), self.topk_per_class, self.iou_thres, self.conf_thres
        )
        return _fixed_size_detections(boxes, scores, None, selected, self.topk_all)


# --------------------------------------------------------------------------------------------------------------------
# The reference, and comparing with it


def reference_detections(pred: Tensor, config: ExportConfig) -> list[Tensor]:
    """What an ``--nms`` export must output, from our Python NMS on the same raw predictions.

    pred (B, N, 5 + nc) -> per image (n, 6) [x1, y1, x2, y2, score, class], by descending score: single-label
    NMS as detect.py runs it, with the exported graph's caps applied: ``topk_per_class`` per class (class-aware
    NMS only), then ``topk_all`` per image.
    """
    agnostic = config.agnostic_nms
    every_candidate = pred.shape[1]  # single-label: at most one candidate per box
    detections = non_max_suppression(
        pred.float(),
        conf_thres=config.conf_thres,
        iou_thres=config.iou_thres,
        agnostic=agnostic,
        multi_label=False,
        max_det=every_candidate,
        max_nms=every_candidate,
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
    """Match EfficientNMS-layout ``outputs`` (num_dets, boxes, scores, classes) against per-image ``expected``.

    Rows after ``num_dets`` must be zeros; the rows before are matched with :func:`match_detections`.
    Returns (number matched, None) or (number matched, what differs).
    """
    num_dets, boxes, scores, classes = (np.asarray(o) for o in outputs)
    detections = []
    for image in range(len(boxes)):
        count = int(num_dets[image].reshape(-1)[0])
        if count < boxes.shape[1] and (np.abs(boxes[image, count:]).max(initial=0) > 0 or scores[image, count:].any()):
            return 0, f"image {image}: rows after num_dets={count} are not zero"
        columns = (boxes[image, :count], scores[image, :count, None], classes[image, :count, None])
        detections.append(np.concatenate(columns, 1))
    return match_detections(detections, expected, atol, borderline_score, min_match_fraction)


def match_detections(
    got: Sequence[np.ndarray | Tensor],
    expected: Sequence[Tensor],
    atol: float,
    borderline_score: float | None = None,
    min_match_fraction: float = 1.0,
) -> tuple[int, str | None]:
    """Match per-image (n, 6) ``[x1, y1, x2, y2, score, class]`` detections ``got`` against ``expected``.

    A detection matches one of the same class whose score agrees within ``atol`` and box within ``atol`` of its
    largest coordinate. With ``borderline_score``, detections scoring below it may be missing on either side (a
    score within rounding of the threshold can fall either way). ``min_match_fraction`` < 1 tolerates a few
    unmatched detections: when the raw predictions come from another runtime, two boxes with near-equal scores
    can swap which one NMS keeps. Returns (number matched, None) or (number matched, what differs).
    """
    if len(got) != len(expected):
        return 0, f"{len(got)} images of detections, expected {len(expected)}"
    matched, unmatched, first_problem = 0, 0, None
    for image, (have, want) in enumerate(zip(got, expected, strict=True)):
        have = have.detach().cpu().numpy() if isinstance(have, Tensor) else np.asarray(have)
        have = have.astype(np.float64).reshape(-1, 6)
        want = want.detach().cpu().double().numpy()
        used = np.zeros(len(have), bool)
        for row in want:
            close = (
                ~used
                & (have[:, 5] == row[5])
                & (np.abs(have[:, :4] - row[:4]).max(1, initial=0) <= atol * max(1.0, np.abs(row[:4]).max()))
                & (np.abs(have[:, 4] - row[4]) <= atol)
            )
            if close.any():
                used[np.argmax(close)] = True
                matched += 1
            elif borderline_score is None or row[4] >= borderline_score:
                unmatched += 1
                first_problem = first_problem or f"image {image}: expected {_format_detection(row)} is missing"
        for row in have[~used]:
            if borderline_score is None or row[4] >= borderline_score:
                unmatched += 1
                first_problem = first_problem or f"image {image}: unexpected {_format_detection(row)}"
    if unmatched > (1 - min_match_fraction) * (matched + unmatched):
        return matched, f"{unmatched} unmatched detections, first: {first_problem}"
    return matched, None


def _format_detection(row: np.ndarray) -> str:
    x1, y1, x2, y2, score, cls = row.tolist()
    return f"class {int(cls)} score {score:.4f} box ({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f})"
