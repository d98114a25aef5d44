"""Non-maximum suppression of decoded YOLO predictions, on top of torchvision's NMS kernel.

Input rows are ``[xc, yc, w, h, objectness, class scores...]`` (pixels, sigmoids already applied), as
``DetectionModel`` returns in eval mode. A box's confidence for a class is ``objectness * class_score``
(YOLOv5's definition). Output rows are ``[x1, y1, x2, y2, confidence, class]``.

Unlike YOLOv5 there is no wall-clock limit: the result depends only on the inputs, never on machine speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from detector.ops.boxes import xywh2xyxy
from detector.ops.torchvision_kernels import nms
from detector.utils.checks import check_threshold

NMS_CALL_ROWS = 256  # rows per torchvision NMS call when packing small (image, class) groups; 64-1024 all do well
FIRST_ROWS_PER_DET = 4  # first NMS pass: each image's 4 x max_det most confident candidates (see _kept_rows)
NMS_GROWTH = 2  # then twice as many rows each pass


def non_max_suppression(
    pred: Tensor,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
    max_nms: int = 30000,
) -> list[Tensor]:
    """Per-image detections from decoded predictions.

    Args:
        pred: (B, N, 5 + nc) float, rows ``[xc, yc, w, h, obj, cls_0 .. cls_{nc-1}]`` in pixels.
        conf_thres: keep (box, class) pairs with ``obj * cls_score > conf_thres`` (and ``obj > conf_thres``).
        iou_thres: suppress a box whose IoU with a higher-confidence kept box of the same class exceeds this.
        classes: keep only these class ids (None keeps all).
        agnostic: suppress across classes (one NMS over all boxes) instead of per class.
        multi_label: keep a candidate for every class above ``conf_thres`` (one box may appear with several
            classes), instead of only its best class. YOLOv5's validation uses this.
        max_det: at most this many detections per image, highest confidence first.
        max_nms: at most this many candidates per image enter NMS (the most confident), bounding the cost.

    Returns:
        B tensors of shape (n_i, 6) ``[x1, y1, x2, y2, conf, class]`` (xyxy pixels, class as float), sorted by
        descending confidence, on ``pred``'s device and dtype.
    """
    check_threshold("conf_thres", conf_thres)
    check_threshold("iou_thres", iou_thres)
    if pred.ndim != 3 or pred.shape[-1] < 6:
        raise ValueError(f"pred must be (B, N, 5 + nc) with nc >= 1, got shape {tuple(pred.shape)}")
    if max_det < 1 or max_nms < 1:
        raise ValueError(f"max_det and max_nms must be >= 1, got {max_det} and {max_nms}")

    with _one_cpu_thread(pred.device):
        return _non_max_suppression(pred, conf_thres, iou_thres, classes, agnostic, multi_label, max_det, max_nms)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run on one intra-op thread on the CPU. NMS is many small ops and a single-threaded torchvision kernel:
    extra threads only add synchronisation, which on a busy 2-core machine made it 4-5x slower (4 vs 20 ms/img)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _non_max_suppression(
    pred: Tensor,
    conf_thres: float,
    iou_thres: float,
    classes: Sequence[int] | None,
    agnostic: bool,
    multi_label: bool,
    max_det: int,
    max_nms: int,
) -> list[Tensor]:
    batch_size, num_classes = pred.shape[0], pred.shape[2] - 5
    image_index, candidates = _candidates(pred, conf_thres, multi_label)
    if classes is not None:
        wanted = torch.as_tensor(list(classes), device=pred.device, dtype=candidates.dtype)
        keep = (candidates[:, 5:6] == wanted).any(1)
        image_index, candidates = image_index[keep], candidates[keep]
    image_index, candidates = _most_confident_per_image(image_index, candidates, batch_size, max_nms)
    keep = _kept_rows(image_index, candidates, iou_thres, None if agnostic else num_classes, batch_size, max_det)
    image_index, candidates = image_index[keep], candidates[keep]
    per_image = candidates.split(torch.bincount(image_index, minlength=batch_size).tolist())
    return [detections[:max_det] for detections in per_image]


def _candidates(pred: Tensor, conf_thres: float, multi_label: bool) -> tuple[Tensor, Tensor]:
    """(image index (M,) int64, rows (M, 6) ``[x1, y1, x2, y2, conf, class]``) above the threshold, whole batch.

    Filtering on objectness first keeps the (rows x classes) product small: at conf 0.001 most of the
    25,200 anchors of a 640 image are already gone before the class scores are multiplied.
    """
    image_index, anchor_index = (pred[..., 4] > conf_thres).nonzero(as_tuple=True)
    rows = pred[image_index, anchor_index]
    scores = rows[:, 5:] * rows[:, 4:5]
    boxes = xywh2xyxy(rows[:, :4])
    if multi_label:
        row, cls = (scores > conf_thres).nonzero(as_tuple=True)
        conf = scores[row, cls]
    else:
        conf, cls = scores.max(1)
        row = (conf > conf_thres).nonzero(as_tuple=True)[0]
        conf, cls = conf[row], cls[row]
    detections = torch.cat((boxes[row], conf[:, None], cls[:, None].to(pred.dtype)), 1)
    return image_index[row], detections


def _most_confident_per_image(
    image_index: Tensor, candidates: Tensor, batch_size: int, max_nms: int
) -> tuple[Tensor, Tensor]:
    """Rows sorted by image (ascending) then confidence (descending), at most ``max_nms`` per image."""
    by_conf = torch.sort(candidates[:, 4], descending=True, stable=True).indices
    order = by_conf[torch.sort(image_index[by_conf], stable=True).indices]
    image_index, candidates = image_index[order], candidates[order]
    counts, rank_in_image = _rows_per_image(image_index, batch_size)
    if len(image_index) and int(counts.max()) > max_nms:
        keep = rank_in_image < max_nms
        image_index, candidates = image_index[keep], candidates[keep]
    return image_index, candidates


def _rows_per_image(image_index: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(rows of each image (batch_size,), each row's place among its image's rows (M,)) for ascending
    ``image_index``."""
    counts = torch.bincount(image_index, minlength=batch_size)
    first_row = torch.cumsum(counts, 0) - counts
    return counts, torch.arange(len(image_index), device=image_index.device) - first_row[image_index]


