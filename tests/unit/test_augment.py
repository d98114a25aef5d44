"""Training transforms: every label transform keeps boxes on the pixels of their objects."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from detector.config import Hyperparameters
from detector.data.augment import (
    PAD_VALUE,
    Albumentations,
    Compose,
    CopyPaste,
    Cutout,
    MixUp,
    Mosaic,
    PasteObject,
    RandomFlip,
    RandomHSV,
    RandomPerspective,
    Sample,
    box_candidates,
    build_train_transforms,
    cut_objects,
    flip,
    letterbox,
    letterbox_sample,
    mosaic4,
    mosaic9,
    paste_objects,
    polygon_mask,
    transform_boxes,
)
from detector.ops.boxes import scale_boxes

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (128, 0, 255)]


def object_sample(height: int, width: int, boxes: list[tuple[int, int, int, int]], colours: list[int]) -> Sample:
    """A black image with solid-colour rectangles (xyxy, exclusive end) and their boxes; class = colour index."""
    image = np.zeros((height, width, 3), np.uint8)
    for (x1, y1, x2, y2), colour in zip(boxes, colours, strict=True):
        image[y1:y2, x1:x2] = COLOURS[colour]
    return Sample.create(image, np.array(boxes, np.float32), np.array(colours))


def colour_fraction(sample: Sample, index: int, shrink: float = 2.0) -> float:
    """Fraction of pixels inside box ``index`` (shrunk by ``shrink`` px for resampling edges) of its class colour."""
    x1, y1, x2, y2 = sample.boxes_xyxy[index]
    region = sample.image[int(np.ceil(y1 + shrink)) : int(y2 - shrink), int(np.ceil(x1 + shrink)) : int(x2 - shrink)]
    if region.size == 0:
        return 1.0
    target = np.array(COLOURS[int(sample.classes[index])])
    return float((np.abs(region.astype(int) - target).max(axis=2) < 60).mean())


class FakeSource:
    """A SampleSource of solid-colour objects on black images of varying sizes (long side 64)."""

    def __init__(self) -> None:
        self.samples = [
            object_sample(64, 48, [(5, 5, 30, 40)], [0]),
            object_sample(40, 64, [(10, 8, 50, 30), (52, 2, 62, 12)], [1, 2]),
            object_sample(64, 64, [(20, 20, 60, 60)], [3]),
            object_sample(50, 64, [(0, 0, 20, 25)], [4]),
            object_sample(64, 30, [], []),
            object_sample(64, 64, [(30, 5, 60, 35)], [5]),
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def load_sample(self, index: int) -> Sample:
        return self.samples[index]

    def load_polygons(self, index: int) -> list[np.ndarray | None]:
        return [None] * len(self.samples[index].classes)  # box labels


# --------------------------------------------------------------------------------------------------------------------
# Letterbox


def test_letterbox_modes_hand_computed() -> None:
    image = np.zeros((480, 640, 3), np.uint8)
    out, info = letterbox(image, 320)
    assert out.shape == (320, 320, 3) and info.ratio == (0.5, 0.5) and info.pad == (0.0, 40.0)
    out, info = letterbox(image, 320, auto=True, stride=32)
    assert out.shape == (256, 320, 3) and info.pad == (0.0, 8.0)  # 240 rounded up to a multiple of 32
    out, info = letterbox(image, (320, 320), scale_fill=True)
    assert out.shape == (320, 320, 3) and info.ratio == (320 / 480, 0.5) and info.pad == (0.0, 0.0)
    out, info = letterbox(image, 800, scaleup=False)
    assert out.shape == (800, 800, 3) and info.ratio == (1.0, 1.0) and info.pad == (80.0, 160.0)
    assert (out[:160] == PAD_VALUE).all() and (out[160:640, 80:720] == 0).all()


@pytest.mark.parametrize("shape", [(480, 640), (640, 427), (333, 517), (100, 100)])
@pytest.mark.parametrize("mode", [{}, {"auto": True}, {"scale_fill": True}])
def test_letterbox_then_scale_boxes_is_the_identity_within_one_pixel(shape: tuple[int, int], mode: dict) -> None:
    rng = np.random.default_rng(0)
    height, width = shape
    corners = rng.uniform(0, 1, (20, 4)) * [width, height, width, height]
    boxes = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])], 1)
    sample = Sample.create(np.zeros((height, width, 3), np.uint8), boxes, np.zeros(20))
    image, info = letterbox(sample.image, (320, 320), **mode)
    moved = sample.boxes_xyxy.copy()
    moved[:, 0::2] = moved[:, 0::2] * info.ratio[1] + info.pad[0]
    moved[:, 1::2] = moved[:, 1::2] * info.ratio[0] + info.pad[1]
    if not mode.get("scale_fill"):  # scale_boxes' ratio_pad carries one gain; scale_fill has two
        back = scale_boxes(moved.copy(), image.shape[:2], shape, ratio_pad=(info.ratio, info.pad))
        np.testing.assert_allclose(back, boxes, atol=1.0)
    back = moved.copy()
    back[:, 0::2] = (back[:, 0::2] - info.pad[0]) / info.ratio[1]
    back[:, 1::2] = (back[:, 1::2] - info.pad[1]) / info.ratio[0]
    np.testing.assert_allclose(back, boxes, atol=1.0)


def test_letterbox_sample_keeps_boxes_on_their_pixels() -> None:
    sample = object_sample(120, 200, [(20, 30, 90, 100), (150, 10, 190, 50)], [0, 2])
    out, _ = letterbox_sample(sample, (96, 96), scaleup=True)
    assert out.image.shape == (96, 96, 3)
    for index in range(2):
        assert colour_fraction(out, index, shrink=1.5) > 0.95


# --------------------------------------------------------------------------------------------------------------------
# Flips, perspective


def test_flip_hand_computed_and_twice_is_identity() -> None:
    sample = object_sample(40, 100, [(10, 5, 30, 15)], [0])
    flipped = flip(sample, "horizontal")
    np.testing.assert_array_equal(flipped.boxes_xyxy, [[70, 5, 90, 15]])
    assert colour_fraction(flipped, 0, shrink=0) == 1.0
    np.testing.assert_array_equal(flip(sample, "vertical").boxes_xyxy, [[10, 25, 30, 35]])
    for direction in ("horizontal", "vertical"):
        twice = flip(flip(sample, direction), direction)
        np.testing.assert_array_equal(twice.image, sample.image)
        np.testing.assert_array_equal(twice.boxes_xyxy, sample.boxes_xyxy)
    with pytest.raises(ValueError, match="horizontal"):
        RandomFlip("diagonal", 0.5)


def test_transform_boxes_hand_computed() -> None:
    matrix = np.array([[2, 0, 10], [0, 3, -5], [0, 0, 1]], np.float32)  # scale x2/x3, then shift
    np.testing.assert_allclose(transform_boxes(np.array([[1, 2, 4, 6]], np.float32), matrix), [[12, 1, 18, 13]])
    rotate90 = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], np.float32)  # (x, y) -> (-y, x)
    np.testing.assert_allclose(transform_boxes(np.array([[1, 2, 4, 6]], np.float32), rotate90), [[-6, 1, -2, 4]])


def test_box_candidates_rules() -> None:
    before = np.array([[0, 0, 10, 10]] * 4, np.float32)
    after = np.array([[0, 0, 10, 10], [0, 0, 2, 10], [0, 0, 3, 3], [0, 0, 10, 10.0]], np.float32)
    after[3] = [0, 0, 2.5, 300]  # aspect 120
    np.testing.assert_array_equal(box_candidates(before, after), [True, False, False, False])


@pytest.mark.parametrize("seed", range(5))
def test_random_perspective_keeps_boxes_inside_and_on_their_objects(seed: int) -> None:
    sample = object_sample(96, 128, [(10, 10, 60, 50), (70, 40, 120, 90), (0, 0, 8, 8)], [0, 1, 2])
    step = RandomPerspective((96, 96), degrees=10, translate=0.1, scale=0.3, shear=3)
    out = step(sample, np.random.default_rng(seed))
    assert out.image.shape == (96, 96, 3)
    assert (
        (out.boxes_xyxy >= 0).all()
        and (out.boxes_xyxy[:, [0, 2]] <= 96).all()
        and (out.boxes_xyxy[:, [1, 3]] <= 96).all()
    )
    for index in range(len(out.classes)):
        assert colour_fraction(out, index, shrink=4) > 0.8  # a rotated rectangle's box also holds some black corners


def test_random_perspective_without_augmentation_is_a_centred_letterbox() -> None:
    sample = object_sample(64, 48, [(5, 5, 30, 40)], [0])
    out = RandomPerspective((64, 64))(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out.boxes_xyxy, [[13, 5, 38, 40]])
    assert (out.image[:, :8] == PAD_VALUE).all() and (out.image[:, 56:] == PAD_VALUE).all()
    np.testing.assert_array_equal(out.image[:, 8:56], sample.image)


def test_random_perspective_drops_boxes_moved_out_of_the_image() -> None:
    sample = object_sample(100, 100, [(0, 0, 10, 10), (40, 40, 60, 60)], [0, 1])
    step = RandomPerspective((100, 100), translate=0.0, scale=0.0)
    step.random_matrix = lambda *_: (np.array([[1, 0, 45], [0, 1, 0], [0, 0, 1]], np.float32), 1.0)  # shift right 45
    out = step(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out.classes, [0, 1])
    step.random_matrix = lambda *_: (np.array([[1, 0, 95], [0, 1, 0], [0, 0, 1]], np.float32), 1.0)  # 95: box 1 gone
    out = step(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out.classes, [0])  # box 0 now 95..100 wide 5 px; box 1 left the image


# --------------------------------------------------------------------------------------------------------------------
# Mosaic


def test_mosaic4_places_images_around_the_centre() -> None:
    tiles = [object_sample(40, 30, [(0, 0, 30, 40)], [i]) for i in range(4)]  # each tile filled with its colour
    out = mosaic4(
        [t.image for t in tiles], [t.boxes_xyxy for t in tiles], [t.classes for t in tiles], size=50, center=(45, 60)
    )
    assert out.image.shape == (100, 100, 3)
    expected = [[15, 20, 45, 60], [45, 20, 75, 60], [15, 60, 45, 100], [45, 60, 75, 100]]
    np.testing.assert_array_equal(out.boxes_xyxy, expected)
    for index in range(4):
        assert colour_fraction(out, index, shrink=0) == 1.0
    assert (out.image[:20] == PAD_VALUE).all()  # above the top tiles: border


def test_mosaic4_cuts_off_and_clips_at_the_canvas_edge() -> None:
    tiles = [object_sample(50, 50, [(0, 0, 50, 50)], [i]) for i in range(4)]
    out = mosaic4(
        [t.image for t in tiles], [t.boxes_xyxy for t in tiles], [t.classes for t in tiles], size=50, center=(30, 80)
    )
    np.testing.assert_array_equal(
        out.boxes_xyxy, [[0, 30, 30, 80], [30, 30, 80, 80], [0, 80, 30, 100], [30, 80, 80, 100]]
    )
    for index in range(4):
        assert colour_fraction(out, index, shrink=0) == 1.0


def test_mosaic9_boxes_land_on_their_objects() -> None:
    tiles = [object_sample(30, 40, [(5, 5, 25, 25)], [i % len(COLOURS)]) for i in range(9)]
    out = mosaic9(
        [t.image for t in tiles], [t.boxes_xyxy for t in tiles], [t.classes for t in tiles], size=40, offset=(20, 10)
    )
    assert out.image.shape == (80, 80, 3)
    # centre cell at (40, 40), image centred in it vertically (+5), box (5, 5, 25, 25), minus the (20, 10) offset
    np.testing.assert_array_equal(out.boxes_xyxy[0], [25, 40, 45, 60])
    for index in range(len(out.classes)):
        assert colour_fraction(out, index, shrink=0) == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_full_training_pipeline_keeps_labels_on_object_pixels(seed: int) -> None:
    source = FakeSource()
    hyp = Hyperparameters(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0, translate=0.1, scale=0.5, mosaic9=0.3)
    pipeline = build_train_transforms(hyp, 64, source)
    out = pipeline(source.load_sample(seed % len(source)), np.random.default_rng(seed))
    assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8
    boxes = out.boxes_xyxy
    assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    for index in range(len(out.classes)):
        assert colour_fraction(out, index, shrink=2) > 0.9


def test_mosaic_draws_extra_indices_from_its_source() -> None:
    class CountingSource(FakeSource):
        def __init__(self) -> None:
            super().__init__()
            self.requested: list[int] = []

        def load_sample(self, index: int) -> Sample:
            self.requested.append(index)
            return super().load_sample(index)

    source = CountingSource()
    out = Mosaic(source, 64, probability=1.0)(source.samples[0], np.random.default_rng(1))
    assert out.image.shape == (128, 128, 3) and len(source.requested) == 3
    assert Mosaic(source, 64, probability=0.0)(source.samples[0], np.random.default_rng(1)) is source.samples[0]


def test_same_seed_gives_the_same_augmentation() -> None:
    source = FakeSource()
    pipeline = build_train_transforms(Hyperparameters(mixup=0.5, degrees=5), 64, source)
    first = pipeline(source.samples[1], np.random.default_rng(7))
    again = pipeline(source.samples[1], np.random.default_rng(7))
    other = pipeline(source.samples[1], np.random.default_rng(8))
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.boxes_xyxy, again.boxes_xyxy)
    assert not np.array_equal(first.image, other.image)


def test_composition_order_is_visible_and_extensible() -> None:
    hyp = Hyperparameters(mixup=0.1, cutout=0.2)
    pipeline = build_train_transforms(hyp, 64, FakeSource())
    names = [type(step).__name__ for step in pipeline.steps]
    assert names == ["Compose", "MixUp", "Cutout", "RandomHSV", "RandomFlip", "RandomFlip"]
    assert [type(step).__name__ for step in pipeline.steps[0].steps] == ["Mosaic", "RandomPerspective"]
    with_paste = build_train_transforms(Hyperparameters(copy_paste=0.5), 64, FakeSource())
    assert [type(step).__name__ for step in with_paste.steps[0].steps] == ["Mosaic", "CopyPaste", "RandomPerspective"]
    rect = build_train_transforms(Hyperparameters(copy_paste=0.5), 64, None, rect=True)
    assert [type(step).__name__ for step in rect.steps[0].steps] == ["RandomPerspective"]

    class Invert:  # a new augmentation is one class and one list entry
        def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
            return Sample(255 - sample.image, sample.boxes_xyxy, sample.classes)

    extended = Compose([*pipeline.steps, Invert()])
    assert extended(FakeSource().samples[0], np.random.default_rng(0)).image.shape == (64, 64, 3)


def test_background_sample_passes_every_step() -> None:
    source = FakeSource()
    hyp = Hyperparameters(mosaic=0.0, mixup=1.0, cutout=1.0, degrees=10, shear=2, perspective=0.0005, flipud=0.5)
    out = build_train_transforms(hyp, 64, source)(source.samples[4], np.random.default_rng(3))
    assert out.image.shape == (64, 64, 3) and out.boxes_xyxy.shape[1] == 4 and out.classes.dtype == np.int64


# --------------------------------------------------------------------------------------------------------------------
# Photometric and mixing


def test_hsv_matches_a_per_pixel_reference() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    step = RandomHSV(0.5, 0.5, 0.5)
    out = step(Sample.create(image), np.random.default_rng(3)).image
    gains = np.random.default_rng(3).uniform(-1, 1, 3) * 0.5 + 1
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.float64)
    hue = (np.floor(hsv[..., 0] * gains[0]) % 180).astype(np.uint8)
    saturation = np.clip(np.floor(hsv[..., 1] * gains[1]), 0, 255).astype(np.uint8)
    value = np.clip(np.floor(hsv[..., 2] * gains[2]), 0, 255).astype(np.uint8)
    expected = cv2.cvtColor(np.stack([hue, saturation, value], axis=2), cv2.COLOR_HSV2BGR)
    np.testing.assert_array_equal(out, expected)
    untouched = RandomHSV(0, 0, 0)(Sample.create(image), np.random.default_rng(0)).image
    np.testing.assert_array_equal(untouched, image)


def test_mixup_blends_images_and_keeps_both_label_sets() -> None:
    source = FakeSource()
    geometry = RandomPerspective((64, 64))
    sample = geometry(source.samples[2], np.random.default_rng(0))
    out = MixUp(source, geometry, probability=1.0)(sample, np.random.default_rng(5))
    assert len(out.classes) > len(sample.classes)
    np.testing.assert_array_equal(out.classes[: len(sample.classes)], sample.classes)
    # Pixels are a convex mix: between the two inputs' values (inputs are 0/255/114 valued).
    assert out.image.dtype == np.uint8 and ((out.image > 0) & (out.image < 255)).any()


def test_cutout_paints_patches_and_drops_hidden_boxes_only() -> None:
    boxes = [(x, y, x + 12, y + 12) for x in range(0, 96, 16) for y in range(0, 96, 16)]
    sample = Sample.create(np.zeros((96, 96, 3), np.uint8), np.array(boxes, np.float32), np.zeros(len(boxes)))
    for seed in range(5):
        out = Cutout(1.0)(sample, np.random.default_rng(seed))
        painted = out.image.max(axis=2) > 0  # patch colours are 64-191, the image was black
        assert painted.any()
        for x1, y1, x2, y2 in out.boxes_xyxy.astype(int):
            assert painted[y1:y2, x1:x2].mean() <= 0.6 + 1e-6


def test_albumentations_is_optional() -> None:
    step = Albumentations(1.0)
    sample = FakeSource().samples[0]
    out = step(sample, np.random.default_rng(0))
    assert out.image.shape == sample.image.shape
    if step.pipeline is None:  # package not installed: an unchanged pass-through
        assert out is sample


@pytest.mark.parametrize(("gain", "shift"), [(0.6, (10.3, -20.7)), (1.37, (-40.2, 5.5)), (1.0, (7.0, 3.0))])
def test_scale_and_shift_fast_path_matches_warp_affine(gain: float, shift: tuple[float, float]) -> None:
    """The crop+resize path against cv2.warpAffine given the applied matrix in pixel-centre convention."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), (7, 7), 0)
    step = RandomPerspective((100, 100))
    step.random_matrix = lambda *_: (np.array([[gain, 0, shift[0]], [0, gain, shift[1]], [0, 0, 1]], np.float32), gain)
    box = np.array([[40, 40, 60, 60]], np.float32)  # stays inside the output in all three cases
    out = step(Sample.create(image, box, [0]), np.random.default_rng(0))
    # Recover the applied edge-convention map u -> a * u + b from the moved box, then warp with OpenCV.
    a_x = (out.boxes_xyxy[0, 2] - out.boxes_xyxy[0, 0]) / 20
    a_y = (out.boxes_xyxy[0, 3] - out.boxes_xyxy[0, 1]) / 20
    b_x, b_y = out.boxes_xyxy[0, 0] - 40 * a_x, out.boxes_xyxy[0, 1] - 40 * a_y
    assert abs(a_x - gain) < 0.02 and abs(b_x - shift[0]) < 1.0 and abs(b_y - shift[1]) < 1.0
    centre_matrix = np.array([[a_x, 0, b_x + 0.5 * a_x - 0.5], [0, a_y, b_y + 0.5 * a_y - 0.5]], np.float32)
    expected = cv2.warpAffine(image, centre_matrix, (100, 100), borderValue=(PAD_VALUE,) * 3)
    top, bottom = max(0, int(b_y) + 3), min(100, int(b_y + 90 * a_y) - 3)  # image interior seen in the output
    left, right = max(0, int(b_x) + 3), min(100, int(b_x + 120 * a_x) - 3)
    inside = (slice(top, bottom), slice(left, right))
    assert bottom - top > 30 and right - left > 30
    difference = np.abs(out.image[inside].astype(int) - expected[inside].astype(int))
    assert difference.mean() < 1.0 and difference.max() <= 8


