"""Every plot a run writes, in one place: metric curves and the confusion matrix (val), batch mosaics (train and
val), the label statistics (train), the image-size study (val --task study), feature maps (detect --visualize).

Matplotlib figures are built by ``*_figure`` functions that return the :class:`~matplotlib.figure.Figure`, so tests
can read back what is drawn, and saved by the ``plot_*`` functions. Each figure has its own Agg canvas
(:func:`new_figure`): no pyplot state, no global backend switch, no display needed, and matplotlib is imported
only when a figure is made (it is slow to import). Batch mosaics are drawn with OpenCV through
:mod:`detector.utils.drawing`, so their colours match detect.py's.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np

from detector.ops.metrics import CONFIDENCE_GRID, RECALL_THRESHOLDS, Metrics
from detector.utils.drawing import draw_detections

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LOGGER = logging.getLogger(__name__)

MAX_LEGEND_CLASSES = 20  # above this, per-class curves are drawn in grey without a legend entry each
MOSAIC_MAX_IMAGES = 16
MOSAIC_MAX_SIDE = 1920  # pixels: the whole mosaic is scaled to fit
PREDICTION_PLOT_CONF = 0.25  # prediction mosaics show boxes above this confidence, as detect.py would
CONFUSION_MIN_SHOWN = 0.005  # confusion-matrix cells below this are left blank
MAX_OUTLINES = 1000  # labels.jpg: box outlines drawn in the overlay panel; more only darkens it
MAX_NAMED_CLASSES = 30  # labels.jpg: beyond this the class axis shows indices only
FEATURE_MAPS_SHOWN = 32  # --visualize: channels drawn per layer (all are kept in the .npy), 8 a row
FEATURE_TILE_MIN_SIDE = 160  # --visualize: small maps are enlarged (nearest) to at least this many pixels

ConfidenceCurve = Literal["f1", "precision", "recall"]
_CURVE_LABELS: dict[str, str] = {"f1": "F1", "precision": "Precision", "recall": "Recall"}


# --------------------------------------------------------------------------------------------------------------------
# Figures


def new_figure(figsize: tuple[float, float], tight: bool = True) -> Figure:
    """An empty figure (inches) on its own Agg canvas; it needs no closing. ``tight`` lays it out when saved (one
    extra draw to measure the texts); without it the caller places the axes (``Figure.subplots_adjust``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, tight_layout=tight)
    FigureCanvasAgg(figure)
    return figure


@contextmanager
def drawn_alongside(draw: Callable[[], object]) -> Iterator[None]:
    """Calls ``draw`` (which saves its figures) in a forked child process while the ``with`` block draws others, so
    two figures are drawn at once: matplotlib draws on one core. On Linux with two or more CPUs, from a process
    that may have children (not a daemon); elsewhere, or when the child fails, ``draw`` runs here after the block.
    The child only writes files; nothing comes back."""
    from detector.utils.torch_utils import usable_cpus  # here: this module does not import torch otherwise

    child = None
    if sys.platform.startswith("linux") and usable_cpus() > 1 and not multiprocessing.current_process().daemon:
        child = multiprocessing.get_context("fork").Process(target=draw, name="plots", daemon=True)
        child.start()
    try:
        yield
    finally:
        if child is not None:
            child.join()
    if child is None or child.exitcode != 0:
        draw()


