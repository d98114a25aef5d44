"""AutoAnchor: check that a model's anchors fit a dataset's boxes, and fit new ones when they do not.

A box fits an anchor when both its width and height are within a factor ``thr`` of the anchor's (the rule the
loss uses to match targets, ``anchor_t``). The best possible recall (BPR) is the fraction of boxes that fit at
least one anchor. When BPR < 0.98, new anchors are fitted: k-means on the whitened box sizes, then a genetic
search that mutates the anchors and keeps a mutation when it raises the fitness (the mean over boxes of the best
anchor's ratio, counting only boxes that fit). The result replaces the model's anchors only if its BPR is higher.

Box sizes are the dataset's normalised labels scaled to ``imgsz`` by each image's letterbox (long side =
``imgsz``), as the model sees them at training time. Every random draw comes from one seeded generator, so a
run is reproducible.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.cluster.vq import kmeans
from torch import nn
from tqdm import tqdm

from detector.models.yolo import detect_head

LOGGER = logging.getLogger(__name__)

BPR_TARGET = 0.98  # anchors are refitted below this best possible recall
MIN_BOX_PIXELS = 2.0  # boxes smaller than this on both sides carry no size information for k-means
SIZE_JITTER = (0.9, 1.1)  # random scale of each image's boxes in the BPR check, as training's scale augmentation
MUTATION_PROBABILITY = 0.9
MUTATION_SIGMA = 0.1
SINGLE_THREAD_ELEMENTS = 4_000_000  # evolution problems smaller than this (boxes x 2 x anchors) run on one thread


class AnchorMetrics(NamedTuple):
    """How well anchors fit a set of boxes: ``bpr`` fraction of boxes that fit some anchor (0-1), ``anchors_above``
    mean number of anchors each box fits, ``fitness`` mean best-anchor ratio over the boxes that fit."""

    bpr: float
    anchors_above: float
    fitness: float


def _log_sizes(boxes_wh: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(boxes_wh, dtype=np.float32)).clamp(min=1e-9).log()


def _fit_ratios(log_wh: torch.Tensor, anchors_wh: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, K) worst-side size ratio in (0, 1] of every box to every anchor: ``min(r, 1/r)`` over w and h.

    In log space ``min(r, 1/r) = exp(-|log w - log a|)``, which needs no divisions in the evolution's hot loop.
    """
    log_anchors = _log_sizes(anchors_wh)
    distance = (log_wh[:, None, :] - log_anchors[None]).abs().amax(dim=2)
    return torch.exp(-distance)


def anchor_metrics(
    anchors_wh: np.ndarray | torch.Tensor, boxes_wh: np.ndarray | torch.Tensor, thr: float
) -> AnchorMetrics:
    """BPR, anchors per box and fitness of (K, 2) anchors for (N, 2) box sizes, both (w, h) in pixels."""
    return _metrics(_log_sizes(boxes_wh), anchors_wh, thr)


def _fitness(log_wh: torch.Tensor, anchors_wh: np.ndarray, thr: float) -> float:
    """Mean over boxes of the best anchor's ratio, 0 for boxes that fit no anchor (the evolution's objective)."""
    best = _fit_ratios(log_wh, anchors_wh).amax(dim=1)
    return (best * (best > 1.0 / thr)).mean().item()


def _metrics(log_wh: torch.Tensor, anchors_wh: np.ndarray | torch.Tensor, thr: float) -> AnchorMetrics:
    ratios = _fit_ratios(log_wh, anchors_wh)
    best = ratios.amax(dim=1)
    fits = best > 1.0 / thr
    return AnchorMetrics(
        bpr=fits.float().mean().item(),
        anchors_above=(ratios > 1.0 / thr).float().sum(dim=1).mean().item(),
        fitness=(best * fits).mean().item(),
    )


