"""Box format conversions, IoU and letterbox geometry: pure tensor/array maths.

Formats are in the names: ``xyxy`` is (x1, y1, x2, y2), ``xywh`` is (x_center, y_center, width, height);
a trailing ``n`` means normalised to 0-1 by the image width and height, otherwise pixels.
Functions accept torch tensors or NumPy arrays of shape (..., 4) and return the same kind.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

Boxes = Tensor | np.ndarray


def _empty_like(x: Boxes) -> Boxes:
    return x.clone() if isinstance(x, Tensor) else np.copy(x)


def xywh2xyxy(boxes_xywh: Boxes) -> Boxes:
    """(xc, yc, w, h) -> (x1, y1, x2, y2)."""
    out = _empty_like(boxes_xywh)
    half_w, half_h = boxes_xywh[..., 2] / 2, boxes_xywh[..., 3] / 2
    out[..., 0] = boxes_xywh[..., 0] - half_w
    out[..., 1] = boxes_xywh[..., 1] - half_h
    out[..., 2] = boxes_xywh[..., 0] + half_w
    out[..., 3] = boxes_xywh[..., 1] + half_h
    return out


def xyxy2xywh(boxes_xyxy: Boxes) -> Boxes:
    """(x1, y1, x2, y2) -> (xc, yc, w, h)."""
    out = _empty_like(boxes_xyxy)
    out[..., 0] = (boxes_xyxy[..., 0] + boxes_xyxy[..., 2]) / 2
    out[..., 1] = (boxes_xyxy[..., 1] + boxes_xyxy[..., 3]) / 2
    out[..., 2] = boxes_xyxy[..., 2] - boxes_xyxy[..., 0]
    out[..., 3] = boxes_xyxy[..., 3] - boxes_xyxy[..., 1]
    return out


def xywhn2xyxy(boxes_xywhn: Boxes, width: float, height: float, padw: float = 0.0, padh: float = 0.0) -> Boxes:
    """Normalised (xc, yc, w, h) -> pixel (x1, y1, x2, y2), shifted by a letterbox padding."""
    out = xywh2xyxy(boxes_xywhn)
    out[..., 0::2] = out[..., 0::2] * width + padw
    out[..., 1::2] = out[..., 1::2] * height + padh
    return out


def xyxy2xywhn(boxes_xyxy: Boxes, width: float, height: float) -> Boxes:
    """Pixel (x1, y1, x2, y2) -> normalised (xc, yc, w, h)."""
    out = xyxy2xywh(boxes_xyxy)
    out[..., 0::2] = out[..., 0::2] / width
    out[..., 1::2] = out[..., 1::2] / height
    return out


def clip_boxes(boxes_xyxy: Boxes, shape: tuple[int, int]) -> Boxes:
    """Clip xyxy boxes in place to an image of ``shape`` (height, width); returns them."""
    height, width = shape[:2]
    if isinstance(boxes_xyxy, Tensor):
        boxes_xyxy[..., 0::2] = boxes_xyxy[..., 0::2].clamp(0, width)
        boxes_xyxy[..., 1::2] = boxes_xyxy[..., 1::2].clamp(0, height)
    else:
        boxes_xyxy[..., 0::2] = boxes_xyxy[..., 0::2].clip(0, width)
        boxes_xyxy[..., 1::2] = boxes_xyxy[..., 1::2].clip(0, height)
    return boxes_xyxy


def scale_boxes(
    boxes_xyxy: Boxes,
    from_shape: tuple[int, int],
    to_shape: tuple[int, int],
    ratio_pad: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> Boxes:
    """Map xyxy boxes from a letterboxed image of ``from_shape`` (h, w) back to the original ``to_shape`` (h, w).

    ``ratio_pad`` is ((ratio_h, ratio_w), (pad_w, pad_h)) as recorded by the letterbox; when absent it is
    recomputed assuming a centred letterbox of the whole original image. The result is clipped to ``to_shape``.
    Modifies and returns ``boxes_xyxy``.
    """
    if ratio_pad is None:
        gain = min(from_shape[0] / to_shape[0], from_shape[1] / to_shape[1])
        pad = ((from_shape[1] - to_shape[1] * gain) / 2, (from_shape[0] - to_shape[0] * gain) / 2)
    else:
        gain = ratio_pad[0][0]
        pad = ratio_pad[1]
    boxes_xyxy[..., [0, 2]] -= pad[0]
    boxes_xyxy[..., [1, 3]] -= pad[1]
    boxes_xyxy[..., :4] /= gain
    return clip_boxes(boxes_xyxy, to_shape)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """Areas of (N, 4) pixel xyxy boxes -> (N,), as ``torchvision.ops.box_area``."""
    return (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])


def box_intersection(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise intersection areas of pixel xyxy boxes: (N, 4) x (M, 4) -> (N, M), 0 for disjoint boxes."""
    top_left = torch.max(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])
    bottom_right = torch.min(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    return (bottom_right - top_left).clamp(min=0).prod(2)


def box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise IoU of pixel xyxy boxes: (N, 4) x (M, 4) -> (N, M), as ``torchvision.ops.box_iou`` (tested equal);
    written out here so that importing this module does not import torchvision (see ``ops.torchvision_kernels``)."""
    area1, area2 = box_area(boxes1_xyxy), box_area(boxes2_xyxy)
    intersection = box_intersection(boxes1_xyxy, boxes2_xyxy)
    return intersection / (area1[:, None] + area2 - intersection)


def bbox_ciou(boxes1_xywh: Tensor, boxes2_xywh: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise Complete IoU (Zheng et al., 2020) of matched (N, 4) xywh boxes -> (N,).

    CIoU = IoU - centre_distance² / enclosing_diagonal² - alpha·v, with v the aspect-ratio consistency term
    (4/π²)(atan(w2/h2) - atan(w1/h1))² and alpha = v / (v - IoU + 1 + eps), alpha treated as a constant in
    the backward pass as the paper prescribes. ``eps`` keeps zero-size boxes finite.
    """
    (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes1_xywh.unbind(-1), boxes2_xywh.unbind(-1)
    h1, h2 = h1 + eps, h2 + eps
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2

    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * (
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union

    enclosing_w = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)
    enclosing_h = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    diagonal_sq = enclosing_w**2 + enclosing_h**2 + eps
    centre_dist_sq = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre_dist_sq / diagonal_sq + v * alpha)