def save_figure(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``figure`` to ``path`` (format from the suffix), creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Training results (results.png)


def results_figure(rows: Sequence[dict[str, float]], panels: Sequence[Sequence[str]]) -> Figure:
    """results.png: a grid with one panel per column name in ``panels`` (one list per row of panels), each the
    column's value against ``epoch`` over ``rows`` (results.csv rows), with a smoothed trend from 5 epochs on."""
    columns = max(len(row) for row in panels)
    figure = new_figure((2.4 * columns, 3 * len(panels)))
    axes = figure.subplots(len(panels), columns, squeeze=False)
    epochs = np.array([row["epoch"] for row in rows], dtype=float)
    for axes_row, names in zip(axes, panels, strict=True):
        for ax, column in zip(axes_row, names, strict=False):
            values = np.array([row.get(column, np.nan) for row in rows], dtype=float)
            ax.plot(epochs, values, marker=".", linewidth=2, markersize=8, label="results")
            if len(values) >= 5:  # a smoothed trend helps read noisy per-epoch losses
                ax.plot(epochs, _smooth(values), ":", label="smooth", linewidth=2)
            ax.set_title(column, fontsize=12)
            ax.set_xlabel("epoch")
    axes.ravel()[1 if columns > 1 else 0].legend()
    return figure


def _smooth(values: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Box-filter smoothing over ~``fraction`` of the points (odd window), edges padded with edge values."""
    window = max(3, round(len(values) * fraction) // 2 * 2 + 1)
    padded = np.pad(values, window // 2, mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


# --------------------------------------------------------------------------------------------------------------------
# Validation metrics


def confusion_matrix_figure(matrix: np.ndarray, names: Sequence[str], normalize: bool = True) -> Figure:
    """A (nc + 1, nc + 1) confusion matrix (rows predicted, columns true, last = background) as a heat map.

    With ``normalize`` each column is divided by its total, so a column shows where the labels of one true class
    went (the diagonal is that class's recall at the matrix's thresholds). Cells below 0.005 are left blank; below
    30 classes each shown cell also carries its value as text.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if normalize:
        matrix = matrix / np.maximum(matrix.sum(0, keepdims=True), 1e-9)
    shown = np.where(matrix < CONFUSION_MIN_SHOWN, np.nan, matrix)
    num_classes = len(names)
    ticks = [*names, "background"]
    side = min(max(6.0, 0.3 * (num_classes + 1) + 3), 14.0)
    width, height = side, side * 0.85
    figure = new_figure((width, height), tight=False)  # margins from the names: tight layout costs a draw of them
    font_size = max(4.0, min(8.0, 400 / (num_classes + 1)))
    names_inches = max(map(len, ticks)) * font_size * 0.6 / 72 if num_classes < 100 else 0.0
    label_inches = names_inches + 0.7  # tick marks, pads, the axis title
    figure.subplots_adjust(left=label_inches / width, bottom=label_inches / height, right=0.98, top=1 - 0.45 / height)
    axes = figure.subplots()
    image = axes.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    if num_classes < 100:  # beyond that the names would overlap whatever their size
        axes.set_xticks(range(num_classes + 1), ticks, rotation=90, fontsize=font_size)
        axes.set_yticks(range(num_classes + 1), ticks, fontsize=font_size)
    if num_classes < 30:
        dark = 0.6 * np.nanmax(shown) if np.isfinite(shown).any() else 0.0
        for (row, column), value in np.ndenumerate(matrix):
            if value >= CONFUSION_MIN_SHOWN:
                text = f"{value:.2f}" if normalize else f"{int(value)}"
                color = "white" if value > dark else "black"
                axes.text(column, row, text, ha="center", va="center", fontsize=7, color=color)
    axes.set_xlabel("True")
    axes.set_ylabel("Predicted")
    # The axis titles at a fixed distance past the names: placing them automatically measures every tick label
    # again at each draw (80 classes: a quarter of the figure's time).
    from matplotlib.transforms import ScaledTranslation

    gap = (names_inches if num_classes < 100 else 0.3) + 0.15  # tick marks and pads, in inches
    axes.xaxis.set_label_coords(0.5, 0, axes.transAxes + ScaledTranslation(0, -gap, figure.dpi_scale_trans))
    axes.yaxis.set_label_coords(0, 0.5, axes.transAxes + ScaledTranslation(-gap, 0, figure.dpi_scale_trans))
    axes.set_title("Confusion Matrix" + (" (normalised by true class)" if normalize else ""))
    return figure


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], path: str | Path, normalize: bool = True) -> Path:
    """Save :func:`confusion_matrix_figure` to ``path``."""
    figure = confusion_matrix_figure(matrix, names, normalize)
    return save_figure(figure, path, dpi=150 if len(names) < 30 else 100)  # 80 classes at 150 dpi take seconds


