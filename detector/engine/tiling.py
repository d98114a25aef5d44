"""Tiled (sliced) inference: detect small objects in images much larger than the network input.

An image is cut into overlapping ``size`` x ``size`` tiles (:func:`tile_grid`), each tile is predicted at the
model's input size like any image (letterboxed, tiles batched together), the boxes are moved back to the
original image's pixels, and the detections of all tiles (plus, optionally, of the downscaled whole image, for
objects larger than a tile) are merged (:func:`merge_detections`):

- ``nms``: of boxes of one class that match, only the highest-scoring survives (:func:`nms_merge`);
- ``nmm``: greedy non-maximum merging as in SAHI: by descending score each surviving box absorbs the boxes of its
  class that match it and becomes their union box, keeping its own (the highest) score (:func:`nmm_merge`).

Boxes match when their IoU, or their ``ios`` (intersection over the smaller box's area, :func:`box_ios`), exceeds
a threshold. ``ios`` is what pairs a box cut at a tile border with the whole box of the neighbouring tile: the cut
piece lies (almost) inside it, so its IoU can be small while its IoS is close to 1.

SAHI's slicing utilities work on PIL images and its own prediction objects and bring in its dependencies; the
grid is a few lines and the merges are torchvision ops on tensors, so they live here instead of behind an extra.
:func:`predict_tiled` is the tiled prediction step, given its per-batch ``detect`` function by
:class:`~detector.engine.predictor.Predictor` (detect.py, the Python API, and val.py ``--tile`` through it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detector.errors import ConfigError
from detector.ops.boxes import box_area, box_intersection, box_iou
from detector.ops.torchvision_kernels import batched_nms
from detector.utils.checks import check_threshold

MIN_TILE = 32  # the largest stride of the YOLOv5 models: a smaller tile holds less than one output cell
TILES_PER_BATCH = 32  # tiles per backend call: bounds memory on huge images (32 tiles of 640 px = 157 MB float32)

DetectFunction = Callable[[Sequence[np.ndarray]], list[Tensor]]


@dataclass(frozen=True)
class TileOptions:
    """How to tile: ``size`` px square tiles overlapping by the fraction ``overlap`` of a tile; ``full`` also
    predicts on the whole (downscaled) image; ``merge`` "nms" or "nmm" with boxes matching when their ``match``
    ("iou" or "ios") exceeds ``match_thres``. Invalid values raise a one-line ConfigError naming the flag."""

    size: int
    overlap: float = 0.2
    full: bool = False
    merge: str = "nms"
    match: str = "ios"
    match_thres: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or int(self.size) != self.size or self.size < MIN_TILE:
            raise ConfigError(f"--tile must be a tile size of at least {MIN_TILE} pixels (0 = off), got {self.size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"--tile-overlap must be a fraction of the tile in [0, 1), got {self.overlap}")
        if self.merge not in MERGE_FUNCTIONS:
            raise ConfigError(f"--tile-merge must be one of {list(MERGE_FUNCTIONS)}, got {self.merge!r}")
        if self.match not in MATCH_FUNCTIONS:
            raise ConfigError(f"--tile-match must be one of {list(MATCH_FUNCTIONS)}, got {self.match!r}")
        check_threshold("--tile-match-thres", self.match_thres)

    @classmethod
    def from_config(cls, config: Any) -> TileOptions | None:
        """The options of a ValConfig/DetectConfig (its ``tile*`` fields), or None when ``tile`` is 0 (off)."""
        return cls.create(
            config.tile,
            overlap=config.tile_overlap,
            full=config.tile_full,
            merge=config.tile_merge,
            match=config.tile_match,
            match_thres=config.tile_match_thres,
        )

    @classmethod
    def create(cls, size: int, **options: Any) -> TileOptions | None:
        """TileOptions(size, **options), or None when ``size`` is 0 (tiling off)."""
        return None if size == 0 else cls(size, **options)


# --------------------------------------------------------------------------------------------------------------------
# The grid


def tile_starts(length: int, size: int, step: int) -> list[int]:
    """Start offsets of tiles of ``size`` along a side of ``length`` px, ``step`` apart; the last one is shifted
    back to end exactly at the border (so it overlaps its neighbour more). A side up to ``size`` is one tile."""
    if length <= size:
        return [0]
    return [*range(0, length - size, step), length - size]


def tile_grid(height: int, width: int, size: int, overlap: float = 0.2) -> Tensor:
    """Tile windows covering a ``height`` x ``width`` image: (N, 4) int64 xyxy pixels, row by row.

    Tiles are ``size`` x ``size`` and neighbours overlap by ``int(size * overlap)`` px (more at the last row and
    column, which end at the border). A side shorter than ``size`` gives tiles of that side's length: an image
    smaller than a tile is one tile, the whole image.
    """
    if size < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile size must be >= 1 and overlap in [0, 1), got {size} and {overlap}")
    step = size - int(size * overlap)
    windows = [
        (x, y, min(x + size, width), min(y + size, height))
        for y in tile_starts(height, size, step)
        for x in tile_starts(width, size, step)
    ]
    return torch.tensor(windows, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------------------
# Matching and merging


def box_ios(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise intersection over the smaller box's area of xyxy boxes: (N, 4) x (M, 4) -> (N, M) in [0, 1].

    1 when one box lies inside the other; 0 for disjoint boxes and for boxes of zero area.
    """
    intersection = box_intersection(boxes1_xyxy, boxes2_xyxy)
    area1, area2 = box_area(boxes1_xyxy), box_area(boxes2_xyxy)
    smaller = torch.min(area1[:, None], area2[None, :])
    return intersection / smaller.clamp(min=torch.finfo(smaller.dtype).tiny)


