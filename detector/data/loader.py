"""DataLoader construction: sampler (shuffle, image weights, DDP), collates and worker settings.

Reproducibility: :class:`DetectionSampler` draws, from ``(seed, epoch)``, both the order of the images and one
augmentation seed per item, and hands ``(index, seed)`` pairs to the dataset. The batches therefore depend on the
seed and epoch only, the same with 0 or 8 workers and on every DDP rank.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from detector.config import Hyperparameters
from detector.data.dataset import SourceSpec, YOLODataset
from detector.data.shared_batches import BatchSlots, SlotImages, by_value
from detector.data.weights import labels_to_class_weights, labels_to_image_weights, repeat_factors
from detector.utils.memory import keep_freed_memory
from detector.utils.torch_utils import usable_cpus

LOGGER = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple]


class DetectionSampler(Sampler[tuple[int, int]]):
    """Yields ``(image index, augmentation seed)`` for this rank; call :meth:`set_epoch` before each epoch.

    Every rank draws the same full list from ``(seed, epoch)`` - a permutation, or with image weights a
    weighted draw with replacement - pads it to a multiple of ``world_size`` and keeps every ``world_size``-th
    entry starting at its rank, like ``torch.utils.data.DistributedSampler``.

    Repeated augmentation (``repeats`` K > 1, Hoffer et al. 2020; DeiT's RASampler): the list holds the first N / K
    draws K times each, in a row, each with its own augmentation seed, so one batch sees K augmentations of an
    image and an epoch stays N items long. Under DDP the K copies are dealt to consecutive ranks (each process's
    batch holds different images, the global batch holds all K copies), as DeiT does.
    After :meth:`set_closed` the items are ``(index, seed, True)``: the close-mosaic phase. After
    :meth:`set_generation` they are ``(index, seed, closed, generation)``: the pseudo-label generation the dataset
    must hold (a persistent worker's copy reloads newer labels). :meth:`set_drawable` restricts the draws to some
    images (e.g. not the unlabelled ones before their first pseudo-labels); the epoch keeps its length, drawing them
    in as many fresh permutations as it takes.
    """

    def __init__(
        self,
        num_images: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = -1,
        world_size: int = 1,
        image_weights: np.ndarray | None = None,
        repeats: int = 1,
    ) -> None:
        if rank >= world_size:
            raise ValueError(f"rank {rank} must be below world_size {world_size}")
        if repeats < 1:
            raise ValueError(f"repeats must be 1 or more, got {repeats}")
        self.num_images = num_images
        self.repeats = repeats
        self.closed = False  # close-mosaic phase: items carry a flag asking the dataset for its lighter transforms
        self.generation = 0  # pseudo-label generation: items carry it when > 0 (see set_generation)
        self.drawable: np.ndarray | None = None  # (N,) bool: the images an epoch draws from; None = all
        self.shuffle = shuffle
        self.seed = seed
        self.rank = max(rank, 0)
        self.world_size = world_size if rank >= 0 else 1
        self.epoch = 0
        self.image_weights: np.ndarray | None = None
        if image_weights is not None:
            self.set_image_weights(image_weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_closed(self, closed: bool) -> None:
        """From now on, ask the dataset for its close-mosaic transforms (no mosaic or mixing; ``--close-mosaic``).
        The sampler runs in the main process, so the flag reaches persistent workers with every item."""
        self.closed = closed

    def set_generation(self, generation: int) -> None:
        """From now on, items ask the dataset for pseudo-label generation ``generation``; runs in the main process,
        so the number reaches persistent workers with every item (their dataset copies reload on a change)."""
        self.generation = generation

    def set_drawable(self, drawable: np.ndarray | None) -> None:
        """Draw the epoch only from the images where ``drawable`` (N,) is true (None = all); the epoch stays
        ``num_images`` items long."""
        if drawable is not None:
            drawable = np.asarray(drawable, bool).reshape(-1)
            if len(drawable) != self.num_images or not drawable.any():
                raise ValueError(f"drawable must be {self.num_images} flags, some true; got {drawable.sum()} true")
            if self.image_weights is not None:
                raise ValueError("drawable images and image weights are two sampling schemes; choose one")
        self.drawable = drawable

    def set_image_weights(self, weights: np.ndarray) -> None:
        """Sample images with probability proportional to ``weights`` (N,) from now on.

        Under DDP the weights of rank 0 are broadcast, so all ranks draw the same list even if their
        per-class mAP came from different processes.
        """
        if self.drawable is not None:
            raise ValueError("image weights and drawable images are two sampling schemes; choose one")
        weights = np.asarray(weights, np.float64).reshape(-1)
        if len(weights) != self.num_images or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError(f"image weights must be {self.num_images} finite values >= 0, got shape {weights.shape}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shared = [weights]  # broadcast_object_list works with NCCL too, where a CPU tensor broadcast would not
            torch.distributed.broadcast_object_list(shared, src=0)
            weights = shared[0]
        total = weights.sum()
        self.image_weights = weights / total if total > 0 else None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.image_weights is not None:
            order = rng.choice(self.num_images, size=self.num_images, replace=True, p=self.image_weights)
        elif self.drawable is not None:  # as many passes over the drawable images as fill the epoch
            pool = np.flatnonzero(self.drawable)
            passes = -(-self.num_images // len(pool))
            order = np.concatenate([rng.permutation(pool) if self.shuffle else pool for _ in range(passes)])
            order = order[: self.num_images]
        elif self.shuffle:
            order = rng.permutation(self.num_images)
        else:
            order = np.arange(self.num_images)
        if self.repeats > 1:  # the first ceil(N / K) draws, each K times in a row: an epoch stays N items long
            order = np.repeat(order[: -(-len(order) // self.repeats)], self.repeats)[: len(order)]
        item_seeds = rng.integers(0, 2**63 - 1, size=len(order), dtype=np.int64)
        padded = self._per_rank * self.world_size
        if padded > len(order):  # repeat from the start so each rank gets the same number of items
            repeat = np.resize(np.arange(len(order)), padded)
            order, item_seeds = order[repeat], item_seeds[repeat]
        mine = slice(self.rank, padded, self.world_size)
        items = zip(order[mine].tolist(), item_seeds[mine].tolist(), strict=True)
        closed, generation = self.closed, self.generation  # fixed for the epoch, even if changed while it runs
        if generation:
            return ((index, seed, closed, generation) for index, seed in items)
        return ((index, seed, True) for index, seed in items) if closed else iter(items)

    @property
    def _per_rank(self) -> int:
        return -(-self.num_images // self.world_size)

    def __len__(self) -> int:
        return self._per_rank


def collate_fn(batch: Sequence[tuple], slots: BatchSlots | None = None) -> Batch:
    """Stack items: ``(images (B, 3, H, W) uint8, targets (N, 6) [image_index, class, x, y, w, h], paths, shapes)``.

    In a loader worker with ``slots`` the images go into one of the worker's shared-memory slots and the targets
    travel by value (:mod:`detector.data.shared_batches`); the main process receives the same tensors.
    """
    images, targets, paths, shapes = _collate(batch)
    return _stack(images, slots), by_value(targets), paths, shapes


def _stack(images: Sequence[torch.Tensor], slots: BatchSlots | None) -> torch.Tensor | SlotImages:
    """The uint8 batch; with ``slots``, in a worker, a :class:`SlotImages` that arrives in the main process as the
    tensor (see :func:`collate_fn`)."""
    arrays = [image.numpy() for image in images]
    # NumPy's single-threaded copy: torch.stack's thread pool stalls for 100s of ms on a busy CPU.
    return slots.stack(arrays) if slots is not None else torch.from_numpy(np.stack(arrays))


def _collate(batch: Sequence[tuple]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, tuple, tuple]:
    """The items' images (unstacked), their targets with the image index filled in, paths and shapes."""
    images, labels, paths, shapes = zip(*batch, strict=True)
    for index, image_labels in enumerate(labels):
        image_labels[:, 0] = index
    return images, torch.cat(labels), tuple(paths), tuple(shapes)


def collate_quad(batch: Sequence[tuple], slots: BatchSlots | None = None) -> Batch:
    """YOLOv5's ``--quad``: every 4 items become 1 image of twice the size (batch B -> B // 4).

    Either the first of the four is upscaled 2x (labels unchanged, being normalised), or the four are tiled
    2x2 (item 0 top-left, 1 bottom-left, 2 top-right, 3 bottom-right; labels halved and shifted).
    Leftover items beyond a multiple of 4 are dropped. The choice uses torch's RNG (seeded per worker).
    ``slots``: as for :func:`collate_fn`.
    """
    images, targets, paths, shapes = _collate(batch)
    count = len(images) // 4
    offsets = torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.5, 0.0], [0.5, 0.5]])  # (x, y) of each tile
    quad_images, quad_labels = [], []
    for quad in range(count):
        first = 4 * quad
        if torch.rand(1).item() < 0.5:
            upscaled = F.interpolate(images[first][None].float(), scale_factor=2.0, mode="bilinear")
            quad_images.append(upscaled[0].round_().clamp_(0, 255).to(torch.uint8))
            labels = targets[targets[:, 0] == first].clone()
        else:
            top = torch.cat((images[first], images[first + 1]), dim=1)
            bottom = torch.cat((images[first + 2], images[first + 3]), dim=1)
            quad_images.append(torch.cat((top, bottom), dim=2))
            parts = []
            for tile in range(4):
                labels = targets[targets[:, 0] == first + tile].clone()
                labels[:, 2:] *= 0.5
                labels[:, 2:4] += offsets[tile]
                parts.append(labels)
            labels = torch.cat(parts)
        labels[:, 0] = quad
        quad_labels.append(labels)
    return (
        _stack(quad_images, slots),
        by_value(torch.cat(quad_labels) if quad_labels else targets[:0]),
        paths[: 4 * count : 4],
        shapes[: 4 * count : 4],
    )