def pr_curve_figure(metrics: Metrics) -> Figure:
    """Precision against recall at IoU 0.5 (``metrics.curves.pr_precision``), per class and their mean, with AP50
    in the legend."""
    figure = new_figure((9, 6))
    axes = figure.subplots()
    curves = metrics.curves
    if curves is not None and len(metrics.ap_class):
        labels = [f"{_name(metrics.names, cls)} {metrics.ap50[k]:.3f}" for k, cls in enumerate(metrics.ap_class)]
        _class_lines(axes, RECALL_THRESHOLDS, curves.pr_precision, labels)
        mean = curves.pr_precision.mean(0)
        axes.plot(RECALL_THRESHOLDS, mean, linewidth=3, color="blue", label=f"all classes {metrics.map50:.3f} mAP@0.5")
    axes.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall Curve")
    _legend(axes)
    return figure


def confidence_curve_figure(metrics: Metrics, which: ConfidenceCurve) -> Figure:
    """F1, precision or recall against the confidence threshold, per class and their mean; the legend gives the
    mean's value at ``metrics.best_conf`` (the threshold of best mean F1, where val reports P, R and F1)."""
    if which not in _CURVE_LABELS:
        raise ValueError(f"unknown curve {which!r}; expected one of {list(_CURVE_LABELS)}")
    ylabel = _CURVE_LABELS[which]
    figure = new_figure((9, 6))
    axes = figure.subplots()
    curves = metrics.curves
    if curves is not None and len(metrics.ap_class):
        values = getattr(curves, which)
        _class_lines(axes, CONFIDENCE_GRID, values, [_name(metrics.names, cls) for cls in metrics.ap_class])
        mean = values.mean(0)
        best = int(np.searchsorted(CONFIDENCE_GRID, metrics.best_conf))
        label = f"all classes {mean[best]:.2f} at {metrics.best_conf:.3f}"
        axes.plot(CONFIDENCE_GRID, mean, linewidth=3, color="blue", label=label)
    axes.set(xlabel="Confidence", ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01), title=f"{ylabel}-Confidence Curve")
    _legend(axes)
    return figure


def _class_lines(axes: Axes, x: np.ndarray, curves: np.ndarray, labels: Sequence[str]) -> None:
    """One line per class (rows of ``curves`` against ``x``), each in the legend up to MAX_LEGEND_CLASSES; beyond
    that all in grey as one collection (one artist instead of one per class: cheaper to draw)."""
    if len(labels) <= MAX_LEGEND_CLASSES:
        for values, label in zip(curves, labels, strict=True):
            axes.plot(x, values, linewidth=1, label=label)
        return
    from matplotlib.collections import LineCollection

    segments = np.stack([np.broadcast_to(x, curves.shape), curves], axis=-1)
    axes.add_collection(LineCollection(segments, linewidths=1, colors="grey"))


def plot_metrics_curves(metrics: Metrics, save_dir: str | Path) -> list[Path]:
    """PR_curve.png, F1_curve.png, P_curve.png, R_curve.png in ``save_dir``."""
    save_dir = Path(save_dir)
    paths = [save_figure(pr_curve_figure(metrics), save_dir / "PR_curve.png")]
    for which, file in (("f1", "F1_curve.png"), ("precision", "P_curve.png"), ("recall", "R_curve.png")):
        paths.append(save_figure(confidence_curve_figure(metrics, which), save_dir / file))
    return paths


def plot_study(
    sizes: Sequence[int],
    map50: Sequence[float],
    map50_95: Sequence[float],
    ms_per_image: Sequence[float],
    path: str | Path,
) -> Path:
    """--task study: mAP50 and mAP50-95 against image size, with inference time per image on a second axis."""
    figure = new_figure((8, 5))
    axes = figure.subplots()
    axes.plot(sizes, map50, "o-", label="mAP@0.5")
    axes.plot(sizes, map50_95, "s-", label="mAP@0.5:0.95")
    axes.set(xlabel="Image size (pixels)", ylabel="mAP", title="Accuracy and speed against inference size")
    axes.grid(alpha=0.3)
    speed_axes = axes.twinx()
    speed_axes.plot(sizes, ms_per_image, "^--", color="tab:red", label="ms / image")
    speed_axes.set_ylabel("Inference + NMS (ms per image)", color="tab:red")
    lines = axes.get_legend_handles_labels()
    speed_lines = speed_axes.get_legend_handles_labels()
    axes.legend(lines[0] + speed_lines[0], lines[1] + speed_lines[1], loc="lower right")
    return save_figure(figure, path)