def test_mosaic4_border_is_grey_wherever_no_picture_lands() -> None:
    """Random sizes and centres (including centres on the canvas edge) against a fully pre-filled canvas."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        size = int(rng.integers(4, 24))
        shapes = [(int(rng.integers(1, size + 1)), int(rng.integers(1, size + 1))) for _ in range(4)]
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
        center = (int(rng.integers(0, 2 * size + 1)), int(rng.integers(0, 2 * size + 1)))
        expected = np.full((2 * size, 2 * size, 3), PAD_VALUE, np.uint8)
        for position, image in enumerate(images):
            height, width = image.shape[:2]
            x0 = center[0] - width if position in (0, 2) else center[0]
            y0 = center[1] - height if position in (0, 1) else center[1]
            for y in range(max(y0, 0), min(y0 + height, 2 * size)):
                for x in range(max(x0, 0), min(x0 + width, 2 * size)):
                    expected[y, x] = image[y - y0, x - x0]
        empty = [np.zeros((0, 4), np.float32)] * 4
        out = mosaic4(images, empty, [np.zeros(0)] * 4, size=size, center=center)
        np.testing.assert_array_equal(out.image, expected)


# --------------------------------------------------------------------------------------------------------------------
# Copy-paste


def test_polygon_mask_takes_the_pixels_whose_centre_is_inside() -> None:
    square = polygon_mask(np.array([[2, 2], [6, 2], [6, 6], [2, 6]]), (8, 8))
    expected = np.zeros((8, 8), bool)
    expected[2:6, 2:6] = True  # the same pixels as the box (2, 2, 6, 6)
    np.testing.assert_array_equal(square, expected)
    # Centres (x + 0.5, y + 0.5) with x + y + 1 < 4; (3.5, 0.5) lies on the edge and is out.
    triangle = polygon_mask(np.array([[0, 0], [4, 0], [0, 4]]), (4, 4))
    np.testing.assert_array_equal(triangle, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    # Vertices outside the patch are fine. A top edge at y = 0.5 runs through row 0's centres: inside; at 0.6: not.
    wide = polygon_mask(np.array([[-3, 0.5], [9, 0.5], [9, 2.6], [-3, 2.6]]), (3, 4))
    np.testing.assert_array_equal(wide, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(polygon_mask(np.array([[0, 0.6], [4, 0.6], [4, 3], [0, 3]]), (3, 4))[0], [0] * 4)


def donor_sample() -> Sample:
    """A 20x24 donor: pixel values encode their position; a box (4, 2, 10, 10) and a box (12.5, 3, 17.5, 9)."""
    image = (np.arange(20 * 24 * 3) % 251).astype(np.uint8).reshape(20, 24, 3)
    return Sample.create(image, np.array([[4, 2, 10, 10], [12.5, 3, 17.5, 9]], np.float32), np.array([3, 5]))


def test_cut_objects_by_polygon_and_by_box() -> None:
    donor = donor_sample()
    # Object 0: a right triangle with corners (4, 2), (10, 2), (4, 10) in pixels, normalised by (24, 20).
    triangle = np.array([[4 / 24, 2 / 20], [10 / 24, 2 / 20], [4 / 24, 10 / 20]], np.float32)
    first, second = cut_objects(donor, [triangle, None])
    np.testing.assert_array_equal(first.patch, donor.image[2:10, 4:10])
    np.testing.assert_array_equal(first.box_xyxy, [0, 0, 6, 8])
    assert first.class_id == 3 and first.mask is not None and first.mask.shape == (8, 6)
    np.testing.assert_array_equal(first.mask, polygon_mask(np.array([[0, 0], [6, 0], [0, 8]]), (8, 6)))
    # Object 1 is a box label with fractional x: the patch is rounded out to whole pixels, the box kept exact.
    np.testing.assert_array_equal(second.patch, donor.image[3:9, 12:18])
    np.testing.assert_array_equal(second.box_xyxy, [0.5, 0, 5.5, 6])
    assert second.mask is None and second.class_id == 5
    tiny = Sample.create(donor.image, np.array([[3, 3, 4.5, 9]], np.float32), np.array([0]))
    assert cut_objects(tiny, [None]) == []  # under 2 px wide: nothing to paste


def test_paste_copies_exactly_the_object_pixels_and_adds_its_box() -> None:
    donor = donor_sample()
    target = Sample.create(np.zeros((30, 30, 3), np.uint8), np.array([[0, 0, 10, 10]], np.float32), np.array([1]))
    original = target.image.copy()
    box_object, triangle_object = (
        cut_objects(donor, [None, None])[1],
        cut_objects(donor, [np.array([[4 / 24, 2 / 20], [10 / 24, 2 / 20], [4 / 24, 10 / 20]], np.float32), None])[0],
    )
    out = paste_objects(target, [box_object, triangle_object], [(20, 20), (12, 0)])
    np.testing.assert_array_equal(out.boxes_xyxy, [[0, 0, 10, 10], [20.5, 20, 25.5, 26], [12, 0, 18, 8]])
    np.testing.assert_array_equal(out.classes, [1, 5, 3])
    np.testing.assert_array_equal(out.image[20:26, 20:26], donor.image[3:9, 12:18])  # the box crop, whole
    region = out.image[0:8, 12:18]
    mask = triangle_object.mask
    np.testing.assert_array_equal(region[mask], donor.image[2:10, 4:10][mask])  # inside the outline: the object
    assert not region[~mask].any()  # outside it: the target's own (black) pixels
    untouched = np.ones((30, 30), bool)
    untouched[20:26, 20:26] = False
    untouched[0:8, 12:18] = False
    np.testing.assert_array_equal(out.image[untouched], original[untouched])
    np.testing.assert_array_equal(target.image, original)  # the input image (maybe a RAM cache) is not modified


def test_paste_covering_most_of_a_box_is_refused() -> None:
    patch = np.full((10, 10, 3), 200, np.uint8)
    paste = PasteObject(patch, None, np.array([0, 0, 10, 10], np.float32), 7)
    target = Sample.create(np.zeros((40, 40, 3), np.uint8), np.array([[10, 10, 20, 20]], np.float32), np.array([1]))
    # At x=12 the paste covers 8x10 = 80% of the box (10, 10, 20, 20): refused, the sample is returned as it was.
    assert paste_objects(target, [paste], [(12, 10)]) is target
    # At x=17 it covers 3x10 = 30%, not more than the 0.30 limit: accepted.
    accepted = paste_objects(target, [paste], [(17, 10)])
    np.testing.assert_array_equal(accepted.boxes_xyxy, [[10, 10, 20, 20], [17, 10, 27, 20]])
    # Earlier pastes count as existing boxes: a second copy over the first one is refused.
    twice = paste_objects(target, [paste, paste], [(25, 25), (26, 26)])
    np.testing.assert_array_equal(twice.boxes_xyxy, [[10, 10, 20, 20], [25, 25, 35, 35]])
    # Coverage adds up: 20% from the left, then 20% from the right would hide 40% of the box: the second is refused.
    sides = paste_objects(target, [paste, paste], [(2, 10), (18, 10)])
    np.testing.assert_array_equal(sides.boxes_xyxy, [[10, 10, 20, 20], [2, 10, 12, 20]])
    assert len(paste_objects(target, [paste], [(12, 10)], max_covered=0.9).classes) == 2
    with pytest.raises(ValueError, match="falls outside 40x40"):
        paste_objects(target, [paste], [(35, 0)])


class PolygonSource(FakeSource):
    """FakeSource whose object 0 of image 2 is a diamond outline inside its box (20, 20, 60, 60) of 64x64."""

    def __init__(self) -> None:
        super().__init__()
        image = np.zeros((64, 64, 3), np.uint8)
        self.diamond = np.array([[40, 20], [60, 40], [40, 60], [20, 40]], np.float32)
        inside = polygon_mask(self.diamond, (64, 64))
        image[inside] = COLOURS[3]
        self.samples[2] = Sample.create(image, np.array([[20, 20, 60, 60]], np.float32), np.array([3]))

    def load_polygons(self, index: int) -> list[np.ndarray | None]:
        return [self.diamond / 64] if index == 2 else super().load_polygons(index)


def test_copy_paste_probability_zero_is_the_identity() -> None:
    source = PolygonSource()
    sample = source.samples[0]
    rng = np.random.default_rng(0)
    assert CopyPaste(source, 0.0)(sample, rng) is sample
    assert rng.random() == np.random.default_rng(0).random()  # no random number was drawn either


@pytest.mark.parametrize("seed", range(8))
def test_copy_paste_objects_land_on_their_pixels_and_repeat_with_the_seed(seed: int) -> None:
    source = PolygonSource()
    canvas = Sample.create(np.zeros((128, 128, 3), np.uint8))  # as after a mosaic: twice the size, here empty
    step = CopyPaste(source, 1.0)
    out = step(canvas, np.random.default_rng(seed))
    again = step(canvas, np.random.default_rng(seed))
    np.testing.assert_array_equal(out.image, again.image)
    np.testing.assert_array_equal(out.boxes_xyxy, again.boxes_xyxy)
    draws = np.random.default_rng(seed)
    draws.random()  # CopyPaste's own draw: paste or not
    donor_index = int(draws.integers(0, len(source)))
    donor = source.samples[donor_index]
    assert set(out.classes.tolist()) <= set(donor.classes.tolist())
    assert len(out.classes) >= min(1, len(donor.classes))  # on an empty canvas the first object always fits
    for index in range(len(out.classes)):
        assert colour_fraction(out, index, shrink=0) >= 0.7 or int(out.classes[index]) == 3  # <= 30% covered
        size = out.boxes_xyxy[index, 2:] - out.boxes_xyxy[index, :2]
        match = np.flatnonzero(donor.classes == out.classes[index])[0]
        np.testing.assert_array_equal(size, donor.boxes_xyxy[match, 2:] - donor.boxes_xyxy[match, :2])


def test_copy_paste_cuts_polygon_objects_along_their_outline() -> None:
    class DiamondSource(PolygonSource):  # only the diamond image
        def __len__(self) -> int:
            return 1

        def load_sample(self, index: int) -> Sample:
            return self.samples[2]

        def load_polygons(self, index: int) -> list[np.ndarray | None]:
            return super().load_polygons(2)

    source = DiamondSource()
    grey = Sample.create(np.full((100, 100, 3), 50, np.uint8))
    out = CopyPaste(source, 1.0)(grey, np.random.default_rng(3))
    draws = np.random.default_rng(3)
    draws.random()  # CopyPaste's draws: paste or not,
    draws.integers(0, 1)  # the donor index,
    x, y = int(draws.integers(0, 100 - 40 + 1)), int(draws.integers(0, 100 - 40 + 1))  # where the 40x40 patch goes
    np.testing.assert_array_equal(out.boxes_xyxy, [[x, y, x + 40, y + 40]])
    np.testing.assert_array_equal(out.classes, [3])
    inside = polygon_mask(source.diamond - 20, (40, 40))
    region = out.image[y : y + 40, x : x + 40]
    assert (region[inside] == COLOURS[3]).all()  # the diamond's pixels
    assert (region[~inside] == 50).all()  # the box corners outside the outline keep the grey target
    outside = np.ones((100, 100), bool)
    outside[y : y + 40, x : x + 40] = False
    assert (out.image[outside] == 50).all()


@pytest.mark.parametrize("seed", range(4))
def test_copy_paste_after_mosaic_keeps_labels_on_object_pixels(seed: int) -> None:
    source = PolygonSource()
    hyp = Hyperparameters(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, translate=0.0, scale=0.0, fliplr=0.0, copy_paste=1.0)
    plain = build_train_transforms(replace(hyp, copy_paste=0.0), 64, source)(source.samples[1], rng(seed))
    pasted = build_train_transforms(hyp, 64, source)(source.samples[1], rng(seed))
    assert pasted.image.shape == (64, 64, 3)
    boxes = pasted.boxes_xyxy
    assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    for index in range(len(pasted.classes)):  # a paste may hide at most 30% of an original box
        assert colour_fraction(pasted, index, shrink=1) > 0.6 or int(pasted.classes[index]) == 3
    assert len(plain.classes) <= len(pasted.classes)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
