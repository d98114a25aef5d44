"""What the plots draw: curves, confusion-matrix cells and label counts read back from the matplotlib figures and
compared with values worked out by hand (not with the metrics code's own arrays)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import detector.utils.torch_utils as torch_utils
from detector.ops.metrics import DetectionStats, Metrics
from detector.utils.plots import (
    confidence_curve_figure,
    confusion_matrix_figure,
    drawn_alongside,
    labels_figure,
    plot_confusion_matrix,
    plot_metrics_curves,
    pr_curve_figure,
)

GRID = np.linspace(0.0, 1.0, 1000)  # confidence thresholds of the P/R/F1 curves
RECALLS = np.linspace(0.0, 1.0, 101)  # COCO's recall points of the PR curve


def hand_metrics() -> Metrics:
    """Class a: 2 labels; detections at conf 0.9 (hit), 0.8 (miss), 0.3 (hit). Class b: 1 label, hit at conf 0.6."""
    labels = np.array([[0, 0, 50, 50], [100, 0, 150, 50], [200, 0, 250, 50]], dtype=float)
    preds = np.array([[0, 0, 50, 50], [1000, 1000, 1050, 1050], [100, 0, 150, 50], [200, 0, 250, 50]], dtype=float)
    stats = DetectionStats()
    stats.update(preds, np.array([0.9, 0.8, 0.3, 0.6]), np.array([0, 0, 0, 1]), labels, np.array([0, 0, 1]))
    return stats.compute(["a", "b"])


def drawn_lines(figure) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{legend label: (x, y)} of the lines on the figure's first axes."""
    return {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in figure.axes[0].get_lines()}


def test_pr_curve_figure_draws_the_interpolated_curves_and_ap_in_the_legend() -> None:
    # Class a in confidence order: (P 1, R 0.5), (P 0.5, R 0.5), (P 2/3, R 1); the envelope reads 1 up to recall 0.5
    # and 2/3 beyond. Class b: P 1 at R 1 everywhere. AP50: a (51 * 1 + 50 * 2/3) / 101 = 0.835, b 1.
    lines = drawn_lines(pr_curve_figure(hand_metrics()))
    curve_a = np.where(RECALLS <= 0.5, 1.0, 2 / 3)
    curve_b = np.ones(101)
    assert set(lines) == {"a 0.835", "b 1.000", "all classes 0.917 mAP@0.5"}
    for label, expected in (("a 0.835", curve_a), ("b 1.000", curve_b), ("all classes 0.917 mAP@0.5", None)):
        x, y = lines[label]
        np.testing.assert_allclose(x, RECALLS)
        np.testing.assert_allclose(y, expected if expected is not None else (curve_a + curve_b) / 2)


@pytest.mark.parametrize(
    ("which", "curve_a", "curve_b", "mean_label"),
    [
        # Class a keeps 3 detections (2 hits) for t <= 0.3, 2 (1 hit) up to 0.8, 1 (1 hit) up to 0.9, none above.
        # Class b keeps its hit up to 0.6. Best mean F1 (0.9) is on t <= 0.3: read at 299/999 = 0.299.
        ("precision", [2 / 3, 1 / 2, 1 / 2, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0], "all classes 0.83 at 0.299"),
        ("recall", [1.0, 1 / 2, 1 / 2, 1 / 2, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0], "all classes 1.00 at 0.299"),
        ("f1", [0.8, 1 / 2, 1 / 2, 2 / 3, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0], "all classes 0.90 at 0.299"),
    ],
)
def test_confidence_curve_figures_draw_hand_computed_p_r_f1(
    which: str, curve_a: list[float], curve_b: list[float], mean_label: str
) -> None:
    # Values on the confidence intervals [0, 0.3], (0.3, 0.6], (0.6, 0.8], (0.8, 0.9], (0.9, 1].
    intervals = [GRID <= 0.3, (GRID > 0.3) & (GRID <= 0.6), (GRID > 0.6) & (GRID <= 0.8), (GRID > 0.8) & (GRID <= 0.9)]
    expected_a = np.select(intervals, curve_a[:4], default=curve_a[4])
    expected_b = np.select(intervals, curve_b[:4], default=curve_b[4])
    lines = drawn_lines(confidence_curve_figure(hand_metrics(), which))
    assert set(lines) == {"a", "b", mean_label}
    for label, expected in (("a", expected_a), ("b", expected_b), (mean_label, (expected_a + expected_b) / 2)):
        x, y = lines[label]
        np.testing.assert_allclose(x, GRID)
        np.testing.assert_allclose(y, expected, atol=1e-12)


def test_confidence_curve_rejects_an_unknown_curve() -> None:
    with pytest.raises(ValueError, match=r"unknown curve 'map'; expected one of \['f1', 'precision', 'recall'\]"):
        confidence_curve_figure(hand_metrics(), "map")  # type: ignore[arg-type]


CONFUSION = np.array(
    [
        [5, 1, 0],  # predicted a: true a, true b, background
        [2, 7, 3],  # predicted b
        [1, 0, 0],  # background: missed labels
    ]
)


def cell_texts(figure) -> dict[tuple[int, int], str]:
    """{(row, column): text} of the values written on the heat map."""
    texts = {}
    for text in figure.axes[0].texts:
        column, row = text.get_position()
        texts[(round(row), round(column))] = text.get_text()
    return texts