def same_shape_batches(
    group_index: np.ndarray, group_shapes: np.ndarray, batch_size: int, length: int
) -> list[list[int]]:
    """Batches of consecutive indices whose letterbox shapes are equal, each at most ``batch_size`` long.

    ``group_index[i]`` is image i's shape group and ``group_shapes[g]`` that group's (h, w); without rect shapes
    (``group_shapes`` empty) every image has the same shape and this is plain sequential batching.
    """
    batches: list[list[int]] = []
    previous_shape = None
    for index in range(length):
        shape = tuple(group_shapes[group_index[index]]) if len(group_shapes) else None
        if not batches or len(batches[-1]) == batch_size or shape != previous_shape:
            batches.append([])
        batches[-1].append(index)
        previous_shape = shape
    return batches


def _seed_worker(worker_id: int) -> None:
    """Set up a worker: seed NumPy/random from torch's per-worker seed (only the quad collate uses an RNG), one
    OpenCV thread (the workers are the parallelism), and a malloc that keeps the memory it frees."""
    cv2.setNumThreads(0)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    keep_freed_memory()


def worker_count(requested: int, batch_size: int, world_size: int = 1) -> int:
    """Workers per process: at most ``requested``, the CPUs per process (of those this process may run on) and the
    batch size (0 = main process)."""
    cpus = usable_cpus() // max(world_size, 1)
    return max(0, min(requested, cpus, batch_size if batch_size > 1 else 0))


