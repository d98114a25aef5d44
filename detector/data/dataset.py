"""YOLO-format detection dataset: image paths -> label paths -> checked pairs -> augmented uint8 tensors.

Layout (YOLOv5's rule): ``.../images/.../name.jpg`` has its labels in ``.../labels/.../name.txt`` (the last
``images`` folder in the path becomes ``labels``), one row ``class x_center y_center width height`` per object,
normalised to 0-1; a row ``class x1 y1 x2 y2 ...`` is a polygon (YOLOv5 segment labels), trained on as its bounding
box and kept as an outline for copy-paste. A dataset can instead name its label folder (``label_dir``).

:class:`ImageStore` reads and resizes images (with an optional RAM or disk cache) and is the
:class:`~detector.data.augment.SampleSource` that mosaic, copy-paste and mixup draw from. :class:`YOLODataset` adds
the per-item pipeline: the training transforms, or a deterministic letterbox for validation and rectangular batches.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from detector.config import Hyperparameters
from detector.data.augment import (
    PictureLayout,
    PictureSource,
    Sample,
    SampleSource,
    build_train_transforms,
    letterbox_sample,
)
from detector.data.media import IMAGE_SUFFIXES, ImageRegion, read_image, read_image_region, read_size
from detector.data.scan import check_image, folder_is_writable, label_cache_path, scan_dataset
from detector.data.tiles import TileSource
from detector.errors import DataError
from detector.ops.boxes import xywhn2xyxy, xyxy2xywhn
from detector.utils.files import atomic_write
from detector.utils.torch_utils import usable_cpus

LOGGER = logging.getLogger(__name__)

SourceSpec = str | os.PathLike | Sequence[str | os.PathLike]
RAM_CACHE_SAFETY = 1.2  # keep 20% of free memory for everything else when deciding whether a RAM cache fits
RAM_CACHE_SAMPLE = 30  # images decoded to estimate the size of a RAM cache


# --------------------------------------------------------------------------------------------------------------------
# Paths


def find_images(sources: SourceSpec) -> list[tuple[Path, Path | None]]:
    """Image files of one or more sources, each with the folder it was found in (None for list entries).

    A source is an image folder (searched recursively), a ``.txt`` file listing image paths (relative paths
    are relative to the list's folder), or one image file. Suffixes are matched case-insensitively.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found: list[tuple[Path, Path | None]] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found.extend((p, path) for p in files)
        elif path.is_file() and path.suffix.lower() == ".txt":
            found.extend((p, None) for p in _read_list(path))
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append((path, None))
        elif path.exists():
            raise DataError(f"{path}: expected an image folder, a .txt list of images or an image file")
        else:
            raise DataError(f"{path}: image source not found")
    if not found:
        raise DataError(f"no images found in {[str(s) for s in sources]} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return found


def _read_list(list_file: Path) -> list[Path]:
    images = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        if not (entry := line.strip()):
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
    return images


def image_to_label_path(image: Path, label_dir: Path | None = None, source_dir: Path | None = None) -> Path:
    """The label file of an image.

    Without ``label_dir``: the last ``images`` folder in the path becomes ``labels`` and the suffix ``.txt``.
    With ``label_dir``: the image's path inside its source folder (or just its name) under ``label_dir``.
    """
    if label_dir is not None:
        relative = image.relative_to(source_dir) if source_dir is not None else Path(image.name)
        return (label_dir / relative).with_suffix(".txt")
    parts = list(image.parts)
    if "images" in parts[:-1]:
        last = len(parts) - 2 - parts[:-1][::-1].index("images")
        parts[last] = "labels"
    return Path(*parts).with_suffix(".txt")


# --------------------------------------------------------------------------------------------------------------------
# Reading images


def reduction_factor(original_long_side: int, size: int) -> int:
    """The largest JPEG decode reduction (1, 2, 4, 8) that still leaves the long side at least ``size``.

    Decoding at 1/2, 1/4 or 1/8 (:func:`detector.data.media.read_image`'s ``reduce``) is faster than a full decode
    followed by a resize, and the resize to ``size`` that follows then only shrinks by less than 2x.
    """
    for factor in (8, 4, 2):
        if original_long_side // factor >= size:
            return factor
    return 1


def resize_long_side(image: np.ndarray, size: int, *, fast: bool = False) -> np.ndarray:
    """Resize so the longer side is ``size``: INTER_AREA when shrinking (no aliasing), INTER_LINEAR to enlarge.

    ``fast`` shrinks with INTER_LINEAR too (YOLOv5's choice for training): 5-8x cheaper than INTER_AREA at
    ratios between 1/2 and 1 - a third of the loader's CPU time at --img 320 - and augmentation resamples the
    image again anyway. Validation keeps INTER_AREA.
    """
    height, width = image.shape[:2]
    new_height, new_width = long_side_shape((height, width), size)
    if (new_height, new_width) == (height, width):
        return image
    interpolation = cv2.INTER_AREA if size < max(height, width) and not fast else cv2.INTER_LINEAR
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)


def long_side_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """(height, width) of an image of ``shape`` (height, width) once :func:`resize_long_side` has resized it."""
    height, width = shape
    ratio = size / max(height, width)
    if ratio == 1:
        return height, width
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ImageStore:
    """Images and labels of a dataset, read and resized on demand, optionally cached.

    ``load_image(i)`` returns the image resized so its long side is ``imgsz``, or at its original size with
    ``full_resolution`` (tiled training, which cuts its own tiles: :mod:`detector.data.tiles`). ``cache="ram"``
    keeps those arrays in memory (refused with a warning when they would not fit); ``cache="disk"`` keeps each decoded
    original as ``.npy`` beside its image, which loads faster than decoding a JPEG (not in a read-only folder:
    images there load uncached). ``segments`` are the scan's outlines (:attr:`ScanResult.segments`), handed
    to copy-paste by :meth:`load_polygons`. As a :class:`~detector.data.augment.PictureSource` it also tells an
    image's size and boxes before decoding it (:meth:`load_layout`, from the scanned size) and decodes it unresized
    (:meth:`load_unresized`), for the fused mosaic.
    """

    def __init__(
        self,
        im_files: list[str],
        labels: list[np.ndarray],
        shapes: np.ndarray,
        imgsz: int,
        *,
        segments: list[list[np.ndarray]] | None = None,
        cache: str = "",
        fast_resize: bool = False,
        full_resolution: bool = False,
        prefix: str = "",
    ) -> None:
        if cache not in ("", "ram", "disk"):
            raise DataError(f"--cache {cache!r}: expected 'ram', 'disk' or nothing")
        self.im_files = im_files
        self.labels = labels
        self.segments = segments if segments is not None else [[] for _ in im_files]
        self.shapes = shapes  # (N, 2) original width, height: picks the JPEG decode reduction
        self.fast_resize = fast_resize
        self.full_resolution = full_resolution  # images as decoded, no resize to imgsz (--train-tile)
        self.imgsz = imgsz
        self.prefix = prefix
        self.cache = cache
        self.ram: list[np.ndarray] = []  # resized images when cache == "ram" (and they fit)
        # Added to image i's class ids by load_sample: marks the rows of pseudo-labelled images (--unlabeled) so the
        # mark travels through every augmentation with its row (see YOLODataset.set_pseudo_labels).
        self.class_offset = np.zeros(len(im_files), np.int64)
        if cache == "ram":
            self._fill_ram_cache()
        elif cache == "disk":
            self._fill_disk_cache()

    def __len__(self) -> int:
        return len(self.im_files)

    def load_image(self, index: int) -> np.ndarray:
        """Image ``index`` as (h, w, 3) uint8 BGR with max(h, w) == imgsz (its original size: full_resolution)."""
        if self.ram:
            return self.ram[index]
        return self._resize(self._decode(index))

    def load_sample(self, index: int) -> Sample:
        """Image ``index`` resized (long side imgsz) with its boxes as xyxy pixels of that image."""
        image = self.load_image(index)
        return Sample.create(image, *self._boxes(index, image.shape[:2]))

    def load_layout(self, index: int) -> PictureLayout:
        """:meth:`load_sample`'s image size, boxes and classes, from the scanned size without decoding."""
        if self.ram:
            shape = self.ram[index].shape[:2]
        else:
            width, height = (int(v) for v in self.shapes[index])
            if self.cache != "disk":  # the disk cache holds full-size pixels
                width, height = read_size(self.im_files[index], (width, height), reduce=self._reduction(index))
            shape = (height, width) if self.full_resolution else long_side_shape((height, width), self.imgsz)
        return PictureLayout(shape, *self._boxes(index, shape))

    def load_unresized(
        self, index: int, min_side: int, region: tuple[float, float, float, float] | None = None
    ) -> ImageRegion:
        """Image ``index`` before :meth:`load_image` resizes it (the RAM cache's image when there is one): a JPEG
        decoded at 1/2, 1/4 or 1/8 of its size (DCT scaling) where its long side stays at least
        ``min(min_side, imgsz)``, and only the part that covers ``region`` where libjpeg-turbo can
        (:func:`~detector.data.media.read_image_region`). For :class:`~detector.data.augment.MosaicWarp`, which
        resamples it once, straight into the output."""
        if self.ram or self.cache == "disk":
            image = self.ram[index] if self.ram else self._decode(index, min(min_side, self.imgsz))
            return ImageRegion(image, (0, 0), (image.shape[1], image.shape[0]))
        reduce = self._reduction(index, min(min_side, self.imgsz))
        return read_image_region(self.im_files[index], reduce=reduce, region=region)

    def _boxes(self, index: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        labels = self.labels[index]
        height, width = shape
        boxes = np.asarray(xywhn2xyxy(labels[:, 1:5], width, height), np.float32).reshape(-1, 4)
        return boxes, np.asarray(labels[:, 0] + self.class_offset[index], np.int64).reshape(-1)

    def load_polygons(self, index: int) -> list[np.ndarray | None]:
        """For each box of :meth:`load_sample`, its outline (k, 2) float32 xy normalised to 0-1, or None (a box)."""
        outlines = self.segments[index]
        if not outlines:
            return [None] * len(self.labels[index])
        return [outline if len(outline) else None for outline in outlines]

    def _resize(self, image: np.ndarray) -> np.ndarray:
        if self.full_resolution:
            return image
        return resize_long_side(image, self.imgsz, fast=self.fast_resize)

    def _reduction(self, index: int, size: int | None = None) -> int:
        """The JPEG decode reduction of image ``index`` for a long side of ``size`` (default imgsz)."""
        if self.full_resolution:
            return 1
        return reduction_factor(int(self.shapes[index].max()), size or self.imgsz)

    def _decode(self, index: int, size: int | None = None) -> np.ndarray:
        path = self.im_files[index]
        if self.cache == "disk":
            npy = Path(path).with_suffix(".npy")
            try:
                # Full resolution: memory-mapped, so a tile reads only its own rows, not the whole image.
                return np.load(npy, allow_pickle=False, mmap_mode="r" if self.full_resolution else None)
            except (OSError, ValueError):
                pass  # not written (read-only folder) or damaged: decode the image instead
        return read_image(path, reduce=self._reduction(index, size))

    def _fill_ram_cache(self) -> None:
        needed = self._estimate_ram_bytes()
        available = available_memory()
        if needed * RAM_CACHE_SAFETY > available:
            LOGGER.warning(
                "%sWARNING: --cache ram refused: %d images at %s need about %.1f GB (measured) but only %.1f GB "
                "is free; loading continues without a cache (try --cache disk)",
                self.prefix,
                len(self),
                "full resolution (--train-tile)" if self.full_resolution else f"{self.imgsz} px",
                needed / 1e9,
                available / 1e9,
            )
            return
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = pool.map(lambda i: self._resize(self._decode(i)), range(len(self)))
            self.ram = list(tqdm(images, total=len(self), desc=f"{self.prefix}Caching images (RAM)", leave=False))
        total = sum(image.nbytes for image in self.ram)
        LOGGER.info("%sCached %d images in RAM (%.2f GB)", self.prefix, len(self), total / 1e9)

    def _estimate_ram_bytes(self) -> int:
        """Bytes of all resized (or full-resolution) images, extrapolated from decoding an even spread of up to 30."""
        count = min(len(self), RAM_CACHE_SAMPLE)
        picks = np.linspace(0, len(self) - 1, count).round().astype(int)
        sampled = sum(self._resize(self._decode(int(i))).nbytes for i in picks)
        return math.ceil(sampled / count * len(self))

    def _fill_disk_cache(self) -> None:
        written = 0
        for path in tqdm(self.im_files, desc=f"{self.prefix}Caching images (disk)", leave=False):
            npy = Path(path).with_suffix(".npy")
            if npy.is_file():
                continue
            if not folder_is_writable(npy.parent):
                LOGGER.warning(
                    "%sWARNING: --cache disk: %s is read-only; images load uncached", self.prefix, npy.parent
                )
                self.cache = ""
                return
            try:
                image = read_image(path)  # full size, so the cache serves any --img
                atomic_write(npy, lambda f, image=image: np.save(f, image, allow_pickle=False))
                written += 1
            except OSError as e:
                LOGGER.warning(
                    "%sWARNING: --cache disk cannot write %s (%s); images load uncached", self.prefix, npy, e
                )
                self.cache = ""
                return
        LOGGER.info("%sDisk cache: %d new .npy files beside the images", self.prefix, written)


class SubsetSource:
    """The images of a :class:`~detector.data.augment.SampleSource` that the mixing steps (mosaic, copy-paste, mixup,
    CutMix) draw: all of them (``indices`` None), or only ``indices`` - e.g. not the ``--unlabeled`` images before
    their first pseudo-labels, whose objects would otherwise enter other samples as background."""

    def __init__(self, source: SampleSource, indices: np.ndarray | None = None) -> None:
        self.source = source
        self.indices = indices

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def load_sample(self, index: int) -> Sample:
        return self.source.load_sample(self._index(index))

    def load_polygons(self, index: int) -> list[np.ndarray | None]:
        return self.source.load_polygons(self._index(index))

    def _index(self, index: int) -> int:
        return index if self.indices is None else int(self.indices[index])

    @staticmethod
    def of(source: SampleSource, indices: np.ndarray | None = None) -> SubsetSource:
        """A subset of ``source``; a :class:`~detector.data.augment.PictureSource` when ``source`` is one."""
        return (
            SubsetPictureSource(source, indices) if isinstance(source, PictureSource) else SubsetSource(source, indices)
        )


class SubsetPictureSource(SubsetSource):
    """A :class:`SubsetSource` of a :class:`~detector.data.augment.PictureSource`, which it is too."""

    source: PictureSource

    def load_layout(self, index: int) -> PictureLayout:
        return self.source.load_layout(self._index(index))

    def load_unresized(
        self, index: int, min_side: int, region: tuple[float, float, float, float] | None = None
    ) -> ImageRegion:
        return self.source.load_unresized(self._index(index), min_side, region)


# --------------------------------------------------------------------------------------------------------------------
# Dataset


ITEM_THREADS = 4  # at most, for __getitems__ in the main process
ItemKey = int | tuple[int, int] | tuple[int, int, bool] | tuple[int, int, bool, int]


def _parse_key(key: ItemKey) -> tuple[int, int | None, bool, int]:
    """An item key as (index, seed or None, closed-mosaic phase, pseudo-label generation); missing parts default."""
    parts = key if isinstance(key, tuple) else (key,)
    return (*parts, *(None, None, False, 0)[len(parts) :])


class YOLODataset(Dataset):
    """Images with YOLO labels, as ``(image uint8 (3, H, W) RGB, labels (n, 6), path, shapes)`` items.

    ``labels`` rows are ``[0, class, x, y, w, h]`` normalised to the returned image (the collate fills column 0);
    ``shapes`` is ``((h0, w0), ((h / h0, w / w0), (pad_w, pad_h)))`` or None when augmented. An item is fetched by
    index, or by ``(index, seed)`` from :class:`~detector.data.loader.DetectionSampler` so that augmentation
    depends on the seed only, not on worker count or order. Without a seed, index ``i`` uses seed ``(seed, i)``.
    ``train_tile`` > 0 (training only, not with ``rect``) makes each item a random tile of that many pixels of
    the full-resolution image instead of the whole image shrunk to ``imgsz`` (:mod:`detector.data.tiles`).
    ``augment_on_device`` (``--augment-on-device``) leaves the last steps, HSV and flips, to the trainer's
    :class:`~detector.data.device_augment.DeviceAugment`.

    ``unlabeled`` (``--unlabeled``; not with ``rect``) adds images without labels after the labelled ones
    (``unlabeled`` mask): they get their labels from :meth:`set_pseudo_labels` (:mod:`detector.engine.pseudo`), and
    until then the mixing steps do not draw them (the sampler's ``drawable`` mask keeps them out of the epoch). An
    item key may carry a pseudo-label generation (``(index, seed, closed, generation)``): a dataset copy in a
    persistent worker that holds an older generation first reloads the labels from ``pseudo_source``.

    Attributes for other components: ``im_files``, ``label_files``, ``labels`` (list of (n, 5) float32
    ``[class, xywhn]``), ``segments`` (per image: [] or one (k, 2) outline per label row, see
    :attr:`~detector.data.scan.ScanResult.segments`), ``shapes`` ((N, 2) int64 original width, height),
    ``batch_shapes``/``batch_index`` (rect), ``train_tile`` (0, or the tile side: training sees the original pixels
    scaled by ``imgsz / train_tile``, not the image shrunk to ``imgsz``).

    The scan cache goes where :func:`~detector.data.scan.label_cache_path` says: beside the label folder when
    that place is writable, else (or always, with ``cache_dir``) in ``cache_dir`` or the user cache folder.
    """

    def __init__(
        self,
        sources: SourceSpec,
        *,
        imgsz: int = 640,
        batch_size: int = 16,
        stride: int = 32,
        hyp: Hyperparameters | None = None,
        augment: bool = False,
        rect: bool = False,
        pad: float = 0.0,
        cache: str = "",
        num_classes: int | None = None,
        single_cls: bool = False,
        label_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        workers: int = 8,
        seed: int = 0,
        prefix: str = "",
        auto_augment: str = "",
        train_tile: int = 0,
        unlabeled: SourceSpec | None = None,
        augment_on_device: bool = False,
    ) -> None:
        if train_tile and (rect or not augment):
            raise ValueError("train_tile is for augmented square training: it needs augment=True and rect=False")
        if unlabeled and rect:
            raise ValueError("unlabeled images cannot join rect batches (their batch shapes follow the image order)")
        self.imgsz = imgsz
        self.stride = stride
        self.augment = augment
        self.rect = rect
        self.train_tile = train_tile  # tile side in original pixels (0 = whole images); tiles are scaled to imgsz
        self.seed = seed
        self.prefix = prefix
        self.hyp = hyp or Hyperparameters()
        self.num_classes = 1 if single_cls else num_classes

        label_root = Path(label_dir).expanduser() if label_dir else None
        pairs = find_images(sources)
        im_files = [str(image) for image, _ in pairs]
        label_files = [str(image_to_label_path(image, label_root, folder)) for image, folder in pairs]
        scan = scan_dataset(
            im_files,
            label_files,
            num_classes=None if single_cls else num_classes,
            cache_path=label_cache_path(Path(label_files[0]).parent, cache_dir),
            workers=workers,
            prefix=prefix,
        )
        if not scan.im_files:
            raise DataError(f"{sources}: none of the {len(im_files)} images is usable (see the warnings above)")
        self.im_files = scan.im_files
        self.label_files = scan.label_files
        self.shapes = scan.shapes
        self.labels = [labels.copy() for labels in scan.labels]
        self.segments = scan.segments
        if single_cls:
            for labels in self.labels:
                labels[:, 0] = 0
        self._check_any_labels(label_files[0], label_root, augment)
        self.unlabeled = np.zeros(len(self.im_files), bool)  # per image: from ``unlabeled`` (pseudo-labels only)
        if unlabeled:
            self._add_unlabeled(unlabeled, workers)
        # Set by the pseudo-labeller: the generation of the labels held, and where a worker reloads newer ones.
        self.pseudo_generation = 0
        # Threads making a batch's items in the main process (__getitems__); 1 makes them one by one.
        self.item_threads = min(ITEM_THREADS, usable_cpus())
        self._pool: ThreadPoolExecutor | None = None
        self.pseudo_source: Callable[[], tuple[int, Mapping[str, np.ndarray]]] | None = None

        self.batch_shapes = np.zeros((0, 2), np.int64)
        self.batch_index = np.zeros(len(self.im_files), np.int64)
        if rect:
            self._sort_for_rect(batch_size, pad)
        self.store = ImageStore(
            self.im_files,
            self.labels,
            self.shapes,
            imgsz,
            segments=self.segments,
            cache=cache,
            fast_resize=augment,
            full_resolution=train_tile > 0,
            prefix=prefix,
        )
        # The store, not the dataset, is the mosaic/copy-paste/mixup source: no reference cycle, so the cache is freed
        # as soon as the dataset is, not at some later garbage collection.
        self.tiles = None
        if train_tile > 0:
            self.tiles = TileSource(self.store, train_tile, imgsz, min_visibility=self.hyp.min_visibility)
        source = self.store if self.tiles is None else self.tiles
        # Mixing steps draw from the store (or its tiles) itself; with --unlabeled, only from the labelled images
        # until the first pseudo-labels.
        self.donors = SubsetSource.of(source, np.flatnonzero(~self.unlabeled)) if self.unlabeled.any() else source
        self.transforms = self.closed_transforms = None
        if augment:
            self.transforms = build_train_transforms(
                self.hyp, imgsz, self.donors, rect=rect, auto_augment=auto_augment, on_device=augment_on_device
            )
            self.closed_transforms = build_train_transforms(
                close_mosaic_hyp(self.hyp), imgsz, self.donors, rect=rect, on_device=augment_on_device
            )

    def __len__(self) -> int:
        return len(self.im_files)

    def __getitems__(self, keys: Sequence[ItemKey]) -> list[tuple[torch.Tensor, torch.Tensor, str, tuple | None]]:
        """A batch's items (the DataLoader's batched fetch). In the main process (``--workers 0``) they are made on
        up to ``item_threads`` threads: JPEG decoding and OpenCV's kernels release the GIL, so a 2-core machine
        builds two items at once. Each item draws from its own generator, seeded by its key, so the batch is the one
        made item by item. Worker processes (one core each already), and tiled training (its tile source binds one
        generator at a time), go item by item."""
        pool = self._item_pool()
        if pool is None or len(keys) < 2:
            return [self[key] for key in keys]
        newest = max(_parse_key(key)[3] for key in keys)
        if newest > self.pseudo_generation:
            self._reload_pseudo_labels(newest)  # once, before the threads read the labels
        return list(pool.map(self.__getitem__, keys))

    def _item_pool(self) -> ThreadPoolExecutor | None:
        if self.item_threads < 2 or self.tiles is not None or torch.utils.data.get_worker_info() is not None:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.item_threads, thread_name_prefix="dataset-items")
        return self._pool

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # threads do not travel to worker processes

    def __getitem__(self, key: ItemKey) -> tuple[torch.Tensor, torch.Tensor, str, tuple | None]:
        index, item_seed, closed, generation = _parse_key(key)
        if generation > self.pseudo_generation:  # a key without one (0) takes the labels held
            self._reload_pseudo_labels(generation)
        if self.tiles is not None:
            return self._tiled_item(index, item_seed, closed)
        transforms = self.closed_transforms if closed else self.transforms
        if self.augment and not self.rect:  # square training: the transforms read the image (only if they show it)
            rng = np.random.default_rng(item_seed if item_seed is not None else (self.seed, index))
            sample = transforms.apply_to_index(self.store, index, rng)
            return (*self._to_tensors(sample), self.im_files[index], None)
        # Validation and rectangular batches: letterboxed to the batch's shape, then augmented (rect training).
        sample = self.store.load_sample(index)
        target = tuple(self.batch_shapes[self.batch_index[index]]) if self.rect else (self.imgsz, self.imgsz)
        original_h, original_w = (int(v) for v in self.shapes[index][::-1])
        resized_h, resized_w = sample.image.shape[:2]
        sample, info = letterbox_sample(sample, target, scaleup=self.augment)
        ratio = (resized_h / original_h * info.ratio[0], resized_w / original_w * info.ratio[1])
        shapes = ((original_h, original_w), (ratio, info.pad))
        if transforms is not None:
            rng = np.random.default_rng(item_seed if item_seed is not None else (self.seed, index))
            sample = transforms(sample, rng)
        return (*self._to_tensors(sample), self.im_files[index], shapes)

    def _tiled_item(
        self, index: int, item_seed: int | None, closed: bool
    ) -> tuple[torch.Tensor, torch.Tensor, str, None]:
        """A training item under ``train_tile``: a tile of image ``index`` through the transforms; this tile and
        every tile the mixing steps draw are placed with the item's own generator."""
        rng = np.random.default_rng(item_seed if item_seed is not None else (self.seed, index))
        transforms = self.closed_transforms if closed else self.transforms
        with self.tiles.drawing_from(rng):
            sample = transforms(self.tiles.load_sample(index), rng)
        return (*self._to_tensors(sample), self.im_files[index], None)

    def set_pseudo_labels(self, generation: int, labels: Mapping[str, np.ndarray]) -> None:
        """Labels for the ``unlabeled`` images, by image path: (n, 5) ``[class, xywhn]`` rows (an image not in
        ``labels`` has none), held as generation ``generation``. Their samples carry each class as
        ``class + num_classes``, the mark by which the trainer gives pseudo-labels their loss weight; from now on
        the mixing steps draw every image."""
        if self.num_classes is None:
            raise ValueError("pseudo-labels need the dataset's num_classes (class names) to mark their rows")
        empty = np.zeros((0, 5), np.float32)
        for index in np.flatnonzero(self.unlabeled):
            rows = np.asarray(labels.get(self.im_files[index], empty), np.float32).reshape(-1, 5)
            if len(rows) and (rows[:, 0].min() < 0 or rows[:, 0].max() >= self.num_classes):
                raise ValueError(f"pseudo-labels of {self.im_files[index]}: class ids outside 0-{self.num_classes - 1}")
            self.labels[index] = rows  # the store shares this list
            self.store.class_offset[index] = self.num_classes
        if isinstance(self.donors, SubsetSource):
            self.donors.indices = None  # labelled now: the mixing steps may draw them
        self.pseudo_generation = generation

    def _reload_pseudo_labels(self, generation: int) -> None:
        """An item asked for pseudo-label generation ``generation``: take the current ones from ``pseudo_source``."""
        if self.pseudo_source is None:
            raise RuntimeError(f"item of pseudo-label generation {generation}, but the dataset has no pseudo_source")
        current, labels = self.pseudo_source()
        if current < generation:
            raise RuntimeError(f"pseudo-label generation {generation} asked for, but the source holds {current}")
        self.set_pseudo_labels(current, labels)

    def _add_unlabeled(self, sources: SourceSpec, workers: int) -> None:
        """Append the images of ``sources`` (:func:`find_images`'s sources, or a glob pattern) without labels; an
        image already among the labelled ones is skipped, unreadable ones with a warning, as the scan does."""
        if isinstance(sources, str) and any(char in sources for char in "*?["):
            pattern = sources
            matches = glob.glob(os.path.expanduser(pattern), recursive=True)
            sources = sorted(p for p in matches if p.lower().endswith(IMAGE_SUFFIXES))
            if not sources:
                raise DataError(f"--unlabeled {pattern}: no image files match")
        labelled = {os.path.realpath(f) for f in self.im_files}
        candidates = [str(p) for p, _ in find_images(sources) if os.path.realpath(p) not in labelled]
        with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1, 8))) as pool:
            checked = list(pool.map(check_image, candidates))
        files, shapes = [], []
        for path, (shape_wh, problem, notes) in zip(candidates, checked, strict=True):
            for message in [*notes, *([f"{path}: {problem}; image skipped"] if problem else [])]:
                LOGGER.warning("%sWARNING: %s", self.prefix, message)
            if not problem:
                files.append(path)
                shapes.append(shape_wh)
        if not files:
            raise DataError(f"--unlabeled {sources}: no usable images that are not already labelled training images")
        LOGGER.info("%s%d unlabelled images join the training set (pseudo-labelled)", self.prefix, len(files))
        self.im_files += files
        self.label_files += [""] * len(files)  # none: their labels come from the pseudo-labeller
        self.labels += [np.zeros((0, 5), np.float32) for _ in files]
        self.segments += [[] for _ in files]
        self.shapes = np.concatenate([self.shapes, np.array(shapes, np.int64).reshape(-1, 2)])
        self.unlabeled = np.concatenate([self.unlabeled, np.ones(len(files), bool)])

    def _to_tensors(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        image = sample.image
        height, width = image.shape[:2]
        # One pass writes BGR (H, W, 3) as contiguous RGB (3, H, W): stacking permuted views instead is ~100x
        # slower in torch.stack, and the channel swap comes free with the split.
        chw = np.empty((3, height, width), np.uint8)
        cv2.split(image, [chw[2], chw[1], chw[0]])
        boxes = sample.boxes_xyxy.copy()
        np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
        labels = np.zeros((len(boxes), 6), np.float32)
        if len(boxes):
            labels[:, 1] = sample.classes
            labels[:, 2:] = xyxy2xywhn(boxes, width, height)
        return torch.from_numpy(chw), torch.from_numpy(labels)

    def _check_any_labels(self, first_label_file: str, label_root: Path | None, augment: bool) -> None:
        if any(len(labels) for labels in self.labels):
            return
        label_folder = label_root or Path(first_label_file).parent
        json_files = _nearby_json_files(label_folder)
        # The converter writes <out_dir>/labels/<split>/, so the dataset root as out_dir fills this very folder.
        splits_match = json_files and json_files[0].stem.removeprefix("instances_") == label_folder.name
        out_dir = label_folder.parent.parent if splits_match else "<out_dir>"
        hint = (
            f"; found COCO-style JSON {json_files[0]}: convert it with "
            f"`python -m detector.cli.convert coco {json_files[0]} {out_dir}`"
            if json_files
            else "; labels in COCO JSON can be converted with `python -m detector.cli.convert coco <json> <out_dir>`"
        )
        message = (
            f"{self.prefix}0 labels found for {len(self)} images: expected YOLO .txt files such as "
            f"{first_label_file} (rows: class x_center y_center width height, normalised){hint}"
        )
        if augment:
            raise DataError(message)
        LOGGER.warning("WARNING: %s", message)

    def _sort_for_rect(self, batch_size: int, pad: float) -> None:
        """Order images by aspect ratio and give each batch the smallest stride-multiple shape that fits."""
        aspect = self.shapes[:, 1] / self.shapes[:, 0]  # height / width
        order = np.argsort(aspect, kind="stable")
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.segments = [self.segments[i] for i in order]
        self.shapes = self.shapes[order]
        aspect = aspect[order]
        self.batch_index = np.arange(len(aspect)) // batch_size
        shapes = []
        for batch in range(int(self.batch_index[-1]) + 1):
            batch_aspect = aspect[self.batch_index == batch]
            low, high = batch_aspect.min(), batch_aspect.max()
            if high < 1:  # all landscape: full width, height of the tallest
                relative = (high, 1.0)
            elif low > 1:  # all portrait: full height, width of the widest
                relative = (1.0, 1.0 / low)
            else:
                relative = (1.0, 1.0)
            shapes.append(relative)
        relative_shapes = np.array(shapes, np.float64)
        self.batch_shapes = (np.ceil(relative_shapes * self.imgsz / self.stride + pad) * self.stride).astype(np.int64)


# Off in the close-mosaic phase (--close-mosaic): the augmentations that build images unlike the test images.
CLOSE_MOSAIC_OFF = ("mosaic", "mosaic9", "mixup", "cutmix", "copy_paste", "cutout", "gridmask")


def close_mosaic_hyp(hyp: Hyperparameters) -> Hyperparameters:
    """The hyperparameters of the close-mosaic phase: ``hyp`` with the mosaic and every mixing or erasing
    augmentation off (and, by the dataset, no auto-augment policy); flips, colour and the affine jitter stay, so
    the last epochs see whole images at the test resolution, as FixRes (Touvron et al. 2019) and YOLOX advise."""
    return dataclasses.replace(hyp, **dict.fromkeys(CLOSE_MOSAIC_OFF, 0.0))


def _nearby_json_files(label_folder: Path) -> list[Path]:
    """JSON files where COCO-style datasets keep annotations: beside the label folder, one level up, and in an
    ``annotations`` folder at either place (e.g. coco/annotations/ for coco/labels/train2017)."""
    found = []
    for base in (label_folder.parent, label_folder.parent.parent):
        found += sorted(base.glob("*.json")) + sorted(base.glob("annotations/*.json"))
    return found