MATCH_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"iou": box_iou, "ios": box_ios}


def match_owners(
    boxes_xyxy: Tensor, scores: Tensor, groups: Tensor, match: str, thres: float, max_kept: int | None = None
) -> Tensor:
    """Greedy matching, the core of both merges: (N,) int64, for each box the index of the box that keeps it.

    In descending score order (ties: the earlier row first), a box not yet taken is kept (its own owner) and takes
    every not-yet-taken lower-scoring box of its group (class) whose ``match`` with it ("iou" or "ios") exceeds
    ``thres``. The kept boxes are exactly those greedy NMS keeps. With ``max_kept`` the search stops once that many
    boxes are kept; boxes it did not reach get owner -1 (what the first ``max_kept`` keep and take is unchanged,
    as it depends only on higher-scoring boxes). Each kept box is compared with the later boxes of its own group
    only: time grows with kept boxes x group size, memory linearly.
    """
    if match not in MATCH_FUNCTIONS:
        raise ValueError(f"match must be one of {list(MATCH_FUNCTIONS)}, got {match!r}")
    match_function = MATCH_FUNCTIONS[match]
    boxes, groups = boxes_xyxy.detach().cpu().double(), groups.cpu()
    order = torch.argsort(scores.detach().cpu(), descending=True, stable=True)
    owners = torch.full((len(boxes),), -1, dtype=torch.int64)
    taken = torch.zeros(len(boxes), dtype=torch.bool)
    is_taken = taken.numpy()  # the same memory: a fast per-box check in the Python loop
    members_of = {}  # group -> its boxes in descending score order
    position = torch.empty(len(boxes), dtype=torch.int64)  # of each box in its group's list
    for group in torch.unique(groups).tolist():
        members_of[group] = order[groups[order] == group]
        position[members_of[group]] = torch.arange(len(members_of[group]))
    group_of, position_of = groups.tolist(), position.tolist()
    kept = 0
    for i in order.tolist():
        if is_taken[i]:
            continue
        if max_kept is not None and kept == max_kept:
            break
        owners[i], kept = i, kept + 1
        candidates = members_of[group_of[i]][position_of[i] + 1 :]
        candidates = candidates[~taken[candidates]]
        if len(candidates):
            hits = candidates[match_function(boxes[i : i + 1], boxes[candidates])[0] > thres]
            taken[hits] = True
            owners[hits] = i
    return owners


def _groups(detections: Tensor, agnostic: bool) -> Tensor:
    return torch.zeros(len(detections), dtype=torch.int64) if agnostic else detections[:, 5].long()


def _by_score(detections: Tensor) -> Tensor:
    return detections[torch.argsort(detections[:, 4], descending=True, stable=True)]


def nms_merge(
    detections: Tensor, match: str = "ios", thres: float = 0.5, agnostic: bool = False, max_det: int | None = None
) -> Tensor:
    """Suppression across tiles: of boxes of one class matching above ``thres``, the highest-scoring survives.

    Args:
        detections: (N, 6) float ``[x1, y1, x2, y2, conf, class]`` in one image's pixels.
        match: "iou" (batched NMS) or "ios" (intersection over the smaller box).
        thres: boxes match when their IoU/IoS exceeds this.
        agnostic: match boxes of any classes, not only of the same class.
        max_det: keep at most this many (the most confident); None keeps all.

    Returns:
        (K, 6) the surviving rows, by descending confidence.
    """
    if match == "iou":
        groups = _groups(detections, agnostic).to(detections.device)
        return detections[batched_nms(detections[:, :4], detections[:, 4], groups, thres)][:max_det]
    owners = match_owners(detections[:, :4], detections[:, 4], _groups(detections, agnostic), match, thres, max_det)
    kept = (owners == torch.arange(len(owners))).nonzero().flatten().to(detections.device)
    return _by_score(detections[kept])


