"""Class and image weights from label frequencies (``--image-weights`` sampling and the loss's class weights).

A class seen rarely gets a large weight (inverse frequency); an image's weight is the sum of its objects' class
weights, so images with rare classes are drawn more often. After each validation, classes the model already
detects well (high per-class mAP) are down-weighted by ``(1 - mAP)^2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def class_counts(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Objects per class over all images: (num_classes,) int64. ``labels`` are (n, 5) ``[class, xywhn]`` arrays."""
    classes = np.concatenate([np.asarray(lb)[:, 0] for lb in labels]) if len(labels) else np.zeros(0)
    return np.bincount(classes.astype(np.int64), minlength=num_classes)[:num_classes]


def labels_to_class_weights(labels: Sequence[np.ndarray], num_classes: int = 80) -> torch.Tensor:
    """Inverse class frequencies normalised to sum to 1: (num_classes,) float32 tensor.

    A class with no objects is treated as if it had one, so it gets the largest weight instead of infinity.
    """
    counts = class_counts(labels, num_classes).astype(np.float64)
    counts[counts == 0] = 1
    weights = 1.0 / counts
    return torch.from_numpy(weights / weights.sum()).float()


def labels_to_image_weights(
    labels: Sequence[np.ndarray], num_classes: int = 80, class_weights: np.ndarray | None = None
) -> np.ndarray:
    """Per-image sampling weights (N,) float64: the sum of the class weights of each image's objects.

    ``class_weights`` defaults to ones. A background image gets weight 0 (it is never drawn by weighted
    sampling, as in YOLOv5).
    """
    weights = np.ones(num_classes) if class_weights is None else np.asarray(class_weights, np.float64)
    per_image_counts = np.zeros((len(labels), num_classes), np.float64)
    for index, image_labels in enumerate(labels):
        classes = np.asarray(image_labels)[:, 0].astype(np.int64)
        per_image_counts[index] = np.bincount(classes, minlength=num_classes)[:num_classes]
    return per_image_counts @ weights


def repeat_factors(labels: Sequence[np.ndarray], num_classes: int, threshold: float) -> np.ndarray:
    """Per-image sampling weights (N,) float64: repeat-factor sampling (LVIS, Gupta et al. 2019; ``--class-balanced``).

    A class found in a fraction ``f`` of the images gets the factor ``max(1, sqrt(threshold / f))``: classes in
    fewer than ``threshold`` of the images are drawn more often, the others as usual. An image's factor is the
    largest of its classes' factors; an image without objects keeps 1 (it is still drawn, unlike ``--image-weights``).
    """
    images_with = np.zeros(num_classes, np.float64)
    image_classes = []
    for image_labels in labels:
        classes = np.unique(np.asarray(image_labels)[:, 0].astype(np.int64)) if len(image_labels) else np.array([], int)
        classes = classes[classes < num_classes]
        images_with[classes] += 1
        image_classes.append(classes)
    fraction = images_with / max(len(labels), 1)
    with np.errstate(divide="ignore"):
        class_factors = np.maximum(1.0, np.sqrt(threshold / fraction))  # a class in no image: never looked up
    return np.array([class_factors[classes].max(initial=1.0) for classes in image_classes], np.float64)


def reweight_by_map(class_weights: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Class weights after a validation: ``class_weights * (1 - per-class mAP)^2 / num_classes``.

    ``maps`` (num_classes,) holds each class's mAP@0.5:0.95 from the last validation; classes the model
    already finds get drawn less. Pass the result to :func:`labels_to_image_weights`.
    """
    class_weights = np.asarray(class_weights, np.float64)
    maps = np.clip(np.asarray(maps, np.float64), 0.0, 1.0)
    return class_weights * (1.0 - maps) ** 2 / len(class_weights)