def dataset_box_sizes(dataset: Any, imgsz: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(N, 2) float32 (w, h) in pixels of every labelled box, each image letterboxed to long side ``imgsz``.

    ``dataset`` needs ``labels`` (list of (n, 5) arrays [class, x, y, w, h] normalised) and ``shapes`` ((images, 2)
    original width, height). With ``rng``, each image's boxes are scaled by a factor drawn from U(0.9, 1.1).
    A dataset with ``train_tile`` > 0 (``--train-tile``) trains on tiles of the original pixels scaled by
    ``imgsz / train_tile``, so its boxes are sized by that factor instead of by the letterbox of the whole image.
    """
    shapes = np.asarray(dataset.shapes, dtype=np.float64).reshape(-1, 2)
    if len(shapes) != len(dataset.labels):
        raise ValueError(f"dataset has {len(dataset.labels)} label arrays but {len(shapes)} image shapes")
    tile = int(getattr(dataset, "train_tile", 0) or 0)
    letterboxed = shapes * imgsz / tile if tile > 0 else imgsz * shapes / shapes.max(axis=1, keepdims=True)
    if rng is not None:
        letterboxed = letterboxed * rng.uniform(*SIZE_JITTER, size=(len(shapes), 1))
    sizes = [
        np.asarray(labels, dtype=np.float64).reshape(-1, 5)[:, 3:5] * shape
        for shape, labels in zip(letterboxed, dataset.labels, strict=True)
    ]
    return np.concatenate(sizes, axis=0).astype(np.float32) if sizes else np.zeros((0, 2), np.float32)


def kmean_anchors(
    dataset: Any,
    n: int = 9,
    imgsz: int = 640,
    thr: float = 4.0,
    generations: int = 1000,
    *,
    seed: int = 0,
    verbose: bool = True,
) -> np.ndarray:
    """Fit ``n`` anchors to a dataset's boxes: k-means, then genetic evolution of the fitness.

    dataset: as for :func:`dataset_box_sizes`, or an (N, 2) array of box (w, h) in pixels at ``imgsz``.
    Returns float32 (n, 2) anchors (w, h) in pixels, sorted by area (small first).
    """
    rng = np.random.default_rng(seed)
    all_sizes = (
        np.asarray(dataset, np.float32)
        if isinstance(dataset, (np.ndarray, torch.Tensor))
        else dataset_box_sizes(dataset, imgsz)
    )
    tiny = int((all_sizes < 3.0).any(axis=1).sum())
    if tiny:
        LOGGER.warning("AutoAnchor: %d of %d labels are smaller than 3 pixels on a side", tiny, len(all_sizes))
    sizes = all_sizes[(all_sizes >= MIN_BOX_PIXELS).any(axis=1)]
    anchors = _kmeans_anchors(sizes, n, imgsz, rng)

    anchors = _evolve(anchors, _log_sizes(sizes), thr, generations, rng, verbose)
    anchors = _sort_by_area(anchors).astype(np.float32)
    if verbose:
        metrics = _metrics(_log_sizes(all_sizes), anchors, thr)
        LOGGER.info(
            "AutoAnchor: thr=%.2f: %.4f best possible recall, %.2f anchors past thr; anchors %s",
            1.0 / thr,
            metrics.bpr,
            metrics.anchors_above,
            ", ".join(f"{w:.0f},{h:.0f}" for w, h in anchors),
        )
    return anchors


def _evolve(
    anchors: np.ndarray, log_wh: torch.Tensor, thr: float, generations: int, rng: np.random.Generator, verbose: bool
) -> np.ndarray:
    """Mutate the anchors ``generations`` times, keeping each mutation that raises the fitness."""
    # Each generation is a handful of small tensor ops: below a few million elements one thread is several times
    # faster than waking a thread pool for every op (10-30x on a busy 2-core machine).
    threads = torch.get_num_threads()
    if log_wh.numel() * len(anchors) < SINGLE_THREAD_ELEMENTS:
        torch.set_num_threads(1)
    try:
        fitness = _fitness(log_wh, anchors, thr)
        progress = tqdm(range(generations), desc="AutoAnchor evolving anchors", disable=not verbose, leave=False)
        for _ in progress:
            candidate = (anchors * _mutation(anchors.shape, rng)).clip(min=MIN_BOX_PIXELS)
            candidate_fitness = _fitness(log_wh, candidate, thr)
            if candidate_fitness > fitness:
                fitness, anchors = candidate_fitness, candidate
                progress.set_description(f"AutoAnchor evolving anchors: fitness {fitness:.4f}", refresh=False)
    finally:
        torch.set_num_threads(threads)
    return anchors


def _kmeans_anchors(sizes: np.ndarray, n: int, imgsz: int, rng: np.random.Generator) -> np.ndarray:
    """k-means centres of the whitened sizes (each side divided by its standard deviation), back in pixels."""
    if n <= len(sizes):
        std = sizes.std(axis=0)
        std[std == 0] = 1.0  # all boxes one size on a side: whitening by 1 keeps k-means defined
        centres, _ = kmeans(sizes / std, n, iter=30, seed=rng)
        if len(centres) == n:
            return _sort_by_area(centres * std)
    LOGGER.warning(
        "AutoAnchor: k-means found fewer than %d anchors in %d boxes; starting from random anchors", n, len(sizes)
    )
    return _sort_by_area(np.sort(rng.random(n * 2)).reshape(n, 2) * imgsz)


def _mutation(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Multiplicative noise: each value mutates with probability 0.9 by a normal step of a random size (at most
    ``MUTATION_SIGMA``), factors clipped to [0.3, 3]; redrawn until something changes."""
    while True:
        mutate = rng.random(shape) < MUTATION_PROBABILITY
        factors = (mutate * rng.random() * rng.standard_normal(shape) * MUTATION_SIGMA + 1).clip(0.3, 3.0)
        if (factors != 1).any():
            return factors


def _sort_by_area(anchors: np.ndarray) -> np.ndarray:
    return anchors[np.argsort(anchors.prod(axis=1))]


def check_anchors(
    dataset: Any,
    model: nn.Module,
    thr: float = 4.0,
    imgsz: int = 640,
    *,
    generations: int = 1000,
    seed: int = 0,
) -> bool:
    """Refit the model's anchors when their best possible recall on the dataset is below 0.98.

    model: DetectionModel (or DDP-wrapped, or its Detect head) with ``anchors`` (nl, na, 2) in grid units and
    ``stride`` (nl,). New anchors are sorted by area and given to the levels in order of increasing stride, and
    are written into the ``anchors`` buffer in place only if their BPR beats the current anchors'.
    Under DDP call it on rank 0 before wrapping; DDP broadcasts buffers from rank 0.
    Returns True when the anchors were replaced.
    """
    head = detect_head(model)
    rng = np.random.default_rng(seed)
    sizes = dataset_box_sizes(dataset, imgsz, rng)
    if len(sizes) == 0:
        LOGGER.warning("AutoAnchor: the dataset has no labelled boxes; keeping the model's anchors")
        return False
    stride = head.stride.detach().to(head.anchors.device, torch.float32).view(-1, 1, 1)
    current = (head.anchors.detach().float() * stride).reshape(-1, 2).cpu()
    metrics = anchor_metrics(current, sizes, thr)
    summary = f"{metrics.anchors_above:.2f} anchors/target, {metrics.bpr:.3f} best possible recall (BPR)"
    if metrics.bpr > BPR_TARGET:
        LOGGER.info("AutoAnchor: %s. Current anchors are a good fit to the dataset", summary)
        return False

    LOGGER.info("AutoAnchor: %s. Anchors are a poor fit to the dataset, fitting new anchors...", summary)
    # Fitted on the boxes without jitter, judged on the same jittered boxes as the current anchors (as YOLOv5).
    anchors = kmean_anchors(dataset, n=current.shape[0], imgsz=imgsz, thr=thr, generations=generations, seed=seed)
    new_bpr = anchor_metrics(anchors, sizes, thr).bpr
    if new_bpr <= metrics.bpr:
        LOGGER.info("AutoAnchor: new anchors (BPR %.3f) are not better; keeping the original anchors", new_bpr)
        return False
    _write_anchors(head, anchors)
    LOGGER.info(
        "AutoAnchor: BPR %.3f -> %.3f; new anchors saved to the model (update the model YAML to reuse them)",
        metrics.bpr,
        new_bpr,
    )
    return True


def _write_anchors(head: nn.Module, anchors_px: np.ndarray) -> None:
    """Put area-sorted pixel anchors into ``head.anchors`` (grid units), smallest on the smallest stride."""
    num_levels = head.anchors.shape[0]
    levels = torch.as_tensor(anchors_px, dtype=torch.float32).view(num_levels, -1, 2)
    stride = head.stride.detach().float().cpu()
    order = torch.argsort(stride)  # the level with the smallest stride gets the smallest anchors
    by_level = torch.empty_like(levels)
    by_level[order] = levels
    with torch.no_grad():
        head.anchors.copy_((by_level / stride.view(-1, 1, 1)).to(head.anchors))
    if not math.isfinite(float(head.anchors.sum())):
        raise RuntimeError("AutoAnchor produced non-finite anchors")  # a bug here, not user input