def nmm_merge(
    detections: Tensor, match: str = "ios", thres: float = 0.5, agnostic: bool = False, max_det: int | None = None
) -> Tensor:
    """Greedy non-maximum merging (SAHI's ``greedy_nmm``): by descending confidence, each box not yet merged
    absorbs the not-yet-merged boxes of its class matching it above ``thres`` and becomes their union box, with its
    own (the highest) confidence and class. Two pieces of one object cut at a tile border become one box.

    Matches are decided against the absorbing box as predicted (SAHI re-checks each against the growing union),
    so the result does not depend on the order of the absorbed boxes. Unions only grow: at a very low confidence
    threshold (val's 0.001) a confident box also absorbs the unlikely larger boxes around it; prefer nms there.

    Args and returns as :func:`nms_merge` (the surviving rows carry union boxes).
    """
    owners = match_owners(detections[:, :4], detections[:, 4], _groups(detections, agnostic), match, thres, max_det)
    owners = owners.to(detections.device)
    reached = owners >= 0
    index = owners[reached, None].expand(-1, 2)
    merged = detections.clone()
    merged[:, :2] = merged[:, :2].scatter_reduce(0, index, detections[reached, :2], "amin")
    merged[:, 2:4] = merged[:, 2:4].scatter_reduce(0, index, detections[reached, 2:4], "amax")
    kept = owners == torch.arange(len(owners), device=owners.device)
    return _by_score(merged[kept])


MERGE_FUNCTIONS: dict[str, Callable[..., Tensor]] = {"nms": nms_merge, "nmm": nmm_merge}


def merge_detections(
    detections: Tensor,
    merge: str = "nms",
    match: str = "ios",
    thres: float = 0.5,
    agnostic: bool = False,
    max_det: int | None = None,
) -> Tensor:
    """:func:`nms_merge` or :func:`nmm_merge` (``merge``) of (N, 6) detections -> (K, 6) by descending confidence,
    at most ``max_det`` of them."""
    if merge not in MERGE_FUNCTIONS:
        raise ValueError(f"merge must be one of {list(MERGE_FUNCTIONS)}, got {merge!r}")
    if len(detections) == 0:
        return detections
    return MERGE_FUNCTIONS[merge](detections, match, thres, agnostic, max_det)


# --------------------------------------------------------------------------------------------------------------------
# The tiled prediction step


def predict_tiled(
    image: np.ndarray,
    options: TileOptions,
    detect: DetectFunction,
    *,
    agnostic: bool = False,
    max_det: int = 1000,
    batch_size: int = TILES_PER_BATCH,
) -> Tensor:
    """Detections of one image predicted tile by tile: (n, 6) ``[x1, y1, x2, y2, conf, class]`` in its pixels.

    Args:
        image: (H, W, 3) uint8 BGR, at its original resolution.
        options: tile size, overlap, whole-image pass and merging.
        detect: ``detect(images) -> [(n_i, 6) detections in each image's own pixels]`` for a list of BGR images
            of one size, run as one batch (the caller letterboxes them to the model input and runs NMS per image).
        agnostic: merge boxes of different classes too (as ``--agnostic-nms``).
        max_det: the most detections kept after merging, highest confidence first.
        batch_size: tiles per ``detect`` call.

    Returns:
        (n, 6) merged detections by descending confidence, on ``detect``'s device.
    """
    height, width = image.shape[:2]
    windows = tile_grid(height, width, options.size, options.overlap)
    crops = [image[y1:y2, x1:x2] for x1, y1, x2, y2 in windows.tolist()]
    # The whole image goes first, so that the last batch the caller ran (and reports the shape of) holds tiles.
    found = detect([image]) if options.full and len(windows) > 1 else []
    for start in range(0, len(crops), batch_size):
        batch = slice(start, start + batch_size)
        for detections, (x1, y1, _, _) in zip(detect(crops[batch]), windows[batch].tolist(), strict=True):
            detections = detections.clone()
            detections[:, [0, 2]] += x1
            detections[:, [1, 3]] += y1
            found.append(detections)
    return merge_detections(torch.cat(found), options.merge, options.match, options.match_thres, agnostic, max_det)
