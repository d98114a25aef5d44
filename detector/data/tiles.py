"""Tiled training (``--train-tile SIZE``): crops of images at their original resolution, not the whole image shrunk.

An image much larger than the network input (4000x3000 with 15 px objects) shrunk to ``--img 640`` loses its
small objects. With tiles, each training item is a SIZE x SIZE window of the full-resolution image, which then
goes through the usual augmentation as if it were the image: a mosaic joins four tiles, copy-paste and mixup draw
tiles too. A tile is resized by ``imgsz / SIZE`` (nothing to do when ``--img`` equals SIZE, the usual choice), so
every tile of every image has the same pixel scale. Images smaller than SIZE on a side are used whole on that side
(and padded by the later steps as usual).

Placement favours objects: with probability :data:`OBJECT_TILE_PROBABILITY` the tile contains the centre of one
randomly chosen object, at a random position among all those that do; otherwise it lies anywhere. Large images
are mostly background, and uniform tiles would spend most of the batch on nothing. Boxes are clipped to the tile
and kept while at least ``min_visibility`` (``hyp.min_visibility``) of their area stays inside. Polygon outlines
(copy-paste) are moved into tile coordinates, not clipped: copy-paste masks only the pixels inside a box, which is
clipped already.

The pure functions :func:`place_tile` and :func:`crop_tile` do the work; :class:`TileSource` serves tiles to the
dataset and the mixing steps, every tile placed with the generator of the item being built, so an item depends on
its seed only (any number of workers, any order).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import cv2
import numpy as np

from detector.data.augment import Sample, SampleSource, reads_pictures

# Chance that a tile is placed around an object rather than anywhere: mostly objects, yet one tile in five still
# shows the background alone, as test-time tiling does everywhere (false positives on clutter are learnt too).
OBJECT_TILE_PROBABILITY = 0.8


class TileWindow(NamedTuple):
    """A tile: its top-left corner and size in pixels of the full-resolution image."""

    x0: int
    y0: int
    width: int
    height: int


def place_tile(
    image_shape: tuple[int, int],
    size: int,
    boxes_xyxy: np.ndarray,
    rng: np.random.Generator,
    *,
    object_probability: float = OBJECT_TILE_PROBABILITY,
) -> TileWindow:
    """Where to cut a tile of ``size`` pixels from an image of ``image_shape`` (height, width).

    The tile is ``min(size, width)`` x ``min(size, height)`` and lies inside the image. When the image has boxes
    (``boxes_xyxy`` (N, 4) pixels), with probability ``object_probability`` one box is drawn uniformly and the
    corner uniformly among the integer positions whose tile contains that box's centre (edges included); otherwise
    the corner is uniform over all positions. Every draw comes from ``rng``.
    """
    height, width = image_shape
    tile_w, tile_h = min(size, width), min(size, height)
    if len(boxes_xyxy) and rng.random() < object_probability:
        x1, y1, x2, y2 = (float(v) for v in boxes_xyxy[int(rng.integers(len(boxes_xyxy)))])
        x0 = _corner_containing((x1 + x2) / 2, tile_w, width, rng)
        y0 = _corner_containing((y1 + y2) / 2, tile_h, height, rng)
    else:
        x0 = int(rng.integers(0, width - tile_w + 1))
        y0 = int(rng.integers(0, height - tile_h + 1))
    return TileWindow(x0, y0, tile_w, tile_h)


def _corner_containing(centre: float, tile: int, image: int, rng: np.random.Generator) -> int:
    """A uniform integer corner in [0, image - tile] with corner <= centre <= corner + tile (one axis)."""
    centre = min(max(centre, 0.0), float(image))
    low = max(0, math.ceil(centre - tile))
    high = min(image - tile, math.floor(centre))
    return int(rng.integers(low, high + 1))


def crop_tile(sample: Sample, window: TileWindow, *, min_visibility: float) -> tuple[Sample, np.ndarray]:
    """Cut ``window`` out of ``sample``: the image's pixels and the boxes clipped to the window, in its coordinates.

    A box is kept when its clipped area is positive and at least ``min_visibility`` of its own area (a box of zero
    area is dropped). Returns the tile and the (M,) int64 indices of the kept boxes in ``sample``.
    """
    x0, y0, tile_w, tile_h = window
    image = np.ascontiguousarray(sample.image[y0 : y0 + tile_h, x0 : x0 + tile_w])
    boxes, kept = _window_boxes(sample.boxes_xyxy, window, min_visibility)
    return Sample(image, boxes, sample.classes[kept]), kept


def _window_boxes(boxes_xyxy: np.ndarray, window: TileWindow, min_visibility: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`crop_tile`'s boxes: clipped to ``window``, in its coordinates (float32), and the indices kept."""
    x0, y0, tile_w, tile_h = window
    boxes = boxes_xyxy.astype(np.float64) - np.array([x0, y0, x0, y0], np.float64)
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0, tile_w, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, tile_h, out=clipped[:, 1::2])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    fraction = np.divide(inside, area, out=np.zeros_like(inside), where=area > 0)
    kept = np.flatnonzero((inside > 0) & (fraction >= min_visibility))
    return clipped[kept].astype(np.float32), kept


