"""Image + box transforms for training, and the letterbox shared with prediction.

Every transform is a small class with ``__call__(sample, rng) -> Sample``: it takes a :class:`Sample` and an
explicit ``np.random.Generator`` and returns a new Sample, so a seed reproduces the augmentation exactly and a
transform can be tested alone. The training order is written once, in :func:`build_train_transforms`:

    mosaic (4 or 9 images) -> copy-paste -> random perspective -> auto-augment policy -> mixup -> cutmix -> cutout
    -> gridmask -> albumentations -> HSV -> flips

Adding an augmentation is one new class here plus one line in that function. Steps that need other images
(mosaic, copy-paste, mixup, cutmix) receive a :class:`SampleSource` and draw their own extra indices.

Images are OpenCV's (H, W, 3) uint8 BGR arrays all the way through; boxes are xyxy pixels of that image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import cv2
import numpy as np

from detector.config import Hyperparameters

LOGGER = logging.getLogger(__name__)

PAD_VALUE = 114  # grey fill of letterbox/mosaic borders, YOLOv5's value (pretrained weights saw it)


@dataclass(frozen=True)
class Sample:
    """One training example on its way through the transforms.

    image: (H, W, 3) uint8 BGR. boxes_xyxy: (N, 4) float32 pixel corners in ``image``. classes: (N,) int64.
    """

    image: np.ndarray
    boxes_xyxy: np.ndarray
    classes: np.ndarray

    @staticmethod
    def create(image: np.ndarray, boxes_xyxy: np.ndarray | None = None, classes: np.ndarray | None = None) -> Sample:
        """A Sample with boxes/classes coerced to (N, 4) float32 and (N,) int64 (empty when None)."""
        boxes = np.zeros((0, 4), np.float32) if boxes_xyxy is None else np.asarray(boxes_xyxy, np.float32)
        labels = np.zeros(0, np.int64) if classes is None else np.asarray(classes, np.int64)
        return Sample(image, boxes.reshape(-1, 4), labels.reshape(-1))


class SampleSource(Protocol):
    """Where mosaic, copy-paste and mixup fetch their extra images: a dataset's image store."""

    def __len__(self) -> int: ...

    def load_sample(self, index: int) -> Sample:
        """Image ``index`` resized so its long side is the training size, with its boxes in pixels."""
        ...

    def load_polygons(self, index: int) -> list[np.ndarray | None]:
        """For each box of ``load_sample(index)``, its object's outline as (k, 2) float32 xy normalised to 0-1,
        or None when the label is a plain box."""
        ...


class Transform(Protocol):
    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample: ...


# --------------------------------------------------------------------------------------------------------------------
# Letterbox: a pure function, also used by the predictor


class Letterbox(NamedTuple):
    """How an image was letterboxed: ``new = old * ratio + pad``."""

    ratio: tuple[float, float]  # (height, width) scale factors; equal unless scale_fill
    pad: tuple[float, float]  # (left, top) padding in pixels


def letterbox(
    image: np.ndarray,
    new_shape: int | tuple[int, int],
    *,
    stride: int = 32,
    auto: bool = False,
    scale_fill: bool = False,
    scaleup: bool = True,
    color: tuple[int, int, int] = (PAD_VALUE, PAD_VALUE, PAD_VALUE),
    interpolation: int = cv2.INTER_LINEAR,
) -> tuple[np.ndarray, Letterbox]:
    """Resize ``image`` (H, W, C) keeping its aspect ratio and pad it to ``new_shape`` (height, width).

    Modes: ``auto`` pads only up to the next multiple of ``stride`` (smallest rectangle, for inference);
    ``scale_fill`` stretches to exactly ``new_shape`` with no padding (aspect ratio not kept);
    ``scaleup=False`` never enlarges (only shrinks), as validation does to avoid inventing detail.
    Padding is split evenly between both sides (the extra odd pixel goes right/bottom). Boxes map as
    ``x_new = x_old * ratio_w + pad_left``; :func:`detector.ops.boxes.scale_boxes` with
    ``ratio_pad=(ratio, pad)`` inverts it.
    """
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    height, width = image.shape[:2]
    target_h, target_w = new_shape
    if scale_fill:
        resized_w, resized_h = target_w, target_h
        ratio = (target_h / height, target_w / width)
    else:
        scale = min(target_h / height, target_w / width)
        if not scaleup:
            scale = min(scale, 1.0)
        resized_w, resized_h = round(width * scale), round(height * scale)
        ratio = (scale, scale)
    pad_w, pad_h = target_w - resized_w, target_h - resized_h
    if auto and not scale_fill:
        pad_w, pad_h = pad_w % stride, pad_h % stride
    if (resized_w, resized_h) != (width, height):
        image = cv2.resize(image, (resized_w, resized_h), interpolation=interpolation)
    left, top = pad_w // 2, pad_h // 2
    if pad_w or pad_h:
        image = cv2.copyMakeBorder(
            image, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=color[: image.shape[2]]
        )
    return image, Letterbox(ratio, (float(left), float(top)))


def letterbox_sample(sample: Sample, new_shape: tuple[int, int], *, scaleup: bool) -> tuple[Sample, Letterbox]:
    """:func:`letterbox` applied to a Sample's image and boxes (the deterministic step of val/rect loading)."""
    image, info = letterbox(sample.image, new_shape, scaleup=scaleup)
    boxes = sample.boxes_xyxy.copy()
    boxes[:, 0::2] = boxes[:, 0::2] * info.ratio[1] + info.pad[0]
    boxes[:, 1::2] = boxes[:, 1::2] * info.ratio[0] + info.pad[1]
    return Sample(image, boxes, sample.classes), info


def _load_donor(source: SampleSource, index: int, shape: tuple[int, int], *, rect: bool) -> Sample:
    """Image ``index`` of ``source`` for a mixing step: as stored (square training, where the geometry step fixes
    the shape) or, under rectangular training, letterboxed to ``shape`` (height, width), the sample's own."""
    donor = source.load_sample(index)
    if not rect:
        return donor
    # scaleup=True as the dataset letterboxes augmented rect samples: the donor's objects get the sample's scale.
    return letterbox_sample(donor, shape, scaleup=True)[0]


# --------------------------------------------------------------------------------------------------------------------
# Composition


class Compose:
    """Apply transforms in order. ``steps`` is public so a run can log (or a test can check) the order."""

    def __init__(self, steps: Sequence[Transform]) -> None:
        self.steps = list(steps)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for step in self.steps:
            sample = step(sample, rng)
        return sample

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"  {step!r},\n" for step in self.steps) + ")"


