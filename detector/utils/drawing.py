"""Drawing detections on BGR images with OpenCV: boxes, labels in a per-class colour, crops.

Labels use OpenCV's built-in Hershey font, so nothing is downloaded (YOLOv5 fetches Arial.ttf and fails offline).
Boxes are xyxy pixels; images are (H, W, 3) uint8 BGR and are drawn on in place.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(class_id: int) -> tuple[int, int, int]:
    """A stable, saturated BGR colour for a class id.

    Hues step around the colour wheel by the golden ratio, so neighbouring ids (and any number of classes) get
    clearly different colours; class 0 is red.
    """
    hue = (int(class_id) * _GOLDEN_RATIO_CONJUGATE) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(blue * 255), round(green * 255), round(red * 255)


def text_color_for(background_bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black text on light backgrounds, white on dark ones (ITU-R BT.601 luma), so labels stay readable."""
    blue, green, red = background_bgr
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


def default_line_thickness(image_shape: tuple[int, ...]) -> int:
    """A box line width that scales with the image: about 0.3% of the mean side, at least 2 px."""
    return max(round((image_shape[0] + image_shape[1]) / 2 * 0.003), 2)


def draw_box(
    image: np.ndarray,
    box_xyxy: Sequence[float],
    color: tuple[int, int, int],
    label: str = "",
    line_thickness: int = 3,
) -> np.ndarray:
    """Draw one xyxy pixel box and, if ``label`` is given, a filled label above it (inside when at the top edge).

    Modifies and returns ``image`` ((H, W, 3) uint8 BGR).
    """
    width = image.shape[1]
    x1, y1, x2, y2 = (round(float(v)) for v in box_xyxy[:4])
    cv2.rectangle(image, (x1, y1), (x2, y2), color, thickness=line_thickness, lineType=cv2.LINE_8)
    if not label:
        return image
    font_scale = line_thickness / 3
    text_thickness = max(line_thickness - 1, 1)
    (text_width, text_height), baseline = cv2.getTextSize(label, _FONT, font_scale, text_thickness)
    label_height = text_height + baseline + 2
    label_x = min(max(x1, 0), max(width - text_width, 0))  # keep the label inside the image
    label_top = y1 - label_height if y1 - label_height >= 0 else max(y1, 0)
    cv2.rectangle(image, (label_x, label_top), (label_x + text_width, label_top + label_height), color, cv2.FILLED)
    origin = (label_x, label_top + text_height + 1)
    cv2.putText(image, label, origin, _FONT, font_scale, text_color_for(color), text_thickness, cv2.LINE_AA)
    return image


def format_label(name: str, confidence: float, hide_labels: bool = False, hide_conf: bool = False) -> str:
    """'person 0.88', 'person' with ``hide_conf``, '' with ``hide_labels``."""
    if hide_labels:
        return ""
    return name if hide_conf else f"{name} {confidence:.2f}"


def draw_detections(
    image: np.ndarray,
    boxes_xyxy: np.ndarray,
    class_ids: np.ndarray,
    confidences: np.ndarray,
    names: Sequence[str],
    *,
    line_thickness: int | None = None,
    hide_labels: bool = False,
    hide_conf: bool = False,
) -> np.ndarray:
    """Draw every detection on ``image`` in place and return it.

    ``boxes_xyxy`` (N, 4) pixels, ``class_ids`` (N,) ints, ``confidences`` (N,) floats, ``names`` indexed by class
    id (ids beyond ``names`` are labelled by number). ``line_thickness`` None picks one from the image size.
    Boxes are drawn lowest confidence first, so the most confident label ends up on top.
    """
    thickness = line_thickness or default_line_thickness(image.shape)
    for i in np.argsort(confidences, kind="stable"):
        class_id = int(class_ids[i])
        name = names[class_id] if 0 <= class_id < len(names) else str(class_id)
        label = format_label(name, float(confidences[i]), hide_labels, hide_conf)
        draw_box(image, boxes_xyxy[i], class_color(class_id), label, thickness)
    return image


def crop_box(
    image: np.ndarray, box_xyxy: Sequence[float], gain: float = 1.02, pad: int = 10, square: bool = False
) -> np.ndarray:
    """A copy of the region of an xyxy box, enlarged by ``gain`` and ``pad`` pixels (and made square if asked).

    The enlargement keeps a little context around the object; the region is clipped to the image.
    """
    x1, y1, x2, y2 = (float(v) for v in box_xyxy[:4])
    center_x, center_y = (x1 + x2) / 2, (y1 + y2) / 2
    box_width, box_height = x2 - x1, y2 - y1
    if square:
        box_width = box_height = max(box_width, box_height)
    half_width, half_height = (box_width * gain + pad) / 2, (box_height * gain + pad) / 2
    height, width = image.shape[:2]
    left, right = int(max(center_x - half_width, 0)), int(min(center_x + half_width, width))
    top, bottom = int(max(center_y - half_height, 0)), int(min(center_y + half_height, height))
    return image[top:bottom, left:right].copy()
