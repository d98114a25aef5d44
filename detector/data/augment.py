"""Image + box transforms for training, and the letterbox shared with prediction.

Every transform is a small class with ``__call__(sample, rng) -> Sample``: it takes a :class:`Sample` and an
explicit ``np.random.Generator`` and returns a new Sample, so a seed reproduces the augmentation exactly and a
transform can be tested alone. The training order is written once, in :func:`build_train_transforms`:

    mosaic (4 or 9 images) -> copy-paste -> random perspective -> auto-augment policy -> mixup -> cutmix -> cutout
    -> gridmask -> albumentations -> HSV -> flips

Adding an augmentation is one new class here plus one line in that function. Steps that need other images
(mosaic, copy-paste, mixup, cutmix) receive a :class:`SampleSource` and draw their own extra indices. A mosaic
followed directly by the random perspective runs as one step, :class:`MosaicWarp`, which resamples each picture
once instead of building the 2x canvas (the loader's hot path).

Images are OpenCV's (H, W, 3) uint8 BGR arrays all the way through; boxes are xyxy pixels of that image.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, runtime_checkable

import cv2
import numpy as np

from detector.config import Hyperparameters
from detector.data.media import ImageRegion

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


class PictureLayout(NamedTuple):
    """An image's size and boxes as :meth:`SampleSource.load_sample` would return them, known before reading it."""

    shape: tuple[int, int]  # (height, width) of load_sample(index).image
    boxes_xyxy: np.ndarray  # (N, 4) float32 pixels of that size
    classes: np.ndarray  # (N,) int64