def test_confusion_matrix_figure_cells_equal_the_column_normalised_matrix() -> None:
    figure = confusion_matrix_figure(CONFUSION, ["a", "b"], normalize=True)
    # Column totals 8, 8 and 3: each true class's labels split over the predicted rows.
    expected = np.array([[5 / 8, 1 / 8, 0], [2 / 8, 7 / 8, 1], [1 / 8, 0, 0]])
    image = np.ma.filled(figure.axes[0].images[0].get_array().astype(float), np.nan)
    np.testing.assert_allclose(image, np.where(expected == 0, np.nan, expected))  # empty cells are blank
    assert cell_texts(figure) == {
        (0, 0): "0.62",
        (0, 1): "0.12",
        (1, 0): "0.25",
        (1, 1): "0.88",
        (1, 2): "1.00",
        (2, 0): "0.12",
    }
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["a", "b", "background"]


def test_confusion_matrix_figure_counts_when_not_normalised(tmp_path: Path) -> None:
    figure = confusion_matrix_figure(CONFUSION, ["a", "b"], normalize=False)
    image = np.ma.filled(figure.axes[0].images[0].get_array().astype(float), np.nan)
    np.testing.assert_allclose(image, np.where(CONFUSION == 0, np.nan, CONFUSION))
    nonzero = {(int(r), int(c)): str(CONFUSION[r, c]) for r, c in zip(*np.nonzero(CONFUSION), strict=True)}
    assert cell_texts(figure) == nonzero
    path = plot_confusion_matrix(CONFUSION, ["a", "b"], tmp_path / "cm.png")
    with Image.open(path) as png:
        assert png.format == "PNG"


def test_plot_metrics_curves_writes_the_four_pngs(tmp_path: Path) -> None:
    paths = plot_metrics_curves(hand_metrics(), tmp_path)
    assert [p.name for p in paths] == ["PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"]
    for path in paths:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == (1350, 900)  # 9 x 6 inches at 150 dpi


def test_labels_figure_bars_count_each_class() -> None:
    labels = [
        np.array([[0, 0.5, 0.5, 0.2, 0.3], [2, 0.1, 0.9, 0.05, 0.05]], np.float32),
        np.zeros((0, 5), np.float32),
        np.array([[2, 0.7, 0.2, 0.4, 0.1]], np.float32),
    ]
    class_axes = labels_figure(labels, ["person", "car", "dog"]).axes[0]
    assert [bar.get_height() for bar in class_axes.patches] == [1, 0, 2]
    assert class_axes.get_title() == "3 boxes in 3 classes"
    assert [t.get_text() for t in class_axes.get_xticklabels()] == ["person", "car", "dog"]


def test_many_classes_are_drawn_as_one_grey_collection_with_each_class_curve() -> None:
    # 25 classes (above the legend's 20): class k has one hit at confidence (k + 1) / 30 on its only label, so its
    # recall is 1 up to that threshold and 0 above; the grey collection must hold exactly those 25 curves.
    count = 25
    boxes = np.array([[10.0 * k, 0, 10.0 * k + 5, 5] for k in range(count)])
    confs = (np.arange(count) + 1) / 30
    stats = DetectionStats()
    stats.update(boxes, confs, np.arange(count), boxes, np.arange(count))
    metrics = stats.compute([f"c{k}" for k in range(count)])
    figure = confidence_curve_figure(metrics, "recall")
    (collection,) = figure.axes[0].collections
    segments = collection.get_segments()
    assert len(segments) == count
    for k, segment in enumerate(segments):
        np.testing.assert_allclose(segment[:, 0], GRID)
        np.testing.assert_allclose(segment[:, 1], (confs[k] >= GRID).astype(float), atol=1e-12)
    assert set(drawn_lines(figure)) == {f"all classes 1.00 at {metrics.best_conf:.3f}"}  # only the mean is a line


# --------------------------------------------------------------------------------------------------------------------
# Drawing in a second process


def _record_pid(path: Path, parent: int, fail_in_child: bool) -> None:
    if fail_in_child and os.getpid() != parent:
        raise RuntimeError("a child that fails")
    with path.open("a") as file:
        file.write(f"{os.getpid()}\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child process is forked on Linux only")
def test_drawn_alongside_draws_in_a_child_and_again_here_when_the_child_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_utils, "usable_cpus", lambda: 2)
    parent = os.getpid()
    for fail_in_child, expected in ((False, "child"), (True, "parent")):
        record = tmp_path / f"{expected}.txt"
        with drawn_alongside(functools.partial(_record_pid, record, parent, fail_in_child)):
            pass
        pids = [int(line) for line in record.read_text().split()]
        assert len(pids) == 1 and (pids[0] == parent) == (expected == "parent")
    monkeypatch.setattr(torch_utils, "usable_cpus", lambda: 1)  # one CPU: drawn here, after the block
    record = tmp_path / "one-cpu.txt"
    with drawn_alongside(functools.partial(_record_pid, record, parent, False)):
        assert not record.exists()
    assert record.read_text().split() == [str(parent)]


def _draw_in_a_daemon(record: Path) -> None:
    with drawn_alongside(functools.partial(_record_pid, record, os.getpid(), False)):
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child process is forked on Linux only")
def test_drawn_alongside_in_a_daemon_process_draws_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon process may not start children (multiprocessing refuses): the daemon draws itself."""
    monkeypatch.setattr(torch_utils, "usable_cpus", lambda: 2)
    record = tmp_path / "daemon.txt"
    daemon = multiprocessing.get_context("fork").Process(target=_draw_in_a_daemon, args=(record,), daemon=True)
    daemon.start()
    daemon.join(60)
    assert daemon.exitcode == 0 and record.read_text().split() == [str(daemon.pid)]