def build_train_transforms(
    hyp: Hyperparameters,
    imgsz: int,
    source: SampleSource | None = None,
    *,
    rect: bool = False,
    auto_augment: str = "",
) -> Compose:
    """The training augmentation, in order, driven by YOLOv5's hyperparameter keys.

    Square training (``rect=False``): samples arrive resized (long side ``imgsz``) and leave ``imgsz`` square;
    mosaic builds a 2x canvas and the perspective step crops it back. Rectangular batches (``rect=True``): samples
    arrive already letterboxed to their batch shape, which every step keeps; mosaic is off (it would change the
    shape), and the mixing steps letterbox each image they draw from ``source`` to the sample's shape first.
    Steps that draw other images (mosaic, copy-paste, mixup, cutmix) exist only with a ``source``.
    ``auto_augment`` names a policy of :func:`detector.data.policies.build_auto_augment` ("" = none), applied
    after the geometry so that it sees the final framing.
    """
    output_shape = None if rect else (imgsz, imgsz)
    mosaic = source is not None and not rect and hyp.mosaic > 0
    mixing = source is not None
    geometry = Compose(
        [
            *([Mosaic(source, imgsz, hyp.mosaic, hyp.mosaic9)] if mosaic else []),
            *([CopyPaste(source, hyp.copy_paste, rect=rect)] if mixing and hyp.copy_paste > 0 else []),
            RandomPerspective(
                output_shape,
                degrees=hyp.degrees,
                translate=hyp.translate,
                scale=hyp.scale,
                shear=hyp.shear,
                perspective=hyp.perspective,
            ),
        ]
    )
    policy: list[Transform] = []
    if auto_augment:
        # Imported here: only a run that asks for a policy loads the policies module.
        from detector.data.policies import build_auto_augment

        policy.append(build_auto_augment(auto_augment))
    return Compose(
        [
            geometry,
            *policy,
            *([MixUp(source, geometry, hyp.mixup, rect=rect)] if mixing and hyp.mixup > 0 else []),
            *(
                [CutMix(source, geometry, hyp.cutmix, hyp.min_visibility, rect=rect)]
                if mixing and hyp.cutmix > 0
                else []
            ),
            *([Cutout(hyp.cutout)] if hyp.cutout > 0 else []),
            *([GridMask(hyp.gridmask, hyp.min_visibility)] if hyp.gridmask > 0 else []),
            *([Albumentations(hyp.albumentations)] if hyp.albumentations > 0 else []),
            RandomHSV(hyp.hsv_h, hyp.hsv_s, hyp.hsv_v),
            RandomFlip("vertical", hyp.flipud),
            RandomFlip("horizontal", hyp.fliplr),
        ]
    )


# --------------------------------------------------------------------------------------------------------------------
# Mosaic


def mosaic4(
    images: Sequence[np.ndarray],
    boxes_xyxy: Sequence[np.ndarray],
    classes: Sequence[np.ndarray],
    *,
    size: int,
    center: tuple[int, int],
) -> Sample:
    """Deterministic 4-image mosaic on a (2*size, 2*size) canvas around ``center`` (x, y).

    Image 0 ends at the centre from the top-left, 1 from the top-right, 2 from the bottom-left, 3 from the
    bottom-right; parts beyond the canvas are cut off and boxes are shifted and clipped to what stays visible.
    Each image must be at most ``size`` on each side, so the four never overlap.
    """
    # Only the border around the four pictures is painted grey: filling the whole canvas first would write
    # every pixel twice (a tenth of the loader's time at --img 640).
    canvas = np.empty((2 * size, 2 * size, 3), np.uint8)
    center_x, center_y = center
    all_boxes, all_classes = [], []
    for position, (image, boxes, labels) in enumerate(zip(images, boxes_xyxy, classes, strict=True)):
        height, width = image.shape[:2]
        # Top-left corner of this image on the canvas (may be negative: that part is cut off).
        x0 = center_x - width if position in (0, 2) else center_x
        y0 = center_y - height if position in (0, 1) else center_y
        all_boxes.append(_paste(canvas, image, x0, y0, boxes))
        all_classes.append(labels)
        quadrant_x = (0, center_x) if position in (0, 2) else (center_x, 2 * size)
        quadrant_y = (0, center_y) if position in (0, 1) else (center_y, 2 * size)
        _fill_around(canvas, quadrant_x, quadrant_y, (x0, x0 + width), (y0, y0 + height))
    return _clipped_sample(canvas, all_boxes, all_classes)


def _fill_around(
    canvas: np.ndarray,
    quadrant_x: tuple[int, int],
    quadrant_y: tuple[int, int],
    picture_x: tuple[int, int],
    picture_y: tuple[int, int],
) -> None:
    """Paint the part of a canvas region (quadrant) not covered by a picture grey: up to four bands."""
    left, right = (min(max(v, quadrant_x[0]), quadrant_x[1]) for v in picture_x)
    top, bottom = (min(max(v, quadrant_y[0]), quadrant_y[1]) for v in picture_y)
    if right <= left or bottom <= top:  # the picture misses the quadrant: paint all of it
        left = right = quadrant_x[0]
        top = bottom = quadrant_y[0]
    canvas[quadrant_y[0] : top, quadrant_x[0] : quadrant_x[1]] = PAD_VALUE
    canvas[bottom : quadrant_y[1], quadrant_x[0] : quadrant_x[1]] = PAD_VALUE
    canvas[top:bottom, quadrant_x[0] : left] = PAD_VALUE
    canvas[top:bottom, right : quadrant_x[1]] = PAD_VALUE


