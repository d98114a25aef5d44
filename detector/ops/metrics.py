"""Detection metrics with COCO's rules: greedy matching at IoU 0.50:0.05:0.95 and 101-point interpolated AP.

The matching and the interpolation follow pycocotools' ``COCOeval`` (``evaluateImg`` and ``accumulate``), so
that mAP50-95 and mAP50 computed here agree with pycocotools on the same predictions:

- per image and class, predictions are taken in descending confidence; each takes the still-unmatched label of
  its class with the highest IoU, if that IoU is at least the threshold (separately for each threshold);
- per class, precision is made monotone (its upper envelope) and read at the recalls
  ``np.linspace(0, 1, 101)`` with a 'left' search; recalls never reached count as precision 0;
- classes without any label are ignored (they have no AP), classes with labels but no predictions have AP 0.

Crowd regions (COCO's ``iscrowd`` annotations, which YOLO label files leave out) are optional: given, a detection
that matches no label but covers a crowd region of its class (intersection over the detection's area >= the
threshold) is ignored - neither true nor false positive - as pycocotools does. Differences from pycocotools, by
design: no area ranges, and the detection limit is the caller's (the validator's ``max_det`` per image, not
pycocotools' 100 per image and class).

Everything here is NumPy on the CPU; boxes are xyxy pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's thresholds 0.50:0.05:0.95
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall points
CONFIDENCE_GRID = np.linspace(0.0, 1.0, 1000)  # where P/R/F1-vs-confidence curves are sampled


def box_iou_numpy(boxes1_xyxy: np.ndarray, boxes2_xyxy: np.ndarray) -> np.ndarray:
    """Pairwise IoU in float64: (N, 4) x (M, 4) xyxy -> (N, M). Zero-area pairs give 0, not NaN."""
    boxes1 = np.asarray(boxes1_xyxy, dtype=np.float64)
    boxes2 = np.asarray(boxes2_xyxy, dtype=np.float64)
    top_left = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(2)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    union = area1[:, None] + area2[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_predictions(
    pred_boxes_xyxy: np.ndarray,
    pred_conf: np.ndarray,
    pred_classes: np.ndarray,
    label_boxes_xyxy: np.ndarray,
    label_classes: np.ndarray,
    iou_thresholds: np.ndarray = IOU_THRESHOLDS,
) -> np.ndarray:
    """Which predictions of one image are true positives, at each IoU threshold (COCO's greedy rule).

    Args:
        pred_boxes_xyxy: (N, 4) predicted boxes; pred_conf (N,) confidences; pred_classes (N,) class ids.
        label_boxes_xyxy: (M, 4) labelled boxes in the same pixel frame; label_classes (M,) class ids.
        iou_thresholds: (T,) thresholds; a match needs IoU >= threshold.

    Returns:
        (N, T) bool, row i for prediction i (input order).
    """
    num_preds, num_thresholds = len(pred_conf), len(iou_thresholds)
    true_positive = np.zeros((num_preds, num_thresholds), dtype=bool)
    if num_preds == 0 or len(label_classes) == 0:
        return true_positive
    iou = box_iou_numpy(pred_boxes_xyxy, label_boxes_xyxy)
    iou[np.asarray(pred_classes)[:, None] != np.asarray(label_classes)[None, :]] = 0.0
    order = np.argsort(-np.asarray(pred_conf), kind="stable")
    # Only predictions that overlap some label of their class enough can match; the rest are false positives.
    order = order[iou[order].max(1) >= iou_thresholds.min()]
    thresholds = np.asarray(iou_thresholds)[:, None]
    label_taken = np.zeros((num_thresholds, len(label_classes)), dtype=bool)
    all_thresholds = np.arange(num_thresholds)
    for i in order:
        available = (iou[i][None, :] >= thresholds) & ~label_taken  # (T, M)
        hit = available.any(1)
        if not hit.any():
            continue
        # Highest IoU among the available labels; on exact ties pycocotools keeps the last one, and so do we.
        scores = np.where(available, iou[i][None, :], -1.0)
        best = scores.shape[1] - 1 - scores[:, ::-1].argmax(1)
        true_positive[i] = hit
        label_taken[all_thresholds[hit], best[hit]] = True
    return true_positive


def ignored_by_crowds(
    pred_boxes_xyxy: np.ndarray,
    pred_classes: np.ndarray,
    true_positive: np.ndarray,
    crowd_boxes_xyxy: np.ndarray,
    crowd_classes: np.ndarray,
    iou_thresholds: np.ndarray = IOU_THRESHOLDS,
) -> np.ndarray:
    """(N, T) bool: predictions to leave out of the metrics because they fall on a crowd region (pycocotools' rule).

    A prediction is ignored at a threshold when it is not a true positive there and a crowd box of its class covers
    it: intersection / prediction area >= threshold (a crowd's "IoU" in pycocotools). Crowds never take a label
    away from a prediction, and any number of predictions may fall on one crowd.
    """
    ignored = np.zeros_like(true_positive, dtype=bool)
    if len(crowd_classes) == 0 or len(pred_classes) == 0:
        return ignored
    preds = np.asarray(pred_boxes_xyxy, dtype=np.float64)
    crowds = np.asarray(crowd_boxes_xyxy, dtype=np.float64)
    top_left = np.maximum(preds[:, None, :2], crowds[None, :, :2])
    bottom_right = np.minimum(preds[:, None, 2:], crowds[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(2)
    area = ((preds[:, 2] - preds[:, 0]) * (preds[:, 3] - preds[:, 1]))[:, None]
    covered = np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)
    covered[np.asarray(pred_classes)[:, None] != np.asarray(crowd_classes)[None, :]] = 0.0
    best = covered.max(1)[:, None]  # (N, 1)
    return (best >= np.asarray(iou_thresholds)[None, :]) & ~true_positive


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO's 101-point interpolated AP of one precision/recall curve.

    ``recall`` (n,) is non-decreasing and ``precision`` (n,) matches it, both in descending-confidence order.
    Precision is replaced by its upper envelope (max over higher recalls), then read at each recall threshold
    r in ``np.linspace(0, 1, 101)`` at the first point whose recall is >= r; thresholds beyond the last
    recall contribute 0. The mean of the 101 readings is the AP.
    """
    return float(interpolated_precision(recall, precision).mean())


def interpolated_precision(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Envelope precision read at the 101 recall thresholds (see :func:`average_precision`) -> (101,)."""
    readings = np.zeros(len(RECALL_THRESHOLDS))
    if len(recall) == 0:
        return readings
    envelope = np.maximum.accumulate(np.asarray(precision, dtype=np.float64)[::-1])[::-1]
    index = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    reached = index < len(recall)
    readings[reached] = envelope[index[reached]]
    return readings


@dataclass
class Speed:
    """Milliseconds per image of each validation stage."""

    preprocess: float = 0.0
    inference: float = 0.0
    nms: float = 0.0
    metrics: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.preprocess:.1f}ms pre-process, {self.inference:.1f}ms inference, {self.nms:.1f}ms NMS, "
            f"{self.metrics:.1f}ms metrics per image"
        )


@dataclass
class Curves:
    """Per-class curves for plots; class rows follow ``Metrics.ap_class``.

    ``pr_precision`` (K, 101): envelope precision at IoU 0.5 at the recalls RECALL_THRESHOLDS.
    ``precision``/``recall``/``f1`` (K, 1000): at IoU 0.5 for a confidence threshold of CONFIDENCE_GRID (all 0
    at thresholds above a class's most confident detection: no detection kept, no precision).
    """

    pr_precision: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray


@dataclass
class Metrics:
    """Validation results. Plain floats for the summary, per-class arrays for the table and plots.

    Per-class arrays have one entry per class that has labels, in ``ap_class`` order (ascending class id);
    ``ap`` is (K, 10), one column per IoU threshold 0.50:0.05:0.95.
    """

    precision: float = 0.0  # mean over classes at the confidence of best mean F1 (IoU 0.5); undetected classes: 0
    recall: float = 0.0
    f1: float = 0.0
    map50: float = 0.0
    map: float = 0.0  # mAP50-95
    best_conf: float = 0.0  # the confidence threshold of best mean F1
    names: tuple[str, ...] = ()
    ap_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ap: np.ndarray = field(default_factory=lambda: np.zeros((0, len(IOU_THRESHOLDS))))
    class_precision: np.ndarray = field(default_factory=lambda: np.zeros(0))
    class_recall: np.ndarray = field(default_factory=lambda: np.zeros(0))
    class_f1: np.ndarray = field(default_factory=lambda: np.zeros(0))
    class_instances: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # labels per class
    class_images: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # images with the class
    num_images: int = 0
    num_instances: int = 0
    speed: Speed = field(default_factory=Speed)
    loss: dict[str, float] = field(default_factory=dict)  # mean val losses (box, obj, cls) when computed
    curves: Curves | None = None
    source: str = "detector"  # "detector", or "pycocotools" when map/map50 come from COCOeval

    @property
    def ap50(self) -> np.ndarray:
        """(K,) AP at IoU 0.5 per class with labels."""
        return self.ap[:, 0]

    @property
    def ap50_95(self) -> np.ndarray:
        """(K,) AP averaged over IoU 0.50:0.95 per class with labels."""
        return self.ap.mean(1)

    def class_maps(self, num_classes: int) -> np.ndarray:
        """(num_classes,) mAP50-95 per class id; classes without labels get the overall mAP (image weights)."""
        maps = np.full(num_classes, self.map)
        maps[self.ap_class] = self.ap50_95
        return maps

    def replace(self, **changes: object) -> Metrics:
        return dataclasses.replace(self, **changes)


# Weights of (precision, recall, mAP50, mAP50-95) in the fitness: YOLOv5's 0.1 * mAP50 + 0.9 * mAP50-95.
DEFAULT_FITNESS_WEIGHTS = (0.0, 0.0, 0.1, 0.9)


def fitness(metrics: Metrics, weights: Sequence[float] = DEFAULT_FITNESS_WEIGHTS) -> float:
    """The single number training and evolution maximise: the ``weights`` (precision, recall, mAP50, mAP50-95,
    ``--fitness-weights``) applied to those four figures; by default YOLOv5's 0.1 * mAP50 + 0.9 * mAP50-95."""
    w_precision, w_recall, w_map50, w_map = weights
    return w_precision * metrics.precision + w_recall * metrics.recall + w_map50 * metrics.map50 + w_map * metrics.map


class DetectionStats:
    """Accumulates matched predictions and labels over images, then computes :class:`Metrics`.

    Per image: ``update(pred_boxes_xyxy, pred_conf, pred_classes, label_boxes_xyxy, label_classes)``, with the
    image's crowd regions when known. Images are kept in the order given; across images, equal confidences are
    ranked in that order, as pycocotools ranks them in image-id order.
    """

    def __init__(self, iou_thresholds: np.ndarray = IOU_THRESHOLDS) -> None:
        self.iou_thresholds = np.asarray(iou_thresholds)
        self._true_positive: list[np.ndarray] = []
        self._ignored: list[np.ndarray] = []
        self._conf: list[np.ndarray] = []
        self._pred_classes: list[np.ndarray] = []
        self._label_classes: list[np.ndarray] = []
        self.num_images = 0

    def update(
        self,
        pred_boxes_xyxy: np.ndarray,
        pred_conf: np.ndarray,
        pred_classes: np.ndarray,
        label_boxes_xyxy: np.ndarray,
        label_classes: np.ndarray,
        crowd_boxes_xyxy: np.ndarray | None = None,
        crowd_classes: np.ndarray | None = None,
    ) -> np.ndarray:
        """Add one image (boxes in one pixel frame); returns its (N, T) true-positive matrix."""
        true_positive = match_predictions(
            pred_boxes_xyxy, pred_conf, pred_classes, label_boxes_xyxy, label_classes, self.iou_thresholds
        )
        if crowd_classes is not None and len(crowd_classes):
            ignored = ignored_by_crowds(
                pred_boxes_xyxy, pred_classes, true_positive, crowd_boxes_xyxy, crowd_classes, self.iou_thresholds
            )
        else:
            ignored = np.zeros_like(true_positive)
        self._true_positive.append(true_positive)
        self._ignored.append(ignored)
        self._conf.append(np.asarray(pred_conf, dtype=np.float64).reshape(-1))
        self._pred_classes.append(np.asarray(pred_classes).astype(np.int64).reshape(-1))
        self._label_classes.append(np.asarray(label_classes).astype(np.int64).reshape(-1))
        self.num_images += 1
        return true_positive

    def compute(self, names: tuple[str, ...] | list[str]) -> Metrics:
        """Per-class AP and P/R/F1, and their means over the classes that have labels."""
        num_thresholds = len(self.iou_thresholds)
        empty = np.zeros((0, num_thresholds), dtype=bool)
        true_positive = np.concatenate(self._true_positive) if self._true_positive else empty
        ignored = np.concatenate(self._ignored) if self._ignored else empty
        conf = np.concatenate(self._conf) if self._conf else np.zeros(0)
        pred_classes = np.concatenate(self._pred_classes) if self._pred_classes else np.zeros(0, dtype=np.int64)
        label_classes = np.concatenate(self._label_classes) if self._label_classes else np.zeros(0, dtype=np.int64)
        instances = np.bincount(label_classes, minlength=len(names))
        images = np.zeros(len(instances), dtype=np.int64)
        for per_image in self._label_classes:
            images[np.unique(per_image)] += 1
        ap_class = np.flatnonzero(instances)
        ap, curves, best = _per_class_results(true_positive, ignored, conf, pred_classes, ap_class, instances[ap_class])
        class_precision = curves.precision[:, best]
        class_recall = curves.recall[:, best]
        class_f1 = curves.f1[:, best]
        has_classes = len(ap_class) > 0
        return Metrics(
            precision=float(class_precision.mean()) if has_classes else 0.0,
            recall=float(class_recall.mean()) if has_classes else 0.0,
            f1=float(class_f1.mean()) if has_classes else 0.0,
            map50=float(ap[:, 0].mean()) if has_classes else 0.0,
            map=float(ap.mean()) if has_classes else 0.0,
            best_conf=float(CONFIDENCE_GRID[best]) if has_classes else 0.0,
            names=tuple(names),
            ap_class=ap_class,
            ap=ap,
            class_precision=class_precision,
            class_recall=class_recall,
            class_f1=class_f1,
            class_instances=instances[ap_class],
            class_images=images[ap_class],
            num_images=self.num_images,
            num_instances=int(instances.sum()),
            curves=curves,
        )


def _per_class_results(
    true_positive: np.ndarray,
    ignored: np.ndarray,
    conf: np.ndarray,
    pred_classes: np.ndarray,
    ap_class: np.ndarray,
    num_labels: np.ndarray,
) -> tuple[np.ndarray, Curves, int]:
    """AP (K, T), curves, and the CONFIDENCE_GRID index of best mean F1, for the classes ``ap_class``."""
    num_classes, num_thresholds = len(ap_class), true_positive.shape[1]
    ap = np.zeros((num_classes, num_thresholds))
    pr_precision = np.zeros((num_classes, len(RECALL_THRESHOLDS)))
    precision_at = np.zeros((num_classes, len(CONFIDENCE_GRID)))
    recall_at = np.zeros((num_classes, len(CONFIDENCE_GRID)))
    order = np.argsort(-conf, kind="stable")  # pycocotools' mergesort is stable too
    true_positive, ignored = true_positive[order], ignored[order]
    conf, pred_classes = conf[order], pred_classes[order]
    for k, (cls, labels) in enumerate(zip(ap_class, num_labels, strict=True)):
        in_class = pred_classes == cls
        for t in range(num_thresholds):
            counted = ~ignored[in_class, t]  # detections on crowd regions count neither way
            tp_cumulative = np.cumsum(true_positive[in_class, t][counted], dtype=np.float64)
            # pycocotools adds np.spacing(1) to the denominator; with at least one detection it changes nothing.
            precision = tp_cumulative / np.arange(1, len(tp_cumulative) + 1)
            readings = interpolated_precision(tp_cumulative / labels, precision)
            ap[k, t] = readings.mean()
            if t == 0:
                pr_precision[k] = readings
                precision_at[k], recall_at[k] = _at_confidences(conf[in_class][counted], tp_cumulative, labels)
    f1_at = 2 * precision_at * recall_at / np.maximum(precision_at + recall_at, 1e-16)
    # The highest confidence that reaches the best mean F1: on a plateau it keeps fewer boxes for the same F1.
    if num_classes == 0:
        return ap, Curves(pr_precision, precision_at, recall_at, f1_at), 0
    mean_f1 = f1_at.mean(0)
    best = int(len(mean_f1) - 1 - mean_f1[::-1].argmax())
    return ap, Curves(pr_precision, precision_at, recall_at, f1_at), best


def _at_confidences(conf_descending: np.ndarray, tp_cumulative: np.ndarray, num_labels: int) -> tuple[np.ndarray, ...]:
    """Precision and recall when keeping the detections with conf >= each CONFIDENCE_GRID value.

    With no detection kept, precision and recall are both 0 (as YOLOv5 and COCO score a class without detections):
    a precision of 1 there would report an untrained model, whose best mean F1 is 0 at every threshold, as P 1.000.
    """
    if len(conf_descending) == 0:
        return np.zeros(len(CONFIDENCE_GRID)), np.zeros(len(CONFIDENCE_GRID))
    kept = len(conf_descending) - np.searchsorted(conf_descending[::-1], CONFIDENCE_GRID, side="left")
    true_positives = np.where(kept > 0, tp_cumulative[np.maximum(kept - 1, 0)], 0.0)
    return true_positives / np.maximum(kept, 1), true_positives / num_labels


def confusion_matrix(
    pred_boxes_xyxy: np.ndarray,
    pred_conf: np.ndarray,
    pred_classes: np.ndarray,
    label_boxes_xyxy: np.ndarray,
    label_classes: np.ndarray,
    num_classes: int,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
) -> np.ndarray:
    """One image's (nc + 1, nc + 1) counts, rows = predicted class, columns = true class; index nc = background.

    Predictions below ``conf_thres`` are dropped. Pairs with IoU > ``iou_thres`` (any classes) are matched
    one-to-one, highest IoU first. A matched pair counts at [pred, true]; an unmatched label at
    [background, true] (missed); an unmatched prediction at [pred, background] (false alarm).
    """
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    keep = np.asarray(pred_conf) > conf_thres
    pred_boxes, pred_cls = np.asarray(pred_boxes_xyxy)[keep], np.asarray(pred_classes).astype(np.int64)[keep]
    label_cls = np.asarray(label_classes).astype(np.int64)
    iou = box_iou_numpy(pred_boxes, label_boxes_xyxy) if len(pred_cls) and len(label_cls) else np.zeros((0, 0))
    pred_index, label_index = np.nonzero(iou > iou_thres)
    if len(pred_index):
        by_iou = np.argsort(-iou[pred_index, label_index], kind="stable")
        pred_index, label_index = pred_index[by_iou], label_index[by_iou]
        # Keep the first (highest-IoU) pair of each prediction, then of each label.
        first_pred = np.unique(pred_index, return_index=True)[1]
        pred_index, label_index = pred_index[np.sort(first_pred)], label_index[np.sort(first_pred)]
        first_label = np.unique(label_index, return_index=True)[1]
        pred_index, label_index = pred_index[np.sort(first_label)], label_index[np.sort(first_label)]
    np.add.at(matrix, (pred_cls[pred_index], label_cls[label_index]), 1)
    missed = np.setdiff1d(np.arange(len(label_cls)), label_index)
    np.add.at(matrix, (num_classes, label_cls[missed]), 1)
    false_alarms = np.setdiff1d(np.arange(len(pred_cls)), pred_index)
    np.add.at(matrix, (pred_cls[false_alarms], num_classes), 1)
    return matrix
