"""Validation plots written to the run folder: confusion matrix, PR/F1/P/R curves, batch mosaics, size study.

Matplotlib runs on the non-interactive Agg backend (no display needed); batch mosaics are drawn with OpenCV
through :mod:`detector.utils.drawing`, so their colours match detect.py's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from detector.ops.metrics import CONFIDENCE_GRID, RECALL_THRESHOLDS, Metrics
from detector.utils.drawing import draw_detections

LOGGER = logging.getLogger(__name__)

MAX_LEGEND_CLASSES = 20  # above this, per-class curves are drawn in grey without a legend entry each
MOSAIC_MAX_IMAGES = 16
MOSAIC_MAX_SIDE = 1920  # pixels: the whole mosaic is scaled to fit
PREDICTION_PLOT_CONF = 0.25  # prediction mosaics show boxes above this confidence, as detect.py would


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], path: str | Path, normalize: bool = True) -> Path:
    """Save a (nc + 1, nc + 1) confusion matrix (rows predicted, columns true, last = background) as a heat map.

    With ``normalize`` each column is divided by its total, so a column shows where the labels of one true class
    went (the diagonal is that class's recall at the matrix's thresholds). Near-zero cells are left blank.
    """
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.float64)
    if normalize:
        matrix = matrix / np.maximum(matrix.sum(0, keepdims=True), 1e-9)
    shown = np.where(matrix < 0.005, np.nan, matrix)
    num_classes = len(names)
    ticks = [*names, "background"]
    side = min(max(6.0, 0.3 * (num_classes + 1) + 3), 14.0)
    figure, axes = plt.subplots(figsize=(side, side * 0.85), tight_layout=True)
    image = axes.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    if num_classes < 100:  # beyond that the names would overlap whatever their size
        font_size = max(4.0, min(8.0, 400 / (num_classes + 1)))
        axes.set_xticks(range(num_classes + 1), ticks, rotation=90, fontsize=font_size)
        axes.set_yticks(range(num_classes + 1), ticks, fontsize=font_size)
    if num_classes < 30:
        for (row, column), value in np.ndenumerate(matrix):
            if value >= 0.005:
                text = f"{value:.2f}" if normalize else f"{int(value)}"
                color = "white" if value > 0.6 * np.nanmax(shown) else "black"
                axes.text(column, row, text, ha="center", va="center", fontsize=7, color=color)
    axes.set_xlabel("True")
    axes.set_ylabel("Predicted")
    axes.set_title("Confusion Matrix" + (" (normalised by true class)" if normalize else ""))
    return _save(figure, path, dpi=150 if num_classes < 30 else 100)  # 80 classes at 150 dpi take seconds to write


def plot_pr_curve(metrics: Metrics, path: str | Path) -> Path:
    """Precision against recall at IoU 0.5, per class and their mean, with AP50 in the legend."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 6), tight_layout=True)
    curves = metrics.curves
    if curves is not None and len(metrics.ap_class):
        show_legend = len(metrics.ap_class) <= MAX_LEGEND_CLASSES
        for k, cls in enumerate(metrics.ap_class):
            label = f"{_name(metrics.names, cls)} {metrics.ap50[k]:.3f}" if show_legend else None
            axes.plot(
                RECALL_THRESHOLDS,
                curves.pr_precision[k],
                linewidth=1,
                label=label,
                color=None if show_legend else "grey",
            )
        mean = curves.pr_precision.mean(0)
        axes.plot(RECALL_THRESHOLDS, mean, linewidth=3, color="blue", label=f"all classes {metrics.map50:.3f} mAP@0.5")
    axes.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall Curve")
    _legend(axes)
    return _save(figure, path)


def plot_confidence_curve(metrics: Metrics, which: str, path: str | Path) -> Path:
    """F1, precision or recall (``which`` = "f1" | "precision" | "recall") against the confidence threshold."""
    plt = _pyplot()
    ylabel = {"f1": "F1", "precision": "Precision", "recall": "Recall"}[which]
    figure, axes = plt.subplots(figsize=(9, 6), tight_layout=True)
    curves = metrics.curves
    if curves is not None and len(metrics.ap_class):
        values = getattr(curves, which)
        show_legend = len(metrics.ap_class) <= MAX_LEGEND_CLASSES
        for k, cls in enumerate(metrics.ap_class):
            label = _name(metrics.names, cls) if show_legend else None
            axes.plot(CONFIDENCE_GRID, values[k], linewidth=1, label=label, color=None if show_legend else "grey")
        mean = values.mean(0)
        best = int(np.searchsorted(CONFIDENCE_GRID, metrics.best_conf))
        label = f"all classes {mean[best]:.2f} at {metrics.best_conf:.3f}"
        axes.plot(CONFIDENCE_GRID, mean, linewidth=3, color="blue", label=label)
    axes.set(xlabel="Confidence", ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01), title=f"{ylabel}-Confidence Curve")
    _legend(axes)
    return _save(figure, path)


def plot_metrics_curves(metrics: Metrics, save_dir: str | Path) -> list[Path]:
    """PR_curve.png, F1_curve.png, P_curve.png, R_curve.png in ``save_dir``."""
    save_dir = Path(save_dir)
    paths = [plot_pr_curve(metrics, save_dir / "PR_curve.png")]
    for which, file in (("f1", "F1_curve.png"), ("precision", "P_curve.png"), ("recall", "R_curve.png")):
        paths.append(plot_confidence_curve(metrics, which, save_dir / file))
    return paths


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


def plot_study(
    sizes: Sequence[int],
    map50: Sequence[float],
    map50_95: Sequence[float],
    ms_per_image: Sequence[float],
    path: str | Path,
) -> Path:
    """--task study: mAP50 and mAP50-95 against image size, with inference time per image on a second axis."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5), tight_layout=True)
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
    return _save(figure, path)


def _name(names: Sequence[str], cls: int) -> str:
    return names[cls] if 0 <= cls < len(names) else str(cls)


def _legend(axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(bbox_to_anchor=(1.04, 1), loc="upper left", fontsize=8)


def _save(figure, path: str | Path, dpi: int = 150) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    _pyplot().close(figure)
    return path