def _kept_rows(
    image_index: Tensor, candidates: Tensor, iou_thres: float, num_classes: int | None, batch_size: int, max_det: int
) -> Tensor:
    """Indices (ascending) of the rows NMS keeps, as far as they can be among an image's ``max_det`` most
    confident detections; ``image_index`` ascending, each image's rows by descending confidence.

    Greedy NMS keeps a row unless a more confident kept row of its group overlaps it, so NMS over an image's first
    k rows keeps exactly the rows that NMS over all of them keeps among those k. When that is ``max_det`` or more,
    they are the image's result. Otherwise the next rows run together with the rows kept so far (a suppressed
    row suppresses nothing), twice as many each round, until ``max_det`` are kept or the rows run out. An untrained
    model at conf 0.001 gives nearly every anchor a candidate for every class (up to max_nms, 30,000 an image), of
    which the first thousand or so suffice: its NMS took 13 ms an image in validation (twice the model's time),
    2.7 ms this way; a trained model's is unchanged or faster (yolov5n on coco128 at 640: 3.5 -> 3.1 ms).
    """
    counts, rank_in_image = _rows_per_image(image_index, batch_size)
    pending = torch.ones(batch_size, dtype=torch.bool, device=image_index.device)
    kept_so_far = image_index.new_zeros(0)
    done_rows, start, end = [], 0, FIRST_ROWS_PER_DET * max_det
    while True:
        new_rows = ((rank_in_image >= start) & (rank_in_image < end) & pending[image_index]).nonzero(as_tuple=True)[0]
        rows = torch.sort(torch.cat((kept_so_far, new_rows))).values  # by image, then by confidence
        keep = rows[_grouped_nms(image_index[rows], candidates[rows], iou_thres, num_classes)]
        kept_per_image = torch.bincount(image_index[keep], minlength=batch_size)
        done = pending & ((kept_per_image >= max_det) | (counts <= end))
        finished = done[image_index[keep]]
        done_rows.append(keep[finished])
        kept_so_far, pending = keep[~finished], pending & ~done
        if not bool(pending.any()):
            return torch.sort(torch.cat(done_rows)).values
        start, end = end, NMS_GROWTH * end


def _grouped_nms(image_index: Tensor, candidates: Tensor, iou_thres: float, num_classes: int | None) -> Tensor:
    """Indices (ascending) of the rows NMS keeps, suppressing only within a group: (image, class), or image
    alone when ``num_classes`` is None (class-agnostic).

    Why groups: torchvision's CPU NMS compares each kept box with every later box of its call, so one call per
    image costs up to (boxes per image)^2, while only pairs of one class matter (5x fewer pairs on COCO).
    One call per group would cost a call per (image, class), so consecutive small groups share a call
    (up to NMS_CALL_ROWS rows), each shifted to its own region so that no box of one group overlaps another's.
    """
    if len(candidates) == 0:
        return torch.zeros(0, dtype=torch.long, device=candidates.device)
    groups = image_index if num_classes is None else image_index * num_classes + candidates[:, 5].long()
    by_group = torch.sort(groups, stable=True).indices  # stable: confidence order kept inside each group
    sizes = torch.unique_consecutive(groups[by_group], return_counts=True)[1]
    # float64: shifts of up to (images x classes) spans stay exact (float32 would round boxes by ~0.1 px).
    boxes = candidates[by_group, :4].double()
    span = boxes.max() - boxes.min() + 1
    group_rank = torch.repeat_interleave(torch.arange(len(sizes), device=boxes.device), sizes)
    boxes += (group_rank.double() * span)[:, None]
    scores = candidates[by_group, 4].double()
    kept = [
        nms(boxes[start:end], scores[start:end], iou_thres) + start
        for start, end in _pack(sizes.tolist(), NMS_CALL_ROWS)
    ]
    return torch.sort(by_group[torch.cat(kept)]).values


def _pack(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of consecutive groups of ``sizes``, each up to ``limit`` rows (or one larger group)."""
    ranges, start, end = [], 0, 0
    for size in sizes:
        if end > start and end - start + size > limit:
            ranges.append((start, end))
            start = end
        end += size
    ranges.append((start, end))
    return ranges
