"""Automatic augmentation policies for detection: TrivialAugment-Wide, RandAugment and the learned policy v0.

Selected with ``train.py --auto-augment POLICY`` (``TrainConfig.auto_augment``); :func:`build_auto_augment` turns the
name into a transform that :func:`detector.data.augment.build_train_transforms` places after mosaic and random
perspective (so it sees the final ``imgsz`` canvas) and before mixup, cutmix, cutout, HSV and flips.

Policies
--------
``trivial``: :class:`TrivialAugmentWide` (Müller & Hutter 2021, https://arxiv.org/abs/2103.10158). One op per image,
    chosen uniformly from :data:`TRIVIAL_AUGMENT_OPS`, at a magnitude bin drawn uniformly from 0..30 over the op's
    "wide" range, with a random sign for signed ops. No hyperparameters.
``randaugment`` / ``randaugment-nN-mM``: :class:`RandAugment` (Cubuk et al. 2019, https://arxiv.org/abs/1909.13719).
    N ops (default 2) chosen uniformly with replacement, each at the fixed magnitude bin M (default 9) of 31 bins
    0..30 (torchvision's scale, not the paper's 0..10: M 9 of 30 here is a milder distortion than 9 of 10), with
    a random sign for signed ops.
``detection-v0``: :class:`DetectionPolicyV0`, the policy learned on COCO by Zoph et al. 2019, "Learning Data
    Augmentation Strategies for Object Detection" (https://arxiv.org/abs/1906.11172), as written in
    ``policy_v0()`` of tensorflow/tpu ``models/official/detection/utils/autoaugment_utils.py``: one of 5
    sub-policies chosen uniformly, then each of its 2 ops applied with its own probability at its level 0..10.

Magnitudes
----------
TrivialAugment and RandAugment share one op table (:data:`OPS`, :data:`TRIVIAL_AUGMENT_WIDE_RANGES`,
:data:`RAND_AUGMENT_RANGES`). Bin ``b`` of 31 maps linearly from an op's ``low`` (bin 0) to its ``high`` (bin 30);
signed ops (shear, translate, rotate, the four enhancements) then get a random sign. The units:

    ShearX/Y      shear factor (tan of the angle), about the image centre    wide 0-0.99, RandAugment 0-0.3
    TranslateX/Y  fraction of the image width/height                          wide 0-1/7,  RandAugment 0-150/331
    Rotate        degrees, counter-clockwise on screen, about the centre      wide 0-135,  RandAugment 0-30
    Brightness, Color (saturation), Contrast, Sharpness: factor 1 + m (1 = unchanged)   wide m 0-0.99, RA m 0-0.9
    Posterize     bits kept per channel (rounded)                             wide 8-2,    RandAugment 8-4
    Solarize      threshold: pixels >= it are inverted                        both 256-0 (256 = unchanged)
    Identity, AutoContrast, Equalize: no magnitude

These follow torchvision's ``TrivialAugmentWide`` and ``RandAugment`` ranges with three changes: translations are
fractions of the image side rather than pixels (TrivialAugment's 32 px was set for ImageNet's 224 px crops: 1/7),
Solarize starts at 256 so bin 0 changes nothing, and Posterize rounds to whole bits. TrivialAugment-Wide's
135 degree rotation and 0.99 shear are kept: the box of a rotated object is the box around its rotated corners,
which is loose at such angles; choose ``randaugment`` for milder geometry.

The v0 policy uses the source's level -> argument mapping (level / 10 times a maximum): shear 0.3, rotate 30 degrees,
enhancement factor 0.1 + 1.8 * level / 10, translate 250 px (whole image) or 120 px (content inside a box), Cutout
half-size 100 px. The pixel constants were set for COCO images before resizing (long side about 640); here they are
scaled by the image's long side / 640, so they mean the same at any ``--img``.

Geometry ops warp the image with ``cv2.warpAffine`` (bilinear, grey ``PAD_VALUE`` fill like the letterbox) and move
boxes with the same matrix (:func:`detector.data.augment.transform_boxes`: the box around the 4 moved corners); boxes
are then clipped to the image and kept by :func:`detector.data.augment.box_candidates` (over 2 px wide and high,
over 10% of the moved box's area still inside the image, aspect ratio under 100), as random perspective does.
Colour ops never touch boxes. All fills (warp borders, Cutout, bbox-only translate) use ``PAD_VALUE`` (114) where
the TensorFlow source used 128.

Every policy is a :class:`~detector.data.augment.Transform` drawing all its randomness from the ``rng`` it is given;
the ops themselves (:data:`OPS`, :func:`cutout`, :func:`translate_y_only_boxes`) are deterministic pure functions
that never modify their input arrays.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np

from detector.data.augment import PAD_VALUE, Sample, Transform, box_candidates, transform_boxes
from detector.errors import ConfigError

Op = Callable[[Sample, float], Sample]

# --------------------------------------------------------------------------------------------------------------------
# Colour ops: boxes untouched


def identity(sample: Sample, magnitude: float = 0.0) -> Sample:
    """The sample itself (``magnitude`` is ignored)."""
    return sample


def _table_op(sample: Sample, table: np.ndarray) -> Sample:
    """Map every pixel through a (256,) uint8 look-up table, or a (1, 256, 3) one per channel."""
    return Sample(cv2.LUT(sample.image, table), sample.boxes_xyxy, sample.classes)


def _linear_table(factor: float, offset: float) -> np.ndarray:
    """(256,) uint8 table of ``level * factor + offset``, rounded and clipped to 0-255."""
    return np.clip(np.rint(np.arange(256, dtype=np.float64) * factor + offset), 0, 255).astype(np.uint8)


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    """``degenerate + factor * (image - degenerate)``, rounded and clipped: PIL ImageEnhance's blend (factor > 1
    extrapolates away from the degenerate image)."""
    return cv2.addWeighted(degenerate, 1.0 - factor, image, factor, 0.0)


def brightness(sample: Sample, factor: float) -> Sample:
    """Scale every pixel by ``factor`` (0 = black, 1 = unchanged), like PIL ``ImageEnhance.Brightness``."""
    return _table_op(sample, _linear_table(factor, 0.0))


def color(sample: Sample, factor: float) -> Sample:
    """Saturation: blend with the image's greyscale (0 = grey, 1 = unchanged), like PIL ``ImageEnhance.Color``."""
    grey = cv2.cvtColor(cv2.cvtColor(sample.image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return Sample(_blend(grey, sample.image, factor), sample.boxes_xyxy, sample.classes)


def contrast(sample: Sample, factor: float) -> Sample:
    """Blend with the mean grey level (0 = flat grey, 1 = unchanged), like PIL ``ImageEnhance.Contrast``."""
    mean = float(np.rint(cv2.cvtColor(sample.image, cv2.COLOR_BGR2GRAY).mean()))
    return _table_op(sample, _linear_table(factor, mean * (1.0 - factor)))


# PIL's ImageFilter.SMOOTH, the degenerate image of ImageEnhance.Sharpness.
_SMOOTH_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def sharpness(sample: Sample, factor: float) -> Sample:
    """Blend with a 3x3-smoothed copy (0 = smoothed, 1 = unchanged, > 1 sharper); border pixels are kept, as in PIL
    ``ImageEnhance.Sharpness``."""
    image = sample.image
    if min(image.shape[:2]) < 3:
        return sample
    smooth = image.copy()
    smooth[1:-1, 1:-1] = cv2.filter2D(image, -1, _SMOOTH_KERNEL)[1:-1, 1:-1]
    return Sample(_blend(smooth, image, factor), sample.boxes_xyxy, sample.classes)


def posterize(sample: Sample, bits: float) -> Sample:
    """Keep the ``bits`` (0-8, rounded) highest bits of each channel value."""
    whole_bits = round(bits)
    if not 0 <= whole_bits <= 8:
        raise ValueError(f"posterize keeps 0 to 8 bits, got {bits}")
    mask = (0xFF << (8 - whole_bits)) & 0xFF
    return Sample(np.bitwise_and(sample.image, np.uint8(mask)), sample.boxes_xyxy, sample.classes)


def solarize(sample: Sample, threshold: float) -> Sample:
    """Invert (255 - v) every channel value >= ``threshold`` (256 = unchanged, 0 = negative image)."""
    levels = np.arange(256)
    return _table_op(sample, np.where(levels >= threshold, 255 - levels, levels).astype(np.uint8))


def autocontrast(sample: Sample, magnitude: float = 0.0) -> Sample:
    """Stretch each channel so its darkest value becomes 0 and its brightest 255 (flat channels stay), like PIL
    ``ImageOps.autocontrast`` without cutoff. ``magnitude`` is ignored."""
    extremes = [cv2.minMaxLoc(channel)[:2] for channel in cv2.split(sample.image)]  # 10x numpy's strided min/max
    low, high = np.array(extremes, np.int64).T
    levels = np.arange(256, dtype=np.int64)[:, None]
    span = np.maximum(high - low, 1)
    stretched = np.clip((levels - low) * 255 // span, 0, 255)  # integer maths: exact at both ends
    table = np.where(high > low, stretched, levels).astype(np.uint8)
    return _table_op(sample, np.ascontiguousarray(table[None]))  # (1, 256, 3): one column per channel


def equalize(sample: Sample, magnitude: float = 0.0) -> Sample:
    """Histogram equalisation of each channel, by PIL ``ImageOps.equalize``'s rule: with ``step`` = (pixel count
    minus the count of the brightest value present) // 255, value i maps to (step // 2 + count below i) // step;
    a channel with step 0 (nearly one value) is left as it is. ``magnitude`` is ignored."""
    tables = np.empty((1, 256, 3), np.uint8)
    for channel, plane in enumerate(cv2.split(sample.image)):
        # float32 counts: exact up to 2**24 pixels of one value, far beyond a training image
        histogram = cv2.calcHist([plane], [0], None, [256], [0, 256]).ravel().astype(np.int64)
        present = histogram[histogram > 0]
        step = (int(present.sum()) - int(present[-1])) // 255 if len(present) else 0
        if step == 0:
            tables[0, :, channel] = np.arange(256)
            continue
        below = np.concatenate([[0], np.cumsum(histogram)[:-1]])
        tables[0, :, channel] = np.clip((below + step // 2) // step, 0, 255)
    return _table_op(sample, tables)


# --------------------------------------------------------------------------------------------------------------------
# Geometry ops: image and boxes warped with one matrix
#
# Matrices are 3x3 in pixel-edge coordinates, the convention of box corners (pixel (i, j) spans x in [i, i + 1]), so
# the image centre is (W / 2, H / 2). cv2 samples at pixel centres; warp_sample converts.


def translation_matrix(dx: float, dy: float) -> np.ndarray:
    """3x3 float64 matrix moving content ``dx`` px right and ``dy`` px down."""
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def shear_matrix(factor: float, shape: tuple[int, int], axis: str) -> np.ndarray:
    """3x3 float64 shear about the centre of an image of ``shape`` (height, width).

    ``axis="x"``: x' = x + factor * (y - H / 2) (rows below the centre move right for factor > 0);
    ``axis="y"``: y' = y + factor * (x - W / 2).
    """
    height, width = shape
    if axis == "x":
        return np.array([[1.0, factor, -factor * height / 2], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    if axis == "y":
        return np.array([[1.0, 0.0, 0.0], [factor, 1.0, -factor * width / 2], [0.0, 0.0, 1.0]])
    raise ValueError(f"shear axis must be 'x' or 'y', got {axis!r}")


def rotation_matrix(degrees: float, shape: tuple[int, int]) -> np.ndarray:
    """3x3 float64 rotation by ``degrees`` counter-clockwise (as seen on screen) about the image centre."""
    height, width = shape
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    centre_x, centre_y = width / 2, height / 2
    # With y pointing down, an on-screen counter-clockwise turn is x' = c x + s y, y' = -s x + c y about the centre.
    return np.array(
        [
            [cos, sin, centre_x - cos * centre_x - sin * centre_y],
            [-sin, cos, centre_y + sin * centre_x - cos * centre_y],
            [0.0, 0.0, 1.0],
        ]
    )


def warp_sample(sample: Sample, matrix: np.ndarray) -> Sample:
    """Warp image and boxes with one 3x3 affine ``matrix`` (pixel-edge coordinates), keeping the image size.

    Borders are filled with ``PAD_VALUE``; boxes are the box around their 4 moved corners, clipped to the image,
    and dropped unless :func:`box_candidates` keeps them (over 2 px a side, over 10% of the moved box visible,
    aspect ratio under 100).
    """
    height, width = sample.image.shape[:2]
    # cv2 puts pixel centres at integer coordinates: x_centre = x_edge - 0.5 on both sides of the map.
    to_centres = translation_matrix(-0.5, -0.5) @ matrix @ translation_matrix(0.5, 0.5)
    image = cv2.warpAffine(
        sample.image,
        to_centres[:2].astype(np.float64),
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    if len(sample.classes) == 0:
        return Sample(image, sample.boxes_xyxy, sample.classes)
    moved = transform_boxes(sample.boxes_xyxy, matrix)
    boxes = moved.copy()
    np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
    keep = box_candidates(moved, boxes)
    return Sample(image, boxes[keep], sample.classes[keep])


def shear_x(sample: Sample, factor: float) -> Sample:
    """Shear along x by ``factor`` about the image centre (see :func:`shear_matrix`); boxes follow."""
    if factor == 0:
        return sample
    return warp_sample(sample, shear_matrix(factor, sample.image.shape[:2], "x"))


def shear_y(sample: Sample, factor: float) -> Sample:
    """Shear along y by ``factor`` about the image centre (see :func:`shear_matrix`); boxes follow."""
    if factor == 0:
        return sample
    return warp_sample(sample, shear_matrix(factor, sample.image.shape[:2], "y"))


def translate_x(sample: Sample, pixels: float) -> Sample:
    """Move content ``pixels`` right (left when negative); boxes follow, those pushed out are dropped."""
    if pixels == 0:
        return sample
    return warp_sample(sample, translation_matrix(pixels, 0.0))


def translate_y(sample: Sample, pixels: float) -> Sample:
    """Move content ``pixels`` down (up when negative); boxes follow, those pushed out are dropped."""
    if pixels == 0:
        return sample
    return warp_sample(sample, translation_matrix(0.0, pixels))


def rotate(sample: Sample, degrees: float) -> Sample:
    """Rotate ``degrees`` counter-clockwise about the centre, same image size; boxes enclose their rotated corners."""
    if degrees == 0:
        return sample
    return warp_sample(sample, rotation_matrix(degrees, sample.image.shape[:2]))


# --------------------------------------------------------------------------------------------------------------------
# Ops of the detection policy that need a random place: the place is an argument, drawn by the policy


def cutout(sample: Sample, half_size: int, centre_xy: tuple[int, int]) -> Sample:
    """Fill the square of side ``2 * half_size`` centred on pixel ``centre_xy`` (clipped to the image) with
    ``PAD_VALUE``. Boxes are unchanged, as in the v0 policy's source (an object may be partly hidden)."""
    height, width = sample.image.shape[:2]
    centre_x, centre_y = centre_xy
    left, right = max(0, centre_x - half_size), min(width, centre_x + half_size)
    top, bottom = max(0, centre_y - half_size), min(height, centre_y + half_size)
    if right <= left or bottom <= top:
        return sample
    image = sample.image.copy()
    image[top:bottom, left:right] = PAD_VALUE
    return Sample(image, sample.boxes_xyxy, sample.classes)


def box_pixel_region(box_xyxy: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the whole pixels a box touches, clipped to an image of ``shape``; exclusive end."""
    height, width = shape
    left, top = max(0, math.floor(box_xyxy[0])), max(0, math.floor(box_xyxy[1]))
    right, bottom = min(width, math.ceil(box_xyxy[2])), min(height, math.ceil(box_xyxy[3]))
    return left, top, right, bottom


def translate_y_only_boxes(sample: Sample, pixels: float, order: Sequence[int]) -> Sample:
    """Inside each box listed in ``order`` (indices, applied in that order), shift the content ``pixels`` down (up
    when negative, rounded) within the box; rows left empty are filled with ``PAD_VALUE``. Pixels outside the
    boxes and the boxes themselves are unchanged. Later boxes see the result of earlier ones where they overlap."""
    shift = round(pixels)
    if shift == 0 or len(order) == 0:
        return sample
    image = sample.image.copy()
    for index in order:
        left, top, right, bottom = box_pixel_region(sample.boxes_xyxy[index], image.shape[:2])
        if right <= left or bottom <= top:
            continue
        region = image[top:bottom, left:right]
        content = region.copy()
        region[:] = PAD_VALUE
        rows = bottom - top
        if abs(shift) >= rows:
            continue
        if shift > 0:
            region[shift:] = content[: rows - shift]
        else:
            region[: rows + shift] = content[-shift:]
    return Sample(image, sample.boxes_xyxy, sample.classes)


# --------------------------------------------------------------------------------------------------------------------
# The op table of TrivialAugment and RandAugment

OPS: dict[str, Op] = {
    "Identity": identity,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
    "Brightness": brightness,
    "Color": color,
    "Contrast": contrast,
    "Sharpness": sharpness,
    "Posterize": posterize,
    "Solarize": solarize,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
}
"""Op name -> pure function ``(sample, argument) -> Sample``. Arguments are in the op's own unit: shear factor,
pixels for translations, degrees, enhancement factor (1 = unchanged), bits, threshold; the policies convert their
magnitudes with :func:`op_argument`. Policies look ops up here on every call."""


class OpRange(NamedTuple):
    """An op's magnitude at bin 0 (``low``) and at the last bin (``high``), linear between; ``signed`` ops get a
    random sign. Units as in the module docstring (translations: fraction of the image side)."""

    low: float
    high: float
    signed: bool


_ENHANCE_OPS = ("Brightness", "Color", "Contrast", "Sharpness")

TRIVIAL_AUGMENT_WIDE_RANGES: dict[str, OpRange] = {
    "Identity": OpRange(0.0, 0.0, False),
    "ShearX": OpRange(0.0, 0.99, True),
    "ShearY": OpRange(0.0, 0.99, True),
    "TranslateX": OpRange(0.0, 32 / 224, True),  # TrivialAugment's 32 px at ImageNet's 224 px
    "TranslateY": OpRange(0.0, 32 / 224, True),
    "Rotate": OpRange(0.0, 135.0, True),
    **{name: OpRange(0.0, 0.99, True) for name in _ENHANCE_OPS},
    "Posterize": OpRange(8.0, 2.0, False),
    "Solarize": OpRange(256.0, 0.0, False),
    "AutoContrast": OpRange(0.0, 0.0, False),
    "Equalize": OpRange(0.0, 0.0, False),
}

RAND_AUGMENT_RANGES: dict[str, OpRange] = {
    **TRIVIAL_AUGMENT_WIDE_RANGES,
    "ShearX": OpRange(0.0, 0.3, True),
    "ShearY": OpRange(0.0, 0.3, True),
    "TranslateX": OpRange(0.0, 150 / 331, True),  # RandAugment's 150 px at its 331 px images
    "TranslateY": OpRange(0.0, 150 / 331, True),
    "Rotate": OpRange(0.0, 30.0, True),
    **{name: OpRange(0.0, 0.9, True) for name in _ENHANCE_OPS},
    "Posterize": OpRange(8.0, 4.0, False),
}

NUM_MAGNITUDE_BINS = 31  # bins 0..30, as torchvision's TrivialAugmentWide and RandAugment

TRIVIAL_AUGMENT_OPS = tuple(TRIVIAL_AUGMENT_WIDE_RANGES)
RAND_AUGMENT_OPS = tuple(RAND_AUGMENT_RANGES)


def magnitude_at(op_range: OpRange, magnitude_bin: int, num_bins: int = NUM_MAGNITUDE_BINS) -> float:
    """The unsigned magnitude of bin ``magnitude_bin`` (0 .. num_bins - 1), linear from ``low`` to ``high``."""
    return op_range.low + (op_range.high - op_range.low) * magnitude_bin / (num_bins - 1)


def op_argument(name: str, magnitude: float, shape: tuple[int, int]) -> float:
    """A policy magnitude (signed where the op is) -> the argument of ``OPS[name]`` for an image of ``shape``."""
    if name in _ENHANCE_OPS:
        return 1.0 + magnitude
    if name == "TranslateX":
        return magnitude * shape[1]
    if name == "TranslateY":
        return magnitude * shape[0]
    return magnitude


def _apply_binned_op(
    sample: Sample, name: str, ranges: Mapping[str, OpRange], magnitude_bin: int, rng: np.random.Generator
) -> Sample:
    op_range = ranges[name]
    magnitude = magnitude_at(op_range, magnitude_bin)
    if op_range.signed and rng.random() < 0.5:
        magnitude = -magnitude
    return OPS[name](sample, op_argument(name, magnitude, sample.image.shape[:2]))


def _check_op_names(ops: Sequence[str], ranges: Mapping[str, OpRange]) -> tuple[str, ...]:
    unknown = [name for name in ops if name not in ranges]
    if unknown or not ops:
        raise ValueError(f"unknown or no ops {unknown or list(ops)}; known: {list(ranges)}")
    return tuple(ops)


class TrivialAugmentWide:
    """TrivialAugment-Wide: one op per image, uniform over ``ops``, at a uniform magnitude bin 0..30 of the op's
    wide range (:data:`TRIVIAL_AUGMENT_WIDE_RANGES`), random sign for signed ops."""

    def __init__(self, ops: Sequence[str] = TRIVIAL_AUGMENT_OPS) -> None:
        self.ops = _check_op_names(ops, TRIVIAL_AUGMENT_WIDE_RANGES)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        name = self.ops[int(rng.integers(len(self.ops)))]
        magnitude_bin = int(rng.integers(NUM_MAGNITUDE_BINS))
        return _apply_binned_op(sample, name, TRIVIAL_AUGMENT_WIDE_RANGES, magnitude_bin, rng)

    def __repr__(self) -> str:
        return f"TrivialAugmentWide(ops={len(self.ops)}, bins={NUM_MAGNITUDE_BINS})"


class RandAugment:
    """RandAugment: ``num_ops`` ops chosen uniformly with replacement from ``ops``, applied in turn, each at the
    fixed bin ``magnitude`` (0..30) of :data:`RAND_AUGMENT_RANGES`, random sign for signed ops."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, ops: Sequence[str] = RAND_AUGMENT_OPS) -> None:
        if num_ops < 1 or not 0 <= magnitude < NUM_MAGNITUDE_BINS:
            raise ValueError(
                f"RandAugment needs num_ops >= 1 and magnitude in 0-{NUM_MAGNITUDE_BINS - 1}, "
                f"got num_ops={num_ops}, magnitude={magnitude}"
            )
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.ops = _check_op_names(ops, RAND_AUGMENT_RANGES)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for _ in range(self.num_ops):
            name = self.ops[int(rng.integers(len(self.ops)))]
            sample = _apply_binned_op(sample, name, RAND_AUGMENT_RANGES, self.magnitude, rng)
        return sample

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}/{NUM_MAGNITUDE_BINS - 1})"


# --------------------------------------------------------------------------------------------------------------------
# The learned detection policy v0

# (op, probability, level 0-10) pairs: policy_v0() of tensorflow/tpu models/official/detection/utils/
# autoaugment_utils.py, the policy behind the results of Zoph et al. 2019.
DETECTION_POLICY_V0: tuple[tuple[tuple[str, float, int], ...], ...] = (
    (("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10)),
    (("TranslateY_Only_BBoxes", 0.2, 2), ("Cutout", 0.8, 8)),
    (("Sharpness", 0.0, 8), ("ShearX_BBox", 0.4, 0)),
    (("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6)),
    (("Rotate_BBox", 0.6, 10), ("Color", 1.0, 6)),
)

MAX_LEVEL = 10  # levels of the detection policies run 0..10
V0_REFERENCE_SIDE = 640  # the long side the source's pixel constants were chosen for (COCO images)
# The source's hyperparameters (translate_const, translate_bbox_const, cutout_const), in pixels at the reference side.
V0_TRANSLATE_PIXELS = 250.0
V0_TRANSLATE_BOX_PIXELS = 120.0
V0_CUTOUT_PIXELS = 100.0
# A bbox-only op hits each box with a third of its probability: the source's _scale_bbox_only_op_probability, so
# that crowded images do not get every object distorted.
V0_BOX_PROBABILITY_SCALE = 1 / 3

_V0_OPS = (
    "TranslateX_BBox",
    "TranslateY_BBox",
    "ShearX_BBox",
    "ShearY_BBox",
    "Rotate_BBox",
    "TranslateY_Only_BBoxes",
    "Cutout",
    *_ENHANCE_OPS,
    "Equalize",
    "AutoContrast",
    "Posterize",
    "Solarize",
)


def _v0_apply(sample: Sample, name: str, probability: float, level: int, rng: np.random.Generator) -> Sample:
    """One op of a detection sub-policy: applied with ``probability`` (bbox-only ops: per box, a third of it)."""
    applied = rng.random() < probability
    fraction = level / MAX_LEVEL
    height, width = sample.image.shape[:2]
    scale = max(height, width) / V0_REFERENCE_SIDE
    sign = -1.0 if rng.random() < 0.5 else 1.0  # drawn always, so each op uses a fixed number of draws
    if name == "TranslateY_Only_BBoxes":  # always runs: its probability is drawn per box instead (source's rule)
        chosen = rng.random(len(sample.classes)) < probability * V0_BOX_PROBABILITY_SCALE
        order = [int(i) for i in rng.permutation(len(sample.classes)) if chosen[i]]
        return translate_y_only_boxes(sample, sign * fraction * V0_TRANSLATE_BOX_PIXELS * scale, order)
    if not applied:
        return sample
    if name == "Cutout":
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        return cutout(sample, int(fraction * V0_CUTOUT_PIXELS * scale), centre)
    if name == "TranslateX_BBox":
        return translate_x(sample, sign * fraction * V0_TRANSLATE_PIXELS * scale)
    if name == "TranslateY_BBox":
        return translate_y(sample, sign * fraction * V0_TRANSLATE_PIXELS * scale)
    if name in ("ShearX_BBox", "ShearY_BBox"):
        shear = shear_x if name == "ShearX_BBox" else shear_y
        return shear(sample, sign * fraction * 0.3)
    if name == "Rotate_BBox":
        return rotate(sample, sign * fraction * 30.0)
    if name in _ENHANCE_OPS:
        return OPS[name](sample, 0.1 + 1.8 * fraction)  # unsigned in the source: factor 0.1 to 1.9
    if name == "Posterize":
        return posterize(sample, int(fraction * 4))
    if name == "Solarize":
        return solarize(sample, int(fraction * 256))
    return OPS[name](sample, 0.0)  # Equalize, AutoContrast


class DetectionPolicyV0:
    """Zoph et al. 2019's learned detection policy: one sub-policy uniformly per image, then each of its ops with its
    probability at its level (0-10). ``sub_policies`` defaults to :data:`DETECTION_POLICY_V0`; other lists of
    (op, probability, level) tuples may use the ops in ``_V0_OPS`` (e.g. for tests)."""

    def __init__(self, sub_policies: Sequence[Sequence[tuple[str, float, int]]] = DETECTION_POLICY_V0) -> None:
        for sub_policy in sub_policies:
            for name, probability, level in sub_policy:
                if name not in _V0_OPS or not 0 <= probability <= 1 or not 0 <= level <= MAX_LEVEL:
                    raise ValueError(
                        f"bad detection policy op ({name!r}, {probability}, {level}): expected an op of {_V0_OPS}, "
                        f"a probability in [0, 1] and a level in 0-{MAX_LEVEL}"
                    )
        if not sub_policies:
            raise ValueError("a detection policy needs at least one sub-policy")
        self.sub_policies = tuple(tuple(sub_policy) for sub_policy in sub_policies)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sub_policy = self.sub_policies[int(rng.integers(len(self.sub_policies)))]
        for name, probability, level in sub_policy:
            sample = _v0_apply(sample, name, probability, level, rng)
        return sample

    def __repr__(self) -> str:
        return f"DetectionPolicyV0(sub_policies={len(self.sub_policies)})"


# --------------------------------------------------------------------------------------------------------------------
# Names, as given to --auto-augment

AUTO_AUGMENT_POLICIES = ("trivial", "randaugment", "detection-v0")
_RANDAUGMENT_PATTERN = re.compile(r"randaugment-n(\d+)-m(\d+)")
_VALID_FORMS = (
    f"trivial, randaugment, randaugment-nN-mM (N >= 1 ops, M a magnitude bin 0-{NUM_MAGNITUDE_BINS - 1}), detection-v0"
)


def parse_auto_augment(name: str) -> tuple[str, dict[str, Any]]:
    """``--auto-augment`` value -> (policy name from :data:`AUTO_AUGMENT_POLICIES`, constructor keyword arguments).

    ``randaugment-n3-m12`` gives ``("randaugment", {"num_ops": 3, "magnitude": 12})``; plain ``randaugment`` uses the
    defaults N=2, M=9. Raises :class:`ConfigError` (one line, naming the value and the valid forms) otherwise.
    """
    if name in ("trivial", "detection-v0"):
        return name, {}
    if name == "randaugment":
        return name, {"num_ops": 2, "magnitude": 9}
    match = _RANDAUGMENT_PATTERN.fullmatch(name)
    if match:
        num_ops, magnitude = int(match.group(1)), int(match.group(2))
        if num_ops >= 1 and magnitude < NUM_MAGNITUDE_BINS:
            return "randaugment", {"num_ops": num_ops, "magnitude": magnitude}
    raise ConfigError(f"--auto-augment {name!r}: not a policy; expected one of {_VALID_FORMS}")


def check_auto_augment(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a valid ``--auto-augment`` value (:func:`parse_auto_augment`)."""
    parse_auto_augment(name)


def build_auto_augment(name: str) -> Transform:
    """The policy transform for an ``--auto-augment`` value, e.g. ``build_auto_augment("randaugment-n3-m12")``."""
    policy, kwargs = parse_auto_augment(name)
    if policy == "trivial":
        return TrivialAugmentWide(**kwargs)
    if policy == "randaugment":
        return RandAugment(**kwargs)
    return DetectionPolicyV0(**kwargs)


__all__ = [
    "AUTO_AUGMENT_POLICIES",
    "DETECTION_POLICY_V0",
    "NUM_MAGNITUDE_BINS",
    "OPS",
    "RAND_AUGMENT_OPS",
    "RAND_AUGMENT_RANGES",
    "TRIVIAL_AUGMENT_OPS",
    "TRIVIAL_AUGMENT_WIDE_RANGES",
    "DetectionPolicyV0",
    "OpRange",
    "RandAugment",
    "TrivialAugmentWide",
    "autocontrast",
    "box_pixel_region",
    "brightness",
    "build_auto_augment",
    "check_auto_augment",
    "color",
    "contrast",
    "cutout",
    "equalize",
    "identity",
    "magnitude_at",
    "op_argument",
    "parse_auto_augment",
    "posterize",
    "rotate",
    "rotation_matrix",
    "sharpness",
    "shear_matrix",
    "shear_x",
    "shear_y",
    "solarize",
    "translate_x",
    "translate_y",
    "translate_y_only_boxes",
    "translation_matrix",
    "warp_sample",
]
