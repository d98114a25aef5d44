"""Box and label drawing: exact pixels of boxes, label placement and colours, crops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from detector.utils.drawing import (
    class_color,
    crop_box,
    default_line_thickness,
    draw_box,
    draw_detections,
    format_label,
    text_color_for,
)


def test_class_colors_are_stable_and_distinct() -> None:
    colors = [class_color(i) for i in range(80)]
    assert colors == [class_color(i) for i in range(80)]
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colors)
    assert len(set(colors)) == 80
    neighbours = min(np.abs(np.subtract(a, b)).sum() for a, b in itertools.pairwise(colors))
    assert neighbours > 100  # consecutive class ids must not look alike
    assert class_color(0) == (36, 36, 242)  # BGR: hue 0 -> red (hand-computed: v=0.95 -> 242, s=0.85 -> 36)


def test_text_color_contrasts_with_background() -> None:
    assert text_color_for((0, 0, 0)) == (255, 255, 255)
    assert text_color_for((255, 255, 255)) == (0, 0, 0)
    assert text_color_for((0, 255, 255)) == (0, 0, 0)  # yellow (BGR) is light


def test_box_pixels_exact_without_label() -> None:
    image = np.zeros((50, 60, 3), dtype=np.uint8)
    draw_box(image, (10.2, 10.0, 20.0, 29.6), (1, 2, 3), label="", line_thickness=1)
    changed = image.any(axis=2)
    expected = np.zeros((50, 60), dtype=bool)  # 1-px outline of x 10..20, y 10..30 (coordinates rounded)
    expected[10, 10:21] = expected[30, 10:21] = True
    expected[10:31, 10] = expected[10:31, 20] = True
    np.testing.assert_array_equal(changed, expected)
    assert changed.sum() == 2 * (11 + 21) - 4  # the perimeter, counted by hand
    assert tuple(image[10, 15]) == (1, 2, 3)


def test_label_sits_above_the_box_or_inside_at_the_top_edge() -> None:
    color = (80, 220, 220)  # light (luma 204): black text
    image = np.zeros((200, 200, 3), dtype=np.uint8)
    draw_box(image, (50, 100, 150, 180), color, label="person 0.88", line_thickness=2)
    above = image[80:99, 50:100]
    assert (above == color).all(axis=2).mean() > 0.3  # filled label background right above the box
    assert (above == (0, 0, 0)).all(axis=2).any()  # black text on the light label
    top_image = np.zeros((200, 200, 3), dtype=np.uint8)
    draw_box(top_image, (50, 0, 150, 80), color, label="person", line_thickness=2)
    assert (top_image[5:15, 55:80] == color).all(axis=2).mean() > 0.3  # label drawn inside the box
    assert not top_image[100:].any()


def test_draw_detections_labels_and_hiding() -> None:
    boxes = np.array([[10, 40, 60, 90], [70, 40, 110, 90]], dtype=np.float32)
    classes, confidences = np.array([0, 5]), np.array([0.9, 0.5], dtype=np.float32)
    plain = draw_detections(np.zeros((100, 120, 3), np.uint8), boxes, classes, confidences, ["a"] * 6, hide_labels=True)
    assert tuple(plain[40, 30]) == class_color(0) and tuple(plain[40, 90]) == class_color(5)
    assert not plain[:38].any()  # no labels drawn above the boxes
    labelled = draw_detections(np.zeros((100, 120, 3), np.uint8), boxes, classes, confidences, ["a"] * 6)
    assert labelled[:38].any()
    assert format_label("bus", 0.4923) == "bus 0.49"
    assert format_label("bus", 0.4923, hide_conf=True) == "bus"
    assert format_label("bus", 0.4923, hide_labels=True) == ""


def test_unknown_class_id_is_labelled_by_number() -> None:
    image = np.zeros((60, 80, 3), np.uint8)
    draw_detections(image, np.array([[5, 30, 70, 55]], np.float32), np.array([7]), np.array([0.8]), ["a"])
    assert image.any()


def test_crop_box_region_and_clipping() -> None:
    image = np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3)
    np.testing.assert_array_equal(crop_box(image, (10, 5, 30, 25), gain=1.0, pad=0), image[5:25, 10:30])
    # gain 1.02 and 10 px pad: half size (20 * 1.02 + 10) / 2 = 15.2 around centre (20, 15)
    # x: int(4.8)..int(35.2) = 4..35; y: max(-0.2, 0)..int(30.2) = 0..30
    grown = crop_box(image, (10, 5, 30, 25))
    np.testing.assert_array_equal(grown, image[0:30, 4:35])
    clipped = crop_box(image, (0, 0, 10, 10))
    assert clipped.shape[:2] == (15, 15)  # starts at 0 (clipped), ends at int(5 + 10.1) = 15
    square = crop_box(image, (10, 10, 20, 30), gain=1.0, pad=0, square=True)
    assert square.shape[:2] == (20, 20)
    assert not np.shares_memory(grown, image)


@pytest.mark.parametrize(("shape", "expected"), [((480, 640, 3), 2), ((1080, 810, 3), 3), ((4000, 3000, 3), 10)])
def test_default_line_thickness(shape: tuple[int, int, int], expected: int) -> None:
    assert default_line_thickness(shape) == expected