def mosaic9(
    images: Sequence[np.ndarray],
    boxes_xyxy: Sequence[np.ndarray],
    classes: Sequence[np.ndarray],
    *,
    size: int,
    offset: tuple[int, int],
) -> Sample:
    """Deterministic 9-image mosaic: a 3x3 grid of ``size`` cells, cropped to (2*size, 2*size) at ``offset`` (x, y).

    Image 0 sits in the centre cell, the others fill the cells row by row; each image is pushed towards the
    centre of the grid so the pictures touch. ``offset`` must lie in [0, size] on both axes.
    """
    grid = np.full((3 * size, 3 * size, 3), PAD_VALUE, np.uint8)
    cells = [(1, 1), (0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]  # (row, column), centre first
    all_boxes, all_classes = [], []
    for (row, column), image, boxes, labels in zip(cells, images, boxes_xyxy, classes, strict=True):
        height, width = image.shape[:2]
        x0 = column * size + _toward_centre(column, size - width)
        y0 = row * size + _toward_centre(row, size - height)
        all_boxes.append(_paste(grid, image, x0, y0, boxes))
        all_classes.append(labels)
    offset_x, offset_y = offset
    canvas = grid[offset_y : offset_y + 2 * size, offset_x : offset_x + 2 * size]
    shifted = [b - np.array([offset_x, offset_y, offset_x, offset_y], np.float32) for b in all_boxes]
    return _clipped_sample(np.ascontiguousarray(canvas), shifted, all_classes)


def _toward_centre(cell: int, spare: int) -> int:
    """Offset inside a grid cell: flush right/bottom in the first cell, centred in the middle, flush left/top last."""
    return (spare, spare // 2, 0)[cell]


def _paste(canvas: np.ndarray, image: np.ndarray, x0: int, y0: int, boxes: np.ndarray) -> np.ndarray:
    """Copy ``image`` onto ``canvas`` with its top-left at (x0, y0), cutting what falls outside; returns moved boxes."""
    height, width = image.shape[:2]
    canvas_h, canvas_w = canvas.shape[:2]
    left, top = max(x0, 0), max(y0, 0)
    right, bottom = min(x0 + width, canvas_w), min(y0 + height, canvas_h)
    if right > left and bottom > top:
        canvas[top:bottom, left:right] = image[top - y0 : bottom - y0, left - x0 : right - x0]
    return boxes + np.array([x0, y0, x0, y0], np.float32)


def _clipped_sample(canvas: np.ndarray, boxes: list[np.ndarray], classes: list[np.ndarray]) -> Sample:
    boxes_xyxy = np.concatenate(boxes).reshape(-1, 4).astype(np.float32)
    labels = np.concatenate(classes).astype(np.int64)
    height, width = canvas.shape[:2]
    np.clip(boxes_xyxy[:, 0::2], 0, width, out=boxes_xyxy[:, 0::2])
    np.clip(boxes_xyxy[:, 1::2], 0, height, out=boxes_xyxy[:, 1::2])
    visible = (boxes_xyxy[:, 2] > boxes_xyxy[:, 0]) & (boxes_xyxy[:, 3] > boxes_xyxy[:, 1])
    return Sample(canvas, boxes_xyxy[visible], labels[visible])


class Mosaic:
    """With probability ``probability``, the sample plus 3 (or 8) random others from ``source`` as one mosaic.

    A dataset-level step: it draws its own extra indices. Output is a (2*size, 2*size) canvas that
    :class:`RandomPerspective` crops back to ``size``; a sample not chosen for a mosaic passes unchanged.
    ``nine_probability`` is the chance that a mosaic uses 9 images instead of 4.
    """

    def __init__(self, source: SampleSource, size: int, probability: float, nine_probability: float = 0.0) -> None:
        self.source = source
        self.size = size
        self.probability = probability
        self.nine_probability = nine_probability

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.probability <= 0 or rng.random() >= self.probability:
            return sample
        nine = self.nine_probability > 0 and rng.random() < self.nine_probability
        extra = rng.integers(0, len(self.source), size=8 if nine else 3)
        samples = [sample, *(self.source.load_sample(int(i)) for i in extra)]
        images = [s.image for s in samples]
        boxes = [s.boxes_xyxy for s in samples]
        classes = [s.classes for s in samples]
        if nine:
            offset = tuple(int(v) for v in rng.integers(0, self.size + 1, size=2))
            return mosaic9(images, boxes, classes, size=self.size, offset=offset)
        # The centre stays in the middle half of the canvas so every quadrant keeps some of its image.
        center = tuple(int(v) for v in rng.integers(self.size // 2, 3 * self.size // 2 + 1, size=2))
        return mosaic4(images, boxes, classes, size=self.size, center=center)

    def __repr__(self) -> str:
        return f"Mosaic(p={self.probability}, p9={self.nine_probability}, size={self.size})"


# --------------------------------------------------------------------------------------------------------------------
# Copy-paste

# A paste is refused when it would bring the part of an existing box covered by pasted boxes above this fraction of
# the box's area (YOLOv5 refuses a paste whose box covers over 0.30 of one): an object hidden that much is no longer
# a fair training target, yet its label would stay.
COPY_PASTE_MAX_COVERED = 0.30


@dataclass(frozen=True)
class PasteObject:
    """One object cut out of a donor image: the pixels of its box, its outline mask and its box in those pixels."""

    patch: np.ndarray  # (h, w, 3) uint8 BGR: the donor's pixels under the box, rounded out to whole pixels
    mask: np.ndarray | None  # (h, w) bool: the pixels inside the object's polygon; None for a box label (all)
    box_xyxy: np.ndarray  # (4,) float32 the object's box in patch pixels
    class_id: int


def polygon_mask(points_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(height, width) bool mask of the pixels whose centre lies inside a polygon (even-odd rule).

    ``points_xy`` (k, 2) are the vertices in pixel-edge coordinates (pixel (i, j) spans x in [i, i + 1]), so a
    rectangle with corners (2, 2) and (6, 6) covers exactly pixels 2..5 on both axes, like the box it labels.
    A centre exactly on a right or bottom edge is outside. Vectorised scan lines: each edge that crosses a row's
    centre line toggles the inside state from the first pixel centre at or right of the crossing.
    """
    height, width = shape
    start = np.asarray(points_xy, np.float64).reshape(-1, 2)
    end = np.roll(start, -1, axis=0)
    centre_y = np.arange(height, dtype=np.float64)[:, None] + 0.5
    crosses = (start[:, 1] <= centre_y) != (end[:, 1] <= centre_y)  # (height, edges); horizontal edges never do
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing_x = start[:, 0] + (centre_y - start[:, 1]) * (end[:, 0] - start[:, 0]) / (end[:, 1] - start[:, 1])
    rows, edges = np.nonzero(crosses)
    columns = np.clip(np.ceil(crossing_x[rows, edges] - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((height, width + 1), np.int32)
    np.add.at(toggles, (rows, columns), 1)
    return (np.cumsum(toggles[:, :width], axis=1) % 2).astype(bool)


def cut_objects(donor: Sample, polygons_xyn: Sequence[np.ndarray | None]) -> list[PasteObject]:
    """The objects of ``donor`` ready to paste: by polygon mask where ``polygons_xyn[i]`` is an outline (k >= 3
    points, normalised to the donor image), else by their box. Boxes under 2 px on a side are left out."""
    height, width = donor.image.shape[:2]
    objects = []
    for box, class_id, polygon in zip(donor.boxes_xyxy, donor.classes, polygons_xyn, strict=True):
        left, top = max(math.floor(box[0]), 0), max(math.floor(box[1]), 0)
        right, bottom = min(math.ceil(box[2]), width), min(math.ceil(box[3]), height)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2 or right <= left or bottom <= top:
            continue
        mask = None
        if polygon is not None and len(polygon) >= 3:
            points = polygon * np.array([width, height], np.float32) - np.array([left, top], np.float32)
            mask = polygon_mask(points, (bottom - top, right - left))
        shift = np.array([left, top, left, top], np.float32)
        objects.append(PasteObject(donor.image[top:bottom, left:right], mask, box - shift, int(class_id)))
    return objects


def paste_objects(
    sample: Sample,
    objects: Sequence[PasteObject],
    positions: Sequence[tuple[int, int]],
    *,
    max_covered: float = COPY_PASTE_MAX_COVERED,
) -> Sample:
    """Deterministic paste: object i's patch goes with its top-left at ``positions[i]`` (x, y), in order.

    Only the mask's pixels are copied (the whole patch for a box label), and the object's box joins the sample's.
    Every box keeps at least ``1 - max_covered`` of its area free of pasted boxes: a paste is skipped when the
    fraction of some box already there (an original one, or an object pasted before it) covered by pasted boxes,
    this one included, would exceed ``max_covered``. Where pastes overlap each other over a box, that part counts
    once per paste, and boxes rather than masks are compared: both err towards refusing. The input image is never
    modified: a copy is made at the first accepted paste.
    """
    image = sample.image
    height, width = image.shape[:2]
    boxes, classes = sample.boxes_xyxy, sample.classes
    pasted_boxes, pasted_classes = [], []
    covered = np.zeros(len(boxes), np.float64)  # fraction of each box (originals, then pastes) under pastes
    for paste, (x, y) in zip(objects, positions, strict=True):
        patch_h, patch_w = paste.patch.shape[:2]
        if x < 0 or y < 0 or x + patch_w > width or y + patch_h > height:
            raise ValueError(f"paste at ({x}, {y}) of a {patch_w}x{patch_h} patch falls outside {width}x{height}")
        box = paste.box_xyxy + np.array([x, y, x, y], np.float32)
        # float64: a paste covering exactly max_covered of a box must not be refused over float32 rounding
        existing = (np.concatenate([boxes, *pasted_boxes]) if pasted_boxes else boxes).astype(np.float64)
        areas = np.maximum((existing[:, 2] - existing[:, 0]) * (existing[:, 3] - existing[:, 1]), 1e-9)
        after = covered + _intersection_areas(existing, box.astype(np.float64)) / areas
        if (after > max_covered).any():
            continue
        covered = np.append(after, 0.0)
        if image is sample.image:
            image = image.copy()
        region = image[y : y + patch_h, x : x + patch_w]
        if paste.mask is None:
            region[:] = paste.patch
        else:
            region[paste.mask] = paste.patch[paste.mask]
        pasted_boxes.append(box[None])
        pasted_classes.append(paste.class_id)
    if not pasted_boxes:
        return sample
    return Sample(
        image,
        np.concatenate([boxes, *pasted_boxes]).astype(np.float32),
        np.concatenate([classes, np.array(pasted_classes, np.int64)]),
    )


class CopyPaste:
    """With a probability, paste the objects of another image from ``source`` at random places (copy-paste).

    Objects with polygon labels are cut out along their outline, box labels as their whole box (Ghiasi et al.,
    https://arxiv.org/abs/2012.07177, pastes masks; a box crop is the best a box label allows). Each object of
    the donor gets one random position where it fits whole, drawn from ``rng``; it is pasted unflipped, at the
    donor's scale (the same as the mosaic tiles'), unless pasted boxes would then cover more than ``max_covered``
    of some box's area (see :func:`paste_objects`). YOLOv5 instead pastes a mirrored copy of the canvas's own
    objects; drawing a donor image brings objects from outside the mosaic. Placed right after mosaic, on the
    mosaic canvas, so the perspective step then transforms original and pasted objects alike (YOLOv5's order).
    With ``rect=True`` (rectangular batches, no mosaic) the donor is first letterboxed to the sample's shape, so
    its objects have the scale of the sample's own.
    """

    def __init__(
        self,
        source: SampleSource,
        probability: float,
        max_covered: float = COPY_PASTE_MAX_COVERED,
        *,
        rect: bool = False,
    ) -> None:
        self.source = source
        self.probability = probability
        self.max_covered = max_covered
        self.rect = rect

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.probability <= 0 or rng.random() >= self.probability:
            return sample
        index = int(rng.integers(0, len(self.source)))
        donor, polygons = self.source.load_sample(index), self.source.load_polygons(index)
        height, width = sample.image.shape[:2]
        if self.rect:
            donor, polygons = _letterbox_with_polygons(donor, polygons, (height, width))
        objects = cut_objects(donor, polygons)
        fitting = [o for o in objects if o.patch.shape[0] <= height and o.patch.shape[1] <= width]
        positions = [
            (int(rng.integers(0, width - o.patch.shape[1] + 1)), int(rng.integers(0, height - o.patch.shape[0] + 1)))
            for o in fitting
        ]
        return paste_objects(sample, fitting, positions, max_covered=self.max_covered)

    def __repr__(self) -> str:
        return f"CopyPaste(p={self.probability}, max_covered={self.max_covered}, rect={self.rect})"


def _letterbox_with_polygons(
    donor: Sample, polygons_xyn: Sequence[np.ndarray | None], shape: tuple[int, int]
) -> tuple[Sample, list[np.ndarray | None]]:
    """A donor letterboxed to ``shape`` (rect training, see :func:`_load_donor`), with its normalised outlines
    moved along: they are normalised to the image, whose size and padding change."""
    height, width = donor.image.shape[:2]
    fitted, info = letterbox_sample(donor, shape, scaleup=True)
    new_h, new_w = shape
    gain = np.array([width * info.ratio[1] / new_w, height * info.ratio[0] / new_h], np.float32)
    shift = np.array([info.pad[0] / new_w, info.pad[1] / new_h], np.float32)
    moved = [None if polygon is None else (polygon * gain + shift).astype(np.float32) for polygon in polygons_xyn]
    return fitted, moved


# --------------------------------------------------------------------------------------------------------------------
# Geometry


class RandomPerspective:
    """Random rotation, scale, shear, translation and perspective; boxes follow and degenerate ones are dropped.

    The output is ``output_shape`` (height, width), or the input's shape when None. The input's centre maps to
    the output's centre before the random translation, so a mosaic canvas is cropped around its middle and a
    smaller resized image is letterboxed. A transformed box is kept when it is over 2 px wide and high, keeps
    over 10% of its (scaled) area after clipping and has an aspect ratio under 100.
    """

    def __init__(
        self,
        output_shape: tuple[int, int] | None,
        *,
        degrees: float = 0.0,
        translate: float = 0.0,
        scale: float = 0.0,
        shear: float = 0.0,
        perspective: float = 0.0,
    ) -> None:
        self.output_shape = output_shape
        self.degrees = degrees
        self.translate = translate
        self.scale = scale
        self.shear = shear
        self.perspective = perspective

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        in_h, in_w = sample.image.shape[:2]
        out_h, out_w = self.output_shape or (in_h, in_w)
        matrix, gain = self.random_matrix((in_h, in_w), (out_h, out_w), rng)
        if _is_scale_and_shift(matrix):  # YOLOv5's default hyps: no rotation, shear or perspective
            image, matrix = _scale_and_shift(sample.image, matrix, (out_h, out_w))
        elif self.perspective:
            image = cv2.warpPerspective(sample.image, matrix, (out_w, out_h), borderValue=(PAD_VALUE,) * 3)
        else:
            image = cv2.warpAffine(sample.image, matrix[:2], (out_w, out_h), borderValue=(PAD_VALUE,) * 3)
        if len(sample.classes) == 0:
            return Sample(image, sample.boxes_xyxy, sample.classes)
        boxes = transform_boxes(sample.boxes_xyxy, matrix)
        np.clip(boxes[:, 0::2], 0, out_w, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, out_h, out=boxes[:, 1::2])
        keep = box_candidates(sample.boxes_xyxy * gain, boxes)
        return Sample(image, boxes[keep], sample.classes[keep])

    def random_matrix(
        self, in_shape: tuple[int, int], out_shape: tuple[int, int], rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        """A 3x3 float32 matrix mapping input to output pixels, and its scale gain."""
        centre = np.eye(3)
        centre[0, 2], centre[1, 2] = -in_shape[1] / 2, -in_shape[0] / 2
        warp = np.eye(3)
        warp[2, 0], warp[2, 1] = rng.uniform(-self.perspective, self.perspective, size=2)
        angle = rng.uniform(-self.degrees, self.degrees)
        gain = rng.uniform(1 - self.scale, 1 + self.scale)
        rotation = np.eye(3)
        rotation[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=gain)
        shear = np.eye(3)
        shear[0, 1], shear[1, 0] = np.tan(np.radians(rng.uniform(-self.shear, self.shear, size=2)))
        translation = np.eye(3)
        fractions = rng.uniform(0.5 - self.translate, 0.5 + self.translate, size=2)
        translation[0, 2], translation[1, 2] = fractions[0] * out_shape[1], fractions[1] * out_shape[0]
        # Right to left: centre the input on the origin, then perspective, rotate+scale, shear, move into place.
        return (translation @ shear @ rotation @ warp @ centre).astype(np.float32), float(gain)

    def __repr__(self) -> str:
        return (
            f"RandomPerspective(output={self.output_shape}, degrees={self.degrees}, translate={self.translate}, "
            f"scale={self.scale}, shear={self.shear}, perspective={self.perspective})"
        )


def _is_scale_and_shift(matrix: np.ndarray) -> bool:
    """True when the matrix only scales (by positive gains) and translates: no rotation, shear or perspective."""
    return bool(
        matrix[0, 1] == 0
        and matrix[1, 0] == 0
        and matrix[0, 0] > 0
        and matrix[1, 1] > 0
        and (matrix[2] == [0, 0, 1]).all()
    )


def _scale_and_shift(
    image: np.ndarray, matrix: np.ndarray, out_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A scale-and-shift warp done as crop + resize + paste, 5x cheaper than cv2.warpAffine's per-pixel mapping.

    Only the source pixels that land in the output are resized. Sizes and offsets are rounded to whole pixels,
    so the result may differ from ``matrix`` by under a pixel; the matrix returned is the one actually applied
    (in pixel-edge coordinates, the convention of box corners), so boxes transformed with it stay exact.
    """
    out_h, out_w = out_shape
    in_h, in_w = image.shape[:2]
    gain_x, gain_y, shift_x, shift_y = (float(v) for v in (matrix[0, 0], matrix[1, 1], matrix[0, 2], matrix[1, 2]))
    x0, x1 = max(0, math.floor(-shift_x / gain_x)), min(in_w, math.ceil((out_w - shift_x) / gain_x))
    y0, y1 = max(0, math.floor(-shift_y / gain_y)), min(in_h, math.ceil((out_h - shift_y) / gain_y))
    canvas = np.full((out_h, out_w, 3), PAD_VALUE, np.uint8)
    if x1 <= x0 or y1 <= y0:  # the image moved entirely out of view
        return canvas, matrix
    width, height = max(1, round((x1 - x0) * gain_x)), max(1, round((y1 - y0) * gain_y))
    left, top = round(x0 * gain_x + shift_x), round(y0 * gain_y + shift_y)
    crop = image[y0:y1, x0:x1]
    if (width, height) != (x1 - x0, y1 - y0):
        crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
    _paste(canvas, crop, left, top, np.zeros((0, 4), np.float32))
    applied_x, applied_y = width / (x1 - x0), height / (y1 - y0)
    applied = np.array(
        [[applied_x, 0, left - x0 * applied_x], [0, applied_y, top - y0 * applied_y], [0, 0, 1]], np.float32
    )
    return canvas, applied


def transform_boxes(boxes_xyxy: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Boxes (N, 4) xyxy through a 3x3 ``matrix``: the axis-aligned box around the 4 moved corners, float32."""
    count = len(boxes_xyxy)
    corners = np.ones((count * 4, 3), np.float32)
    corners[:, :2] = boxes_xyxy[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(count * 4, 2)  # x1y1, x2y2, x1y2, x2y1
    moved = corners @ matrix.T
    moved = moved[:, :2] / moved[:, 2:3]
    xs, ys = moved[:, 0].reshape(count, 4), moved[:, 1].reshape(count, 4)
    return np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1).astype(np.float32)


def box_candidates(
    before_xyxy: np.ndarray,
    after_xyxy: np.ndarray,
    *,
    min_size: float = 2.0,
    min_area_ratio: float = 0.1,
    max_aspect: float = 100.0,
    eps: float = 1e-16,
) -> np.ndarray:
    """Boolean mask of boxes still worth training on after a transform (both (N, 4) xyxy pixels)."""
    width_before = before_xyxy[:, 2] - before_xyxy[:, 0]
    height_before = before_xyxy[:, 3] - before_xyxy[:, 1]
    width = after_xyxy[:, 2] - after_xyxy[:, 0]
    height = after_xyxy[:, 3] - after_xyxy[:, 1]
    aspect = np.maximum(width / (height + eps), height / (width + eps))
    area_ratio = width * height / (width_before * height_before + eps)
    return (width > min_size) & (height > min_size) & (area_ratio > min_area_ratio) & (aspect < max_aspect)


class RandomFlip:
    """Mirror the image and its boxes left-right (``"horizontal"``) or up-down (``"vertical"``) with a probability."""

    def __init__(self, direction: str, probability: float) -> None:
        if direction not in ("horizontal", "vertical"):
            raise ValueError(f"flip direction must be 'horizontal' or 'vertical', got {direction!r}")
        self.direction = direction
        self.probability = probability

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.probability <= 0 or rng.random() >= self.probability:
            return sample
        return flip(sample, self.direction)

    def __repr__(self) -> str:
        return f"RandomFlip({self.direction!r}, p={self.probability})"


def flip(sample: Sample, direction: str) -> Sample:
    """Deterministic mirror of a sample; flipping twice gives back the same image and boxes."""
    height, width = sample.image.shape[:2]
    boxes = sample.boxes_xyxy.copy()
    if direction == "horizontal":
        image = cv2.flip(sample.image, 1)
        boxes[:, [0, 2]] = width - sample.boxes_xyxy[:, [2, 0]]
    else:
        image = cv2.flip(sample.image, 0)
        boxes[:, [1, 3]] = height - sample.boxes_xyxy[:, [3, 1]]
    return Sample(image, boxes, sample.classes)


# --------------------------------------------------------------------------------------------------------------------
# Photometric


class RandomHSV:
    """Random hue, saturation and value gains, applied through one look-up table per channel (cv2.LUT).

    Gains are drawn in [1 - g, 1 + g] for each of ``hue``, ``saturation``, ``value``; hue wraps around
    OpenCV's 0-179 range, saturation and value are clipped to 0-255.
    """

    def __init__(self, hue: float, saturation: float, value: float) -> None:
        self.gains = np.array([hue, saturation, value], np.float64)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if not self.gains.any():
            return sample
        gains = rng.uniform(-1, 1, 3) * self.gains + 1
        levels = np.arange(256, dtype=np.float64)
        table = np.empty((1, 256, 3), np.uint8)
        table[0, :, 0] = ((levels * gains[0]) % 180).astype(np.uint8)
        table[0, :, 1] = np.clip(levels * gains[1], 0, 255).astype(np.uint8)
        table[0, :, 2] = np.clip(levels * gains[2], 0, 255).astype(np.uint8)
        hsv = cv2.cvtColor(sample.image, cv2.COLOR_BGR2HSV)
        cv2.LUT(hsv, table, dst=hsv)  # one call maps all three channels, each through its own column
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=hsv)
        return Sample(image, sample.boxes_xyxy, sample.classes)

    def __repr__(self) -> str:
        return f"RandomHSV(h={self.gains[0]}, s={self.gains[1]}, v={self.gains[2]})"


class MixUp:
    """With a probability, blend the sample with another from ``source`` that went through ``geometry`` too.

    The blend ratio is drawn from beta(32, 32) (mixup paper, https://arxiv.org/abs/1710.09412); the boxes
    of both images are kept. Both images have the same shape: in square training ``geometry`` fixes the output
    size; with ``rect=True`` the other image is letterboxed to the sample's shape before ``geometry``, which then
    keeps it.
    """

    def __init__(self, source: SampleSource, geometry: Transform, probability: float, *, rect: bool = False) -> None:
        self.source = source
        self.geometry = geometry
        self.probability = probability
        self.rect = rect

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.probability <= 0 or rng.random() >= self.probability:
            return sample
        other = _mixing_donor(self, sample, rng)
        ratio = float(rng.beta(32.0, 32.0))
        image = cv2.addWeighted(sample.image, ratio, other.image, 1 - ratio, 0.0)
        return Sample(
            image,
            np.concatenate([sample.boxes_xyxy, other.boxes_xyxy]),
            np.concatenate([sample.classes, other.classes]),
        )

    def __repr__(self) -> str:
        return f"MixUp(p={self.probability}, rect={self.rect})"


def _mixing_donor(step: MixUp | CutMix, sample: Sample, rng: np.random.Generator) -> Sample:
    """A random image of ``step.source`` through ``step.geometry``, in ``sample``'s shape (see :func:`_load_donor`)."""
    index = int(rng.integers(0, len(step.source)))
    shape = sample.image.shape[:2]
    donor = step.geometry(_load_donor(step.source, index, shape, rect=step.rect), rng)
    if donor.image.shape != sample.image.shape:
        raise ValueError(
            f"{type(step).__name__}: the other image came out {donor.image.shape}, the sample is "
            f"{sample.image.shape}; under rectangular batches build it with rect=True so the image is letterboxed "
            "to the sample's shape"
        )
    return donor


class CutMix:
    """With a probability, paste a random rectangle of another image from ``source`` into the sample (CutMix).

    Yun et al. 2019 (https://arxiv.org/abs/1905.04899) draw the rectangle's area fraction uniformly in [0, 1]
    (lambda ~ beta(1, 1)), give it the image's aspect ratio and a uniformly random centre, and clip it to the
    image; :meth:`random_region` does that in whole pixels. For detection the labels follow the pixels instead of
    a mixed class target: see :func:`cutmix`, with ``min_visibility`` deciding which partly hidden boxes stay.
    The other image goes through ``geometry`` first (mosaic, copy-paste, perspective), as in :class:`MixUp`, and
    with ``rect=True`` is letterboxed to the sample's shape before that.
    """

    def __init__(
        self,
        source: SampleSource,
        geometry: Transform,
        probability: float,
        min_visibility: float = 0.3,
        *,
        rect: bool = False,
    ) -> None:
        self.source = source
        self.geometry = geometry
        self.probability = probability
        self.min_visibility = min_visibility
        self.rect = rect

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.probability <= 0 or rng.random() >= self.probability:
            return sample
        donor = _mixing_donor(self, sample, rng)
        region = self.random_region(sample.image.shape[:2], rng)
        return cutmix(sample, donor, region, self.min_visibility)

    @staticmethod
    def random_region(shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A CutMix rectangle (x1, y1, x2, y2) in whole pixels of an image of ``shape`` (height, width)."""
        height, width = shape
        side = math.sqrt(rng.uniform(0.0, 1.0))  # area fraction uniform, so each side scales by its square root
        centre_x, centre_y = rng.uniform(0.0, width), rng.uniform(0.0, height)
        half_w, half_h = width * side / 2, height * side / 2
        x1, x2 = (min(max(round(v), 0), width) for v in (centre_x - half_w, centre_x + half_w))
        y1, y2 = (min(max(round(v), 0), height) for v in (centre_y - half_h, centre_y + half_h))
        return x1, y1, x2, y2

    def __repr__(self) -> str:
        return f"CutMix(p={self.probability}, min_visibility={self.min_visibility}, rect={self.rect})"


def cutmix(
    sample: Sample, donor: Sample, region_xyxy: tuple[int, int, int, int], min_visibility: float = 0.3
) -> Sample:
    """Deterministic CutMix: ``donor``'s pixels inside ``region_xyxy`` (whole pixels, end exclusive) replace the
    sample's, and the boxes of both follow what stays visible.

    The sample's boxes lose the part under the region: a box whose visible area is below ``min_visibility`` of its
    area is dropped; when the region cuts off one whole side of a box (it spans the box across, and the visible
    remainder is a rectangle) the box shrinks to that remainder; otherwise (a corner or a band through the middle
    hidden) the box stays as it is, since its visible part still reaches all four sides. The donor's boxes are
    clipped to the region and kept when the clipped box keeps at least ``min_visibility`` of the area. Both images
    must have the same shape; neither is modified.
    """
    if donor.image.shape != sample.image.shape:
        raise ValueError(f"cutmix: donor image {donor.image.shape} must have the sample's shape {sample.image.shape}")
    height, width = sample.image.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in region_xyxy)
    if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
        raise ValueError(
            f"cutmix: region {region_xyxy} must satisfy 0 <= x1 <= x2 <= {width}, 0 <= y1 <= y2 <= {height}"
        )
    if x2 == x1 or y2 == y1:
        return sample
    image = sample.image.copy()
    image[y1:y2, x1:x2] = donor.image[y1:y2, x1:x2]
    region = np.array([x1, y1, x2, y2], np.float64)

    # float64 and a division: a box exactly at min_visibility (e.g. 30 of 100 px at 0.3) must be kept.
    own = sample.boxes_xyxy.astype(np.float64)
    own_area = (own[:, 2] - own[:, 0]) * (own[:, 3] - own[:, 1])
    visible = own_area - _intersection_areas(own, region)
    own_keep = _fraction_at_least(visible, own_area, min_visibility)
    own = _cut_off_sides(own, region)

    theirs = donor.boxes_xyxy.astype(np.float64)
    their_area = (theirs[:, 2] - theirs[:, 0]) * (theirs[:, 3] - theirs[:, 1])
    clipped = np.concatenate([np.maximum(theirs[:, :2], region[:2]), np.minimum(theirs[:, 2:], region[2:])], axis=1)
    clipped_w, clipped_h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    their_keep = (clipped_w > 0) & (clipped_h > 0)
    their_keep &= _fraction_at_least(
        np.clip(clipped_w, 0, None) * np.clip(clipped_h, 0, None), their_area, min_visibility
    )
    return Sample(
        image,
        np.concatenate([own[own_keep], clipped[their_keep]]).astype(np.float32),
        np.concatenate([sample.classes[own_keep], donor.classes[their_keep]]),
    )


def _fraction_at_least(part: np.ndarray, whole: np.ndarray, minimum: float) -> np.ndarray:
    """``part / whole >= minimum`` with ``part > 0``; an empty ``whole`` (a degenerate box) counts as 0."""
    fraction = np.divide(part, whole, out=np.zeros_like(part, dtype=np.float64), where=whole > 0)
    return (fraction >= minimum) & (part > 0)


def _cut_off_sides(boxes_xyxy: np.ndarray, region_xyxy: np.ndarray) -> np.ndarray:
    """Boxes (N, 4) shrunk to their visible part where ``region_xyxy`` hides one whole side of them.

    The region hides the left side of a box when it spans the box from top to bottom and covers its left edge but
    not its right one; then the visible part is the rectangle right of the region. Likewise for the other sides.
    """
    rx1, ry1, rx2, ry2 = region_xyxy
    x1, y1, x2, y2 = boxes_xyxy.T
    spans_height = (ry1 <= y1) & (ry2 >= y2)
    spans_width = (rx1 <= x1) & (rx2 >= x2)
    out = boxes_xyxy.copy()
    left = spans_height & (rx1 <= x1) & (x1 < rx2) & (rx2 < x2)
    right = spans_height & (x1 < rx1) & (rx1 < x2) & (x2 <= rx2)
    top = spans_width & (ry1 <= y1) & (y1 < ry2) & (ry2 < y2)
    bottom = spans_width & (y1 < ry1) & (ry1 < y2) & (y2 <= ry2)
    out[left, 0] = rx2
    out[right, 2] = rx1
    out[top, 1] = ry2
    out[bottom, 3] = ry1
    return out


class Cutout:
    """With a probability, paint random-colour rectangles of shrinking sizes (random erasing).

    Patches cover 1/2, 1/4 (x2), 1/8 (x4) and 1/16 (x8) of the image side at random places; a box more than
    ``max_covered`` hidden by patches is dropped, since its object is no longer visible enough to learn from.
    """

    SCALES = (0.5, 0.25, 0.25, 0.125, 0.125, 0.125, 0.125, *([0.0625] * 8))

    def __init__(self, probability: float, max_covered: float = 0.6) -> None:
        self.probability = probability
        self.max_covered = max_covered

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.probability <= 0 or rng.random() >= self.probability:
            return sample
        image = sample.image.copy()
        height, width = image.shape[:2]
        covered = np.zeros(len(sample.classes), np.float32)
        areas = np.maximum(
            (sample.boxes_xyxy[:, 2] - sample.boxes_xyxy[:, 0]) * (sample.boxes_xyxy[:, 3] - sample.boxes_xyxy[:, 1]),
            1e-9,
        )
        for scale in self.SCALES:
            patch_h = max(1, int(rng.integers(1, int(height * scale) + 2)))
            patch_w = max(1, int(rng.integers(1, int(width * scale) + 2)))
            x1, y1 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x2, y2 = min(width, x1 + patch_w), min(height, y1 + patch_h)
            image[y1:y2, x1:x2] = rng.integers(64, 192, size=3, dtype=np.uint8)
            # Patches may overlap each other; the sum over-counts, erring towards dropping a hidden box.
            covered += _intersection_areas(sample.boxes_xyxy, np.array([x1, y1, x2, y2], np.float32))
        keep = covered / areas <= self.max_covered
        return Sample(image, sample.boxes_xyxy[keep], sample.classes[keep])

    def __repr__(self) -> str:
        return f"Cutout(p={self.probability})"


class GridMask:
    """With a probability, erase a regular grid of squares to grey (GridMask, Chen et al. 2020).

    https://arxiv.org/abs/2001.04086: the image is tiled into square units of side ``d`` and a square of side
    ``(1 - ratio) * d`` is erased at the same place in every unit, so a fraction ``1 - (1 - ratio)**2`` of the pixels
    stays (0.84 at the paper's ratio 0.6). Unlike cutout's few large patches, a spread-out grid rarely hides a whole
    object yet removes parts of most, so the model must recognise objects from fragments. ``d`` is drawn uniformly
    (whole pixels) between ``unit_range`` times the image's short side, and the grid is shifted by a random offset in
    [0, d) on each axis. The paper's random rotation of the grid is left out: axis-aligned squares keep the count of
    erased pixels per box exact (see :func:`gridmask`), which decides the boxes dropped at ``min_visibility``.
    Erased pixels take the letterbox grey (``PAD_VALUE``), a colour the network already reads as "no content".
    """

    def __init__(
        self,
        probability: float,
        min_visibility: float = 0.3,
        *,
        ratio: float = 0.6,
        unit_range: tuple[float, float] = (0.1, 0.5),
    ) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"GridMask ratio is the kept fraction of a unit's side, expected (0, 1), got {ratio}")
        if not 0.0 < unit_range[0] <= unit_range[1]:
            raise ValueError(
                f"GridMask unit_range: expected 0 < low <= high (fractions of the short side), got {unit_range}"
            )
        self.probability = probability
        self.min_visibility = min_visibility
        self.ratio = ratio
        self.unit_range = unit_range

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.probability <= 0 or rng.random() >= self.probability:
            return sample
        height, width = sample.image.shape[:2]
        short_side = min(height, width)
        # A unit of at least 2 px leaves room for an erased square and a kept band.
        low = max(2, round(self.unit_range[0] * short_side))
        high = max(low, round(self.unit_range[1] * short_side))
        unit = int(rng.integers(low, high + 1))
        erase_size = min(max(1, round((1.0 - self.ratio) * unit)), unit - 1)
        offset = (int(rng.integers(0, unit)), int(rng.integers(0, unit)))
        mask = grid_erase_mask((height, width), unit=unit, erase_size=erase_size, offset=offset)
        return gridmask(sample, mask, self.min_visibility)

    def __repr__(self) -> str:
        return (
            f"GridMask(p={self.probability}, min_visibility={self.min_visibility}, ratio={self.ratio}, "
            f"unit_range={self.unit_range})"
        )


def grid_erase_mask(
    shape: tuple[int, int], *, unit: int, erase_size: int, offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """(height, width) bool mask, True where GridMask erases: pixel (x, y) is erased when both
    ``(x - offset_x) mod unit`` and ``(y - offset_y) mod unit`` are below ``erase_size``.

    So squares of ``erase_size`` px, one per ``unit`` x ``unit`` tile, the first starting at ``offset`` (x, y);
    squares cut by the image border are partly erased.
    """
    if not 0 < erase_size <= unit:
        raise ValueError(f"grid_erase_mask: expected 0 < erase_size <= unit, got erase_size={erase_size}, unit={unit}")
    height, width = shape
    columns = (np.arange(width) - offset[0]) % unit < erase_size
    rows = (np.arange(height) - offset[1]) % unit < erase_size
    return rows[:, None] & columns[None, :]


def gridmask(sample: Sample, erase_mask: np.ndarray, min_visibility: float = 0.3) -> Sample:
    """Deterministic GridMask: paint the pixels of ``erase_mask`` (H, W) bool grey and drop the boxes left less
    than ``min_visibility`` visible.

    A box's visibility is the fraction of the pixels it touches (its corners rounded outwards) that are not erased,
    counted in O(1) per box from an integral image of the mask. Boxes are not moved: an erased grid never removes
    a whole side of a box. The input image is not modified.
    """
    height, width = sample.image.shape[:2]
    if erase_mask.shape != (height, width):
        raise ValueError(f"gridmask: mask {erase_mask.shape} must match the image's (height, width) {(height, width)}")
    image = sample.image.copy()
    image[erase_mask] = PAD_VALUE
    if len(sample.classes) == 0:
        return Sample(image, sample.boxes_xyxy, sample.classes)
    erased_sum = cv2.integral(erase_mask.astype(np.uint8))  # (H + 1, W + 1): erased pixels above-left of (y, x)
    boxes = sample.boxes_xyxy
    left = np.clip(np.floor(boxes[:, 0]), 0, width).astype(np.int64)
    top = np.clip(np.floor(boxes[:, 1]), 0, height).astype(np.int64)
    right = np.clip(np.ceil(boxes[:, 2]), 0, width).astype(np.int64)
    bottom = np.clip(np.ceil(boxes[:, 3]), 0, height).astype(np.int64)
    erased = erased_sum[bottom, right] - erased_sum[top, right] - erased_sum[bottom, left] + erased_sum[top, left]
    pixels = (np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)).astype(np.float64)
    keep = _fraction_at_least(pixels - erased, pixels, min_visibility)
    return Sample(image, boxes[keep], sample.classes[keep])


def _intersection_areas(boxes_xyxy: np.ndarray, patch_xyxy: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(boxes_xyxy[:, 2], patch_xyxy[2]) - np.maximum(boxes_xyxy[:, 0], patch_xyxy[0]), 0, None)
    height = np.clip(np.minimum(boxes_xyxy[:, 3], patch_xyxy[3]) - np.maximum(boxes_xyxy[:, 1], patch_xyxy[1]), 0, None)
    return width * height


class Albumentations:
    """Rare blur, median blur, greyscale and CLAHE from the ``albumentations`` package, when it is installed.

    Never required: without the package this step logs once and passes samples through unchanged.
    Its own random state is seeded from ``rng`` on every call so a seed still reproduces the result.
    """

    def __init__(self, probability: float) -> None:
        self.probability = probability
        self.pipeline = None
        try:
            import albumentations as album
        except ImportError:
            LOGGER.info("albumentations=%g ignored: the albumentations package is not installed", probability)
            return
        # Pixel-only transforms with YOLOv5's probabilities: boxes never move, so none are passed in.
        self.pipeline = album.Compose(
            [album.Blur(p=0.01), album.MedianBlur(p=0.01), album.ToGray(p=0.01), album.CLAHE(p=0.01)]
        )

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.pipeline is None or self.probability <= 0 or rng.random() >= self.probability:
            return sample
        if hasattr(self.pipeline, "set_random_seed"):
            self.pipeline.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        return replace(sample, image=self.pipeline(image=sample.image)["image"])

    def __repr__(self) -> str:
        return f"Albumentations(p={self.probability}, installed={self.pipeline is not None})"


__all__ = [
    "COPY_PASTE_MAX_COVERED",
    "PAD_VALUE",
    "Albumentations",
    "Compose",
    "CopyPaste",
    "CutMix",
    "Cutout",
    "GridMask",
    "Letterbox",
    "MixUp",
    "Mosaic",
    "PasteObject",
    "RandomFlip",
    "RandomHSV",
    "RandomPerspective",
    "Sample",
    "SampleSource",
    "box_candidates",
    "build_train_transforms",
    "cut_objects",
    "cutmix",
    "flip",
    "grid_erase_mask",
    "gridmask",
    "letterbox",
    "letterbox_sample",
    "mosaic4",
    "mosaic9",
    "paste_objects",
    "polygon_mask",
    "transform_boxes",
]