@runtime_checkable
class PictureSource(SampleSource, Protocol):
    """A SampleSource that also tells an image's size and boxes before reading it and reads it unresized, so that
    :class:`MosaicWarp` leaves out the pictures it does not show and resamples each other one only once. Its
    reads draw no random numbers."""

    def load_layout(self, index: int) -> PictureLayout:
        """``load_sample(index)``'s image size, boxes and classes, without reading the image."""
        ...

    def load_unresized(
        self, index: int, min_side: int, region: tuple[float, float, float, float] | None = None
    ) -> ImageRegion:
        """Image ``index`` before its resize, with the aspect ratio of ``load_layout(index).shape``: at any
        resolution whose long side is at least ``min_side`` px (or ``load_sample``'s own, the lower of the two).
        With ``region`` ((x0, y0, x1, y1), fractions of the width and height) only the pixels that cover it and
        one more on each side are needed; more may come (:class:`~detector.data.media.ImageRegion` says where)."""
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

    def apply_to_index(self, source: SampleSource, index: int, rng: np.random.Generator) -> Sample:
        """``self(source.load_sample(index), rng)``, the same result, but a first step that reads its own pixels
        (:class:`MosaicWarp`) is handed the index, so that it never reads or resizes a picture it does not show."""
        if not self.steps:
            return source.load_sample(index)
        first, *rest = self.steps
        if isinstance(first, (Compose, MosaicWarp)):
            sample = first.apply_to_index(source, index, rng)
        else:
            sample = first(source.load_sample(index), rng)
        for step in rest:
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
    on_device: bool = False,
) -> Compose:
    """The training augmentation, in order, driven by YOLOv5's hyperparameter keys.

    Square training (``rect=False``): samples arrive resized (long side ``imgsz``) and leave ``imgsz`` square;
    mosaic builds a 2x canvas and the perspective step crops it back. Rectangular batches (``rect=True``): samples
    arrive already letterboxed to their batch shape, which every step keeps; mosaic is off (it would change the
    shape), and the mixing steps letterbox each image they draw from ``source`` to the sample's shape first.
    Steps that draw other images (mosaic, copy-paste, mixup, cutmix) exist only with a ``source``.
    ``auto_augment`` names a policy of :func:`detector.data.policies.build_auto_augment` ("" = none), applied
    after the geometry so that it sees the final framing. ``on_device`` (``--augment-on-device``) leaves the last
    steps, HSV and flips, to :class:`detector.data.device_augment.DeviceAugment` in the training step.
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
    geometry = Compose(_fuse_mosaic_warp(geometry.steps))  # the same result, at a fraction of the cost
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
            *(
                []
                if on_device
                else [
                    RandomHSV(hyp.hsv_h, hyp.hsv_s, hyp.hsv_v),
                    RandomFlip("vertical", hyp.flipud),
                    RandomFlip("horizontal", hyp.fliplr),
                ]
            ),
        ]
    )


def _fuse_mosaic_warp(steps: Sequence[Transform]) -> list[Transform]:
    """``steps`` with each :class:`Mosaic` that is directly followed by a :class:`RandomPerspective` and draws from a
    :class:`PictureSource` replaced by their :class:`MosaicWarp`."""
    fused: list[Transform] = []
    for step in steps:
        previous = fused[-1] if fused else None
        if (
            isinstance(step, RandomPerspective)
            and isinstance(previous, Mosaic)
            and isinstance(previous.source, PictureSource)
        ):
            fused[-1] = MosaicWarp(previous, step)
        else:
            fused.append(step)
    return fused


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
    return Sample(canvas, *_clip_boxes(boxes, classes, canvas.shape[:2]))


def _clip_boxes(
    boxes: list[np.ndarray], classes: list[np.ndarray], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The pictures' boxes and classes joined, boxes clipped to a canvas of ``shape`` (height, width); the boxes
    left with no area (their object entirely cut off) are dropped."""
    boxes_xyxy = np.concatenate(boxes).reshape(-1, 4).astype(np.float32)
    labels = np.concatenate(classes).astype(np.int64)
    height, width = shape
    np.clip(boxes_xyxy[:, 0::2], 0, width, out=boxes_xyxy[:, 0::2])
    np.clip(boxes_xyxy[:, 1::2], 0, height, out=boxes_xyxy[:, 1::2])
    visible = (boxes_xyxy[:, 2] > boxes_xyxy[:, 0]) & (boxes_xyxy[:, 3] > boxes_xyxy[:, 1])
    return boxes_xyxy[visible], labels[visible]


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
        extra = self.draw_images(rng)
        if extra is None:
            return sample
        # Loaded between the draws, as a source may draw too (tiled training places its tiles with ``rng``).
        return self.build([sample, *(self.source.load_sample(i) for i in extra)], rng)

    def build(self, samples: Sequence[Sample], rng: np.random.Generator) -> Sample:
        """The mosaic of ``samples`` (4 or 9, the sample first), drawing where the pictures meet."""
        images = [s.image for s in samples]
        boxes = [s.boxes_xyxy for s in samples]
        classes = [s.classes for s in samples]
        if len(samples) == 9:
            return mosaic9(images, boxes, classes, size=self.size, offset=self.draw_offset(rng))
        return mosaic4(images, boxes, classes, size=self.size, center=self.draw_center(rng))

    def draw_images(self, rng: np.random.Generator) -> list[int] | None:
        """The first draws: the indices of the 3 (or 8) other images, or None when the sample gets no mosaic."""
        if self.probability <= 0 or rng.random() >= self.probability:
            return None
        nine = self.nine_probability > 0 and rng.random() < self.nine_probability
        return [int(i) for i in rng.integers(0, len(self.source), size=8 if nine else 3)]

    def draw_center(self, rng: np.random.Generator) -> tuple[int, int]:
        """Where the four pictures meet (x, y): in the middle half of the canvas, so each quadrant keeps some of
        its picture."""
        x, y = rng.integers(self.size // 2, 3 * self.size // 2 + 1, size=2)
        return int(x), int(y)

    def draw_offset(self, rng: np.random.Generator) -> tuple[int, int]:
        """Where the 9-image mosaic's crop starts (x, y) on its 3x3 grid."""
        x, y = rng.integers(0, self.size + 1, size=2)
        return int(x), int(y)

    def __repr__(self) -> str:
        return f"Mosaic(p={self.probability}, p9={self.nine_probability}, size={self.size})"


class MosaicWarp:
    """:class:`Mosaic` followed by :class:`RandomPerspective`, fused: the same random draws, the same boxes and,
    up to interpolation rounding, the same pixels as ``Compose([mosaic, perspective])``, at a fraction of the cost.

    When the drawn warp only scales and shifts (YOLOv5's hyperparameters: no rotation, shear or perspective) and the
    mosaic has 4 pictures, no 2x canvas is built: each picture's visible part is resampled once, from the image as
    read straight into its rectangle of the output (:func:`warped_mosaic4`). A picture that lands entirely outside
    the output is never read, and one shown much smaller than its stored size is read at a reduced JPEG size (DCT
    scaling, :meth:`PictureSource.load_unresized`). Only where the two-step path resizes a picture, pastes it and
    then resamples the canvas (two interpolations, blending neighbours across the picture's edge) does the fused one
    interpolate once: the pixels differ by rounding, a line one pixel wide along each edge between pictures, and a
    DCT-scaled read where one is used. 9-image mosaics and warps with rotation, shear or perspective take the
    two-step path. ``mosaic.source`` must be a :class:`PictureSource` (its reads draw no random numbers).
    """

    def __init__(self, mosaic: Mosaic, perspective: RandomPerspective) -> None:
        if not isinstance(mosaic.source, PictureSource):
            raise TypeError(f"MosaicWarp needs a PictureSource to draw from, got {type(mosaic.source).__name__}")
        self.mosaic = mosaic
        self.perspective = perspective

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        height, width = sample.image.shape[:2]
        whole = ImageRegion(sample.image, (0, 0), (width, height))
        layout = PictureLayout((height, width), sample.boxes_xyxy, sample.classes)
        return self._apply(_Picture(layout, lambda min_side, region=None: whole), lambda: sample, rng)

    def apply_to_index(self, source: SampleSource, index: int, rng: np.random.Generator) -> Sample:
        """``self(source.load_sample(index), rng)``, reading image ``index`` only if it is shown."""
        if not reads_pictures(type(source)):
            return self(source.load_sample(index), rng)
        return self._apply(_lazy_picture(source, index), functools.partial(source.load_sample, index), rng)

    def _apply(self, first: _Picture, load_first: Callable[[], Sample], rng: np.random.Generator) -> Sample:
        mosaic, perspective = self.mosaic, self.perspective
        extra = mosaic.draw_images(rng)
        if extra is None:
            return perspective(load_first(), rng)
        if len(extra) == 8:  # 9 pictures: the two steps as they are
            return perspective(mosaic.build([load_first(), *(mosaic.source.load_sample(i) for i in extra)], rng), rng)
        center = mosaic.draw_center(rng)
        canvas_shape = (2 * mosaic.size, 2 * mosaic.size)
        out_shape = perspective.output_shape or canvas_shape
        matrix, gain = perspective.random_matrix(canvas_shape, out_shape, rng)
        pictures = [first, *(_lazy_picture(mosaic.source, i) for i in extra)]
        if _is_scale_and_shift(matrix):
            warped = warped_mosaic4(
                pictures, size=mosaic.size, center=center, matrix=matrix, gain=gain, out_shape=out_shape
            )
            if warped is not None:
                return warped
        samples = [load_first(), *(mosaic.source.load_sample(i) for i in extra)]
        canvas = mosaic4(
            [s.image for s in samples],
            [s.boxes_xyxy for s in samples],
            [s.classes for s in samples],
            size=mosaic.size,
            center=center,
        )
        return perspective.warp(canvas, matrix, gain, out_shape)

    def __repr__(self) -> str:
        return f"MosaicWarp({self.mosaic!r}, {self.perspective!r})"


class _Picture(NamedTuple):
    """A mosaic picture before its pixels are read: its size and boxes as the source serves it, and its reader."""

    layout: PictureLayout
    read: Callable[..., ImageRegion]  # read(min_side, region): its pixels (PictureSource.load_unresized)


def _lazy_picture(source: PictureSource, index: int) -> _Picture:
    return _Picture(source.load_layout(index), functools.partial(source.load_unresized, index))


@functools.cache
def reads_pictures(source_type: type) -> bool:
    """Whether a source of this type is a :class:`PictureSource` (cached: a Protocol's isinstance is slow)."""
    return all(callable(getattr(source_type, name, None)) for name in ("load_layout", "load_unresized"))


def warped_mosaic4(
    pictures: Sequence[_Picture],
    *,
    size: int,
    center: tuple[int, int],
    matrix: np.ndarray,
    gain: float,
    out_shape: tuple[int, int],
) -> Sample | None:
    """``RandomPerspective.warp(mosaic4(...), matrix, gain, out_shape)`` for a scale-and-shift ``matrix``, without
    the canvas: each picture's part that lands in the output is resampled once, straight from its pixels as read.

    The boxes are exactly the two-step path's (same canvas geometry, same whole-pixel rounding of the warp); each
    output pixel takes the picture its centre falls in (the two-step path blends neighbours across picture edges).
    Returns None when a picture's pixels, once read, do not have the aspect ratio of its layout (a size the
    source predicted wrongly): the caller then takes the two-step path.
    """
    canvas_shape = (2 * size, 2 * size)
    plan = _plan_scale_and_shift(canvas_shape, matrix, out_shape)
    image = np.full((*out_shape, 3), PAD_VALUE, np.uint8)
    center_x, center_y = center
    all_boxes, all_classes = [], []
    for position, picture in enumerate(pictures):
        height, width = picture.layout.shape
        x0 = center_x - width if position in (0, 2) else center_x
        y0 = center_y - height if position in (0, 1) else center_y
        all_boxes.append(picture.layout.boxes_xyxy + np.array([x0, y0, x0, y0], np.float32))
        all_classes.append(picture.layout.classes)
        if plan is not None and not _warp_picture(image, picture, (x0, y0), plan):
            return None
    boxes, classes = _clip_boxes(all_boxes, all_classes, canvas_shape)
    return _moved_boxes(image, boxes, classes, matrix if plan is None else plan.matrix, gain)


def _warp_picture(image: np.ndarray, picture: _Picture, corner: tuple[int, int], plan: _ScaleShiftPlan) -> bool:
    """Resample ``picture``, placed with its top-left at ``corner`` (x, y) on the mosaic canvas, into the output
    ``image`` through ``plan``: only the output pixels whose centres fall on the picture; the picture is not read
    when there are none. False when its pixels do not fit its shape (see :func:`warped_mosaic4`)."""
    height, width = picture.layout.shape
    gain_x, gain_y = float(plan.matrix[0, 0]), float(plan.matrix[1, 1])
    shift_x, shift_y = float(plan.matrix[0, 2]), float(plan.matrix[1, 2])
    crop_x0, crop_y0, crop_x1, crop_y1 = plan.crop
    # The picture's part of the canvas that lands in the output, then the output pixels whose centres map into it.
    x_range = (max(corner[0], crop_x0), min(corner[0] + width, crop_x1))
    y_range = (max(corner[1], crop_y0), min(corner[1] + height, crop_y1))
    left, right = (min(max(math.ceil(gain_x * x + shift_x - 0.5), 0), image.shape[1]) for x in x_range)
    top, bottom = (min(max(math.ceil(gain_y * y + shift_y - 0.5), 0), image.shape[0]) for y in y_range)
    if right <= left or bottom <= top:
        return True
    # Read at the resolution the output shows it at, at most, and only the part it shows: the picture's
    # fractions under the first and last output pixels' centres (interpolation reads a pixel beyond; the source
    # adds it).
    shown = (
        ((left + 0.5 - shift_x) / gain_x - corner[0]) / width,
        ((top + 0.5 - shift_y) / gain_y - corner[1]) / height,
        ((right - 0.5 - shift_x) / gain_x - corner[0]) / width,
        ((bottom - 0.5 - shift_y) / gain_y - corner[1]) / height,
    )
    pixels, (crop_x, crop_y), (pixels_w, pixels_h) = picture.read(
        math.ceil(max(height * gain_y, width * gain_x)), shown
    )
    # Same aspect ratio up to the rounding of both sizes (each side may be off by a pixel or so).
    if abs(pixels_w * height - pixels_h * width) > pixels_w + pixels_h + width + height:
        return False
    # Picture pixels -> output pixels (pixel-edge coordinates): x_out = gain * (x_pixels * width / pixels_w + x0)
    # + shift, x_pixels counted from the crop's corner; in OpenCV's pixel-centre coordinates each offset gains
    # scale / 2 - 1 / 2.
    scale_x, scale_y = gain_x * width / pixels_w, gain_y * height / pixels_h
    offset_x = gain_x * corner[0] + shift_x - left + scale_x * crop_x + 0.5 * scale_x - 0.5
    offset_y = gain_y * corner[1] + shift_y - top + scale_y * crop_y + 0.5 * scale_y - 0.5
    to_output = np.array([[scale_x, 0.0, offset_x], [0.0, scale_y, offset_y]])
    region = image[top:bottom, left:right]
    cv2.warpAffine(
        pixels,
        to_output,
        (right - left, bottom - top),
        dst=region,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return True


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
        in_shape = sample.image.shape[:2]
        out_shape = self.output_shape or in_shape
        matrix, gain = self.random_matrix(in_shape, out_shape, rng)
        return self.warp(sample, matrix, gain, out_shape)

    def warp(self, sample: Sample, matrix: np.ndarray, gain: float, out_shape: tuple[int, int]) -> Sample:
        """``sample`` through a drawn ``matrix`` (of scale ``gain``) into an image of ``out_shape`` (height, width)."""
        out_h, out_w = out_shape
        if _is_scale_and_shift(matrix):  # YOLOv5's default hyps: no rotation, shear or perspective
            image, matrix = _scale_and_shift(sample.image, matrix, out_shape)
        elif self.perspective:
            image = cv2.warpPerspective(sample.image, matrix, (out_w, out_h), borderValue=(PAD_VALUE,) * 3)
        else:
            image = cv2.warpAffine(sample.image, matrix[:2], (out_w, out_h), borderValue=(PAD_VALUE,) * 3)
        return _moved_boxes(image, sample.boxes_xyxy, sample.classes, matrix, gain)

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


def _moved_boxes(
    image: np.ndarray, boxes_xyxy: np.ndarray, classes: np.ndarray, matrix: np.ndarray, gain: float
) -> Sample:
    """The warped ``image`` with the boxes moved by ``matrix`` (of scale ``gain``): clipped to the image, and those
    no longer worth training on (:func:`box_candidates`) dropped."""
    if len(classes) == 0:
        return Sample(image, boxes_xyxy, classes)
    out_h, out_w = image.shape[:2]
    boxes = transform_boxes(boxes_xyxy, matrix)
    np.clip(boxes[:, 0::2], 0, out_w, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, out_h, out=boxes[:, 1::2])
    keep = box_candidates(boxes_xyxy * gain, boxes)
    return Sample(image, boxes[keep], classes[keep])


class _ScaleShiftPlan(NamedTuple):
    """A scale-and-shift warp rounded to whole pixels: which input pixels land where in the output."""

    crop: tuple[int, int, int, int]  # (x0, y0, x1, y1): the input pixels that land in the output
    size: tuple[int, int]  # (width, height) they are resized to
    corner: tuple[int, int]  # (left, top) where they land (may lie partly outside the output: that part is cut)
    matrix: np.ndarray  # 3x3 float32, the warp applied: input pixel-edge coordinates -> output ones


def _plan_scale_and_shift(
    in_shape: tuple[int, int], matrix: np.ndarray, out_shape: tuple[int, int]
) -> _ScaleShiftPlan | None:
    """The whole-pixel version of a scale-and-shift ``matrix`` from an input of ``in_shape`` to ``out_shape``
    (both (height, width)); None when the input moves entirely out of view."""
    out_h, out_w = out_shape
    in_h, in_w = in_shape
    gain_x, gain_y, shift_x, shift_y = (float(v) for v in (matrix[0, 0], matrix[1, 1], matrix[0, 2], matrix[1, 2]))
    x0, x1 = max(0, math.floor(-shift_x / gain_x)), min(in_w, math.ceil((out_w - shift_x) / gain_x))
    y0, y1 = max(0, math.floor(-shift_y / gain_y)), min(in_h, math.ceil((out_h - shift_y) / gain_y))
    if x1 <= x0 or y1 <= y0:
        return None
    width, height = max(1, round((x1 - x0) * gain_x)), max(1, round((y1 - y0) * gain_y))
    left, top = round(x0 * gain_x + shift_x), round(y0 * gain_y + shift_y)
    applied_x, applied_y = width / (x1 - x0), height / (y1 - y0)
    applied = np.array(
        [[applied_x, 0, left - x0 * applied_x], [0, applied_y, top - y0 * applied_y], [0, 0, 1]], np.float32
    )
    return _ScaleShiftPlan((x0, y0, x1, y1), (width, height), (left, top), applied)


def _scale_and_shift(
    image: np.ndarray, matrix: np.ndarray, out_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A scale-and-shift warp done as crop + resize + paste, 5x cheaper than cv2.warpAffine's per-pixel mapping.

    Only the source pixels that land in the output are resized. Sizes and offsets are rounded to whole pixels,
    so the result may differ from ``matrix`` by under a pixel; the matrix returned is the one actually applied
    (in pixel-edge coordinates, the convention of box corners), so boxes transformed with it stay exact.
    """
    canvas = np.full((*out_shape, 3), PAD_VALUE, np.uint8)
    plan = _plan_scale_and_shift(image.shape[:2], matrix, out_shape)
    if plan is None:  # the image moved entirely out of view
        return canvas, matrix
    x0, y0, x1, y1 = plan.crop
    crop = image[y0:y1, x0:x1]
    if plan.size != (x1 - x0, y1 - y0):
        crop = cv2.resize(crop, plan.size, interpolation=cv2.INTER_LINEAR)
    _paste(canvas, crop, *plan.corner, np.zeros((0, 4), np.float32))
    return canvas, plan.matrix


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
    """Random hue, saturation and value gains, applied through one look-up table per channel (cv2.LUT on each plane).

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
        tables = (
            ((levels * gains[0]) % 180).astype(np.uint8),
            np.clip(levels * gains[1], 0, 255).astype(np.uint8),
            np.clip(levels * gains[2], 0, 255).astype(np.uint8),
        )
        hsv = cv2.cvtColor(sample.image, cv2.COLOR_BGR2HSV)
        # Split, map each plane through its table and merge: 1.6x faster than one cv2.LUT with a 3-channel table,
        # which OpenCV does not vectorise.
        planes = cv2.split(hsv)
        for plane, table in zip(planes, tables, strict=True):
            cv2.LUT(plane, table, dst=plane)
        cv2.merge(planes, dst=hsv)
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


_ALBUMENTATIONS_LOCK = threading.Lock()


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
        with _ALBUMENTATIONS_LOCK:  # one pipeline, one random state: the dataset may build items on threads
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
    "MosaicWarp",
    "PasteObject",
    "PictureLayout",
    "PictureSource",
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
    "warped_mosaic4",
]