def resize_tile(tile: Sample, ratio: float) -> Sample:
    """``tile`` scaled by ``ratio`` (boxes too); INTER_LINEAR, as the training store resizes (augmentation
    resamples the image again anyway). ``ratio == 1`` returns it unchanged."""
    if ratio == 1:
        return tile
    height, width = tile.image.shape[:2]
    image = cv2.resize(
        tile.image, (max(1, round(width * ratio)), max(1, round(height * ratio))), interpolation=cv2.INTER_LINEAR
    )
    return Sample(image, (tile.boxes_xyxy * ratio).astype(np.float32), tile.classes)


class TileSource:
    """The :class:`~detector.data.augment.SampleSource` of tiled training: a new random tile at every load.

    ``source`` serves whole images at their original resolution (an
    :class:`~detector.data.dataset.ImageStore` with ``full_resolution=True``). ``load_sample(i)`` places a tile
    with :func:`place_tile`, cuts it with :func:`crop_tile` and scales it by ``imgsz / size``; from a
    :class:`~detector.data.augment.PictureSource` it places the tile on the image's layout first and reads only the
    tile's pixels (only that part of a JPEG is decoded, with the ``fast-jpeg`` extra). Tiles are placed
    with the generator bound by :meth:`drawing_from`, the item's own, so the dataset's item, the mosaic's three
    other tiles and any copy-paste or mixup donor all follow from the item's seed. Loading outside
    :meth:`drawing_from` raises: a tile drawn from any other randomness would break reproducibility.
    """

    def __init__(
        self,
        source: SampleSource,
        size: int,
        imgsz: int,
        *,
        min_visibility: float,
        object_probability: float = OBJECT_TILE_PROBABILITY,
    ) -> None:
        if size < 1:
            raise ValueError(f"tile size must be a positive number of pixels, got {size}")
        self.source = source
        self.size = size
        self.ratio = imgsz / size
        self.min_visibility = min_visibility
        self.object_probability = object_probability
        self._rng: np.random.Generator | None = None
        # (index, window, kept box indices, image shape) of the last tile, for load_polygons (copy-paste asks for
        # the outlines of the donor it has just loaded)
        self._last: tuple[int, TileWindow, np.ndarray, tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.source)

    @contextlib.contextmanager
    def drawing_from(self, rng: np.random.Generator) -> Iterator[TileSource]:
        """Within this block, tiles are placed with ``rng`` (the item's generator)."""
        self._rng = rng
        try:
            yield self
        finally:
            self._rng, self._last = None, None

    def load_sample(self, index: int) -> Sample:
        """A random tile of image ``index`` (see the class), boxes in pixels of the returned image."""
        if self._rng is None:
            raise RuntimeError("TileSource.load_sample outside drawing_from(rng): tiles are placed by the item's rng")
        if not reads_pictures(type(self.source)):
            whole = self.source.load_sample(index)
            shape = whole.image.shape[:2]
            window = self._place(shape, whole.boxes_xyxy)
            tile, kept = crop_tile(whole, window, min_visibility=self.min_visibility)
        else:  # the image's size and boxes come before its pixels: only the tile's part of a JPEG is decoded
            layout = self.source.load_layout(index)
            shape = layout.shape
            window = self._place(shape, layout.boxes_xyxy)
            x0, y0, tile_w, tile_h = window
            height, width = shape
            fractions = (x0 / width, y0 / height, (x0 + tile_w) / width, (y0 + tile_h) / height)
            read = self.source.load_unresized(index, max(shape), fractions)
            if read.size != (width, height):  # the scanned size was wrong: cut the tile from what was decoded
                tile, kept = crop_tile(self.source.load_sample(index), window, min_visibility=self.min_visibility)
            else:
                x, y = x0 - read.origin[0], y0 - read.origin[1]
                image = np.ascontiguousarray(read.pixels[y : y + tile_h, x : x + tile_w])
                boxes, kept = _window_boxes(layout.boxes_xyxy, window, self.min_visibility)
                tile = Sample(image, boxes, layout.classes[kept])
        self._last = (index, window, kept, shape)
        return resize_tile(tile, self.ratio)

    def _place(self, shape: tuple[int, int], boxes_xyxy: np.ndarray) -> TileWindow:
        return place_tile(shape, self.size, boxes_xyxy, self._rng, object_probability=self.object_probability)

    def load_polygons(self, index: int) -> list[np.ndarray | None]:
        """The outlines of the boxes of the tile just loaded from image ``index``, normalised to that tile.

        Points may lie outside the tile: copy-paste cuts only the pixels inside each (clipped) box.
        """
        if self._last is None or self._last[0] != index:
            raise RuntimeError(f"TileSource.load_polygons({index}) must follow load_sample({index})")
        _, window, kept, (height, width) = self._last
        outlines = self.source.load_polygons(index)
        scale = np.array([width / window.width, height / window.height], np.float32)
        shift = np.array([window.x0 / window.width, window.y0 / window.height], np.float32)
        return [None if outlines[i] is None else (outlines[i] * scale - shift).astype(np.float32) for i in kept]