def batch_slots(dataset: YOLODataset, batch_size: int, workers: int) -> BatchSlots | None:
    """Shared-memory slots for the workers' batches (:mod:`detector.data.shared_batches`), each the size of the
    largest batch the dataset can make (with ``rect``, its largest letterbox shape); None without workers."""
    if workers == 0:
        return None
    areas = dataset.batch_shapes.prod(1) if dataset.rect and len(dataset.batch_shapes) else [dataset.imgsz**2]
    return BatchSlots(workers, capacity=batch_size * 3 * int(max(areas)))


def create_dataloader(
    sources: SourceSpec,
    *,
    imgsz: int,
    batch_size: int,
    stride: int = 32,
    hyp: Hyperparameters | None = None,
    augment: bool = False,
    cache: str = "",
    pad: float = 0.0,
    rect: bool = False,
    rank: int = -1,
    world_size: int | None = None,
    workers: int = 8,
    image_weights: bool = False,
    class_balanced: float = 0.0,
    repeat_aug: int = 1,
    auto_augment: str = "",
    quad: bool = False,
    prefix: str = "",
    shuffle: bool = False,
    seed: int = 0,
    names: Sequence[str] | None = None,
    num_classes: int | None = None,
    single_cls: bool = False,
    label_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    train_tile: int = 0,
    unlabeled: SourceSpec | None = None,
    augment_on_device: bool = False,
) -> tuple[DataLoader, YOLODataset]:
    """A DataLoader over a :class:`YOLODataset` and the dataset itself.

    ``rank`` >= 0 splits the images between DDP processes (``world_size`` defaults to torch.distributed's).
    ``batch_size`` is per process. Workers stay alive across epochs and hand their batches over in shared-memory
    slots (:func:`batch_slots`); memory is pinned when CUDA is present.
    ``image_weights`` starts from inverse class frequencies; update with ``loader.sampler.set_image_weights``.
    ``class_balanced`` > 0 draws images by their repeat factors (:func:`~detector.data.weights.repeat_factors`).
    ``repeat_aug`` K > 1 puts K differently augmented copies of each drawn image in a batch (see the sampler);
    ``auto_augment`` names an automatic augmentation policy (:mod:`detector.data.policies`).
    ``cache_dir`` (``--cache-dir``; None or "" = automatic) is where the label scan cache goes; see
    :func:`detector.data.scan.label_cache_path`.
    ``train_tile`` > 0 (``--train-tile``) trains on random tiles of that size cut from the full-resolution images
    (:mod:`detector.data.tiles`).
    ``unlabeled`` (``--unlabeled``) adds images without labels; the sampler leaves them out until they have
    pseudo-labels (:mod:`detector.engine.pseudo` calls ``sampler.set_drawable(None)`` and ``set_generation``).
    ``augment_on_device`` (``--augment-on-device``) leaves HSV and flips to the training step
    (:mod:`detector.data.device_augment`).
    """
    # Parallelism comes from the workers; OpenCV's own thread pool on top oversubscribes the CPU.
    cv2.setNumThreads(0)
    if rect and shuffle:
        LOGGER.warning("%sWARNING: --rect is incompatible with shuffling; shuffle turned off", prefix)
        shuffle = False
    dataset = YOLODataset(
        sources,
        imgsz=imgsz,
        batch_size=batch_size,
        stride=stride,
        hyp=hyp,
        augment=augment,
        rect=rect,
        pad=pad,
        cache=cache,
        num_classes=len(names) if names is not None else num_classes,
        single_cls=single_cls,
        label_dir=label_dir,
        cache_dir=cache_dir,
        workers=workers,
        seed=seed,
        prefix=prefix,
        auto_augment=auto_augment,
        train_tile=train_tile,
        unlabeled=unlabeled,
        augment_on_device=augment_on_device,
    )
    if world_size is None:
        distributed = rank >= 0 and torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = torch.distributed.get_world_size() if distributed else 1
    if image_weights and class_balanced:
        raise ValueError("image_weights and class_balanced are two sampling schemes; choose one")
    weights = None
    largest_class = max((int(lb[:, 0].max()) for lb in dataset.labels if len(lb)), default=0)
    class_count = dataset.num_classes if dataset.num_classes is not None else largest_class + 1
    if image_weights:
        class_weights = labels_to_class_weights(dataset.labels, class_count).numpy()
        weights = labels_to_image_weights(dataset.labels, class_count, class_weights)
    elif class_balanced:
        weights = repeat_factors(dataset.labels, class_count, class_balanced)
    sampler = DetectionSampler(
        len(dataset),
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        image_weights=weights,
        repeats=repeat_aug,
    )
    if dataset.unlabeled.any():
        sampler.set_drawable(~dataset.unlabeled)
    num_workers = worker_count(workers, batch_size, world_size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=functools.partial(
            collate_quad if quad else collate_fn, slots=batch_slots(dataset, batch_size, num_workers)
        ),
        persistent_workers=num_workers > 0,  # reuse workers across epochs instead of forking new ones
        worker_init_fn=_seed_worker,
        generator=generator,
    )
    return loader, dataset
