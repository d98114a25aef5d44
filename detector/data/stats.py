"""Dataset statistics plot ``labels.jpg``: class histogram, box outlines, box centres and box sizes.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch, no display needed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

LOGGER = logging.getLogger(__name__)

MAX_OUTLINES = 1000  # box outlines drawn in the overlay panel; more only darkens it
MAX_NAMED_CLASSES = 30  # beyond this the class axis shows indices only


def label_statistics(labels: Sequence[np.ndarray] | np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Counts per class (num_classes,) and all boxes (M, 4) xywhn from (n, 5) ``[class, xywhn]`` label arrays."""
    stacked = _stack(labels)
    counts = np.bincount(stacked[:, 0].astype(np.int64), minlength=num_classes)[:num_classes]
    return {"counts": counts, "boxes_xywhn": stacked[:, 1:5]}


def plot_labels(labels: Sequence[np.ndarray] | np.ndarray, names: Sequence[str], save_dir: str | Path) -> Path:
    """Save ``save_dir/labels.jpg`` for (n, 5) ``[class, x, y, w, h]`` normalised labels; returns its path.

    Panels: instances per class; up to 1000 box outlines centred on one point (typical shapes); 2D histograms
    of box centres (x, y) and of box sizes (width, height), all in image-relative units.
    """
    stats = label_statistics(labels, len(names))
    counts, boxes = stats["counts"], stats["boxes_xywhn"]
    figure = Figure(figsize=(9, 9), tight_layout=True)
    FigureCanvasAgg(figure)
    class_axis, outline_axis, centre_axis, size_axis = figure.subplots(2, 2).ravel()

    colours = _class_colours(len(names))
    class_axis.bar(np.arange(len(names)), counts, color=colours[: len(names)])
    class_axis.set_ylabel("instances")
    class_axis.set_title(f"{int(counts.sum())} boxes in {len(names)} classes")
    if len(names) <= MAX_NAMED_CLASSES:
        class_axis.set_xticks(np.arange(len(names)), [str(n) for n in names], rotation=90, fontsize=8)
    else:
        class_axis.set_xlabel("class index")

    _draw_outlines(outline_axis, boxes[:MAX_OUTLINES], _stack(labels)[:MAX_OUTLINES, 0], colours)
    _histogram(centre_axis, boxes[:, 0], boxes[:, 1], ("x", "y"), "box centres")
    centre_axis.invert_yaxis()  # image convention: y grows downwards
    _histogram(size_axis, boxes[:, 2], boxes[:, 3], ("width", "height"), "box sizes")

    path = Path(save_dir) / "labels.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    LOGGER.info("Label statistics saved to %s", path)
    return path


def _stack(labels: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        return labels.reshape(-1, 5).astype(np.float32)
    parts = [np.asarray(lb, np.float32).reshape(-1, 5) for lb in labels]
    return np.concatenate(parts) if parts else np.zeros((0, 5), np.float32)


def _class_colours(count: int) -> np.ndarray:
    return np.array(
        [
            (0.1 + 0.8 * ((i * 0.61803) % 1.0), 0.35 + 0.3 * (i % 3) / 2, 0.85 - 0.5 * (i % 5) / 4, 1.0)
            for i in range(max(count, 1))
        ]
    )


def _draw_outlines(axis, boxes_xywhn: np.ndarray, classes: np.ndarray, colours: np.ndarray) -> None:
    half_w, half_h = boxes_xywhn[:, 2] / 2, boxes_xywhn[:, 3] / 2
    corners_x = np.stack([-half_w, half_w, half_w, -half_w, -half_w], axis=1) + 0.5
    corners_y = np.stack([-half_h, -half_h, half_h, half_h, -half_h], axis=1) + 0.5
    segments = np.stack([corners_x, corners_y], axis=2)
    axis.add_collection(
        LineCollection(segments, colors=colours[classes.astype(np.int64) % len(colours)], linewidths=0.5, alpha=0.5)
    )
    axis.set_xlim(0, 1)
    axis.set_ylim(1, 0)
    axis.set_aspect("equal")
    axis.set_title("box shapes (centred)")
    axis.set_xticks([])
    axis.set_yticks([])


def _histogram(axis, x: np.ndarray, y: np.ndarray, axis_names: tuple[str, str], title: str) -> None:
    axis.hist2d(x, y, bins=50, range=[[0, 1], [0, 1]], cmap="Blues", cmin=1)
    axis.set_xlabel(axis_names[0])
    axis.set_ylabel(axis_names[1])
    axis.set_title(title)
    axis.set_aspect("equal")