# --------------------------------------------------------------------------------------------------------------------
# Batch mosaics (OpenCV)


def plot_batch(
    images: Sequence[np.ndarray],
    detections: Sequence[np.ndarray],
    names: Sequence[str],
    path: str | Path,
    paths: Sequence[str] = (),
    min_conf: float = 0.0,
    show_conf: bool = True,
) -> Path:
    """Save a mosaic of up to 16 images with their boxes.

    Args:
        images: (3, H, W) uint8 RGB arrays, the network inputs (letterboxed); sizes may differ (a (B, 3, H, W)
            array works too). Each sits in the top-left corner of an equal tile.
        detections: per image an (n, 6) ``[x1, y1, x2, y2, conf, class]`` array in that image's pixels (for
            labels, any conf such as 1.0, with ``show_conf`` False).
        names: class names; path: the .jpg to write; paths: image files, whose names are written on the tiles.
        min_conf: boxes below this confidence are not drawn; show_conf: write the confidence after the name.
    """
    images = list(images)[:MOSAIC_MAX_IMAGES]
    count = len(images)
    height, width = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    scale = min(1.0, MOSAIC_MAX_SIDE / max(columns * width, rows * height))
    tile_w, tile_h = math.ceil(width * scale), math.ceil(height * scale)
    mosaic = np.full((rows * tile_h, columns * tile_w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        tile = np.ascontiguousarray(image.transpose(1, 2, 0)[..., ::-1])  # RGB CHW -> BGR HWC for OpenCV
        if scale != 1.0:
            size = (math.ceil(image.shape[2] * scale), math.ceil(image.shape[1] * scale))
            tile = cv2.resize(tile, size, interpolation=cv2.INTER_AREA)
        boxes = np.asarray(detections[i], dtype=np.float64).reshape(-1, 6) if i < len(detections) else np.zeros((0, 6))
        boxes = boxes[boxes[:, 4] >= min_conf]
        draw_detections(
            tile,
            boxes[:, :4] * scale,
            boxes[:, 5].astype(int),
            boxes[:, 4],
            names,
            line_thickness=1,
            hide_conf=not show_conf,
        )
        if i < len(paths):
            cv2.putText(
                tile,
                Path(paths[i]).name[:40],
                (4, tile.shape[0] - 6),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4,
                (220, 220, 220),
                1,
                cv2.LINE_AA,
            )
        top, left = (i // columns) * tile_h, (i % columns) * tile_w
        mosaic[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
        cv2.rectangle(mosaic, (left, top), (left + tile_w - 1, top + tile_h - 1), (255, 255, 255), 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), mosaic):
        LOGGER.warning("could not write %s", path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Label statistics (labels.jpg)


def label_statistics(labels: Sequence[np.ndarray] | np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Counts per class (num_classes,) and all boxes (M, 4) xywhn from (n, 5) ``[class, xywhn]`` label arrays."""
    stacked = _stack_labels(labels)
    counts = np.bincount(stacked[:, 0].astype(np.int64), minlength=num_classes)[:num_classes]
    return {"counts": counts, "boxes_xywhn": stacked[:, 1:5]}


def labels_figure(labels: Sequence[np.ndarray] | np.ndarray, names: Sequence[str]) -> Figure:
    """Statistics of (n, 5) ``[class, x, y, w, h]`` normalised labels, in four panels: instances per class; up to
    1000 box outlines centred on one point (typical shapes); 2D histograms of box centres (x, y) and of box sizes
    (width, height), all in image-relative units."""
    stats = label_statistics(labels, len(names))
    counts, boxes = stats["counts"], stats["boxes_xywhn"]
    figure = new_figure((9, 9))
    class_axes, outline_axes, centre_axes, size_axes = figure.subplots(2, 2).ravel()

    colours = _class_colours(len(names))
    class_axes.bar(np.arange(len(names)), counts, color=colours[: len(names)])
    class_axes.set_ylabel("instances")
    class_axes.set_title(f"{int(counts.sum())} boxes in {len(names)} classes")
    if len(names) <= MAX_NAMED_CLASSES:
        class_axes.set_xticks(np.arange(len(names)), [str(n) for n in names], rotation=90, fontsize=8)
    else:
        class_axes.set_xlabel("class index")

    _draw_outlines(outline_axes, boxes[:MAX_OUTLINES], _stack_labels(labels)[:MAX_OUTLINES, 0], colours)
    _histogram(centre_axes, boxes[:, 0], boxes[:, 1], ("x", "y"), "box centres")
    centre_axes.invert_yaxis()  # image convention: y grows downwards
    _histogram(size_axes, boxes[:, 2], boxes[:, 3], ("width", "height"), "box sizes")
    return figure


def plot_labels(labels: Sequence[np.ndarray] | np.ndarray, names: Sequence[str], save_dir: str | Path) -> Path:
    """Save :func:`labels_figure` as ``save_dir/labels.jpg``; returns its path."""
    path = save_figure(labels_figure(labels, names), Path(save_dir) / "labels.jpg", dpi=100)
    LOGGER.info("Label statistics saved to %s", path)
    return path


def _stack_labels(labels: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
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


def _draw_outlines(axes: Axes, boxes_xywhn: np.ndarray, classes: np.ndarray, colours: np.ndarray) -> None:
    from matplotlib.collections import LineCollection

    half_w, half_h = boxes_xywhn[:, 2] / 2, boxes_xywhn[:, 3] / 2
    corners_x = np.stack([-half_w, half_w, half_w, -half_w, -half_w], axis=1) + 0.5
    corners_y = np.stack([-half_h, -half_h, half_h, half_h, -half_h], axis=1) + 0.5
    segments = np.stack([corners_x, corners_y], axis=2)
    axes.add_collection(
        LineCollection(segments, colors=colours[classes.astype(np.int64) % len(colours)], linewidths=0.5, alpha=0.5)
    )
    axes.set_xlim(0, 1)
    axes.set_ylim(1, 0)
    axes.set_aspect("equal")
    axes.set_title("box shapes (centred)")
    axes.set_xticks([])
    axes.set_yticks([])


def _histogram(axes: Axes, x: np.ndarray, y: np.ndarray, axis_names: tuple[str, str], title: str) -> None:
    axes.hist2d(x, y, bins=50, range=[[0, 1], [0, 1]], cmap="Blues", cmin=1)
    axes.set_xlabel(axis_names[0])
    axes.set_ylabel(axis_names[1])
    axes.set_title(title)
    axes.set_aspect("equal")


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _name(names: Sequence[str], cls: int) -> str:
    return names[cls] if 0 <= cls < len(names) else str(cls)


def _legend(axes: Axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(bbox_to_anchor=(1.04, 1), loc="upper left", fontsize=8)


def save_feature_maps(features: np.ndarray, path: str | Path, shown: int = FEATURE_MAPS_SHOWN) -> Path:
    """One layer's output (C, H, W) for ``--visualize``: its first ``shown`` channels as a PNG grid, 8 a row, each
    channel scaled to its own minimum and maximum and coloured with viridis (dark low, yellow high), and the whole
    float32 array beside it as ``.npy`` (YOLOv5's file names and layout). Returns the PNG's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    features = np.asarray(features, dtype=np.float32)
    np.save(path.with_suffix(".npy"), features)
    maps = features[:shown]
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    levels = np.round(255 * (maps - low) / np.where(span > 0, span, 1)).astype(np.uint8)
    zoom = max(1, math.ceil(FEATURE_TILE_MIN_SIDE / max(maps.shape[1:])))
    gap = 4
    height, width = maps.shape[1] * zoom, maps.shape[2] * zoom
    columns = min(8, len(maps))
    rows = math.ceil(len(maps) / columns)
    grid = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for i, level in enumerate(levels):
        tile = cv2.applyColorMap(np.kron(level, np.ones((zoom, zoom), np.uint8)), cv2.COLORMAP_VIRIDIS)
        top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
        grid[top : top + height, left : left + width] = tile
    cv2.imwrite(str(path), grid)
    return path
