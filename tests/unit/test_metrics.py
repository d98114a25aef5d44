"""COCO-rule matching, 101-point AP, P/R/F1 at best F1, confusion matrix: hand-computed cases.

Agreement with pycocotools on synthetic predictions is in test_coco_eval.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from detector.ops.metrics import (
    IOU_THRESHOLDS,
    DetectionStats,
    Metrics,
    average_precision,
    box_iou_numpy,
    confusion_matrix,
    fitness,
    ignored_by_crowds,
    match_predictions,
)


def test_box_iou_hand_computed() -> None:
    boxes1 = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    boxes2 = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    iou = box_iou_numpy(boxes1, boxes2)
    np.testing.assert_allclose(iou, [[50 / 150, 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_match_counts_tp_per_threshold_inclusive() -> None:
    label = np.array([[0, 0, 100, 100]])
    # IoU of [0, 0, 100, 72] with the label is 0.72: a match at 0.50 .. 0.70, not at 0.75 and above.
    tp = match_predictions(np.array([[0, 0, 100, 72]]), np.array([0.9]), np.array([0]), label, np.array([0]))
    assert tp.tolist() == [[t <= 0.72 for t in IOU_THRESHOLDS]]
    # IoU exactly 0.5 (pycocotools needs IoU >= threshold).
    tp = match_predictions(np.array([[0, 0, 100, 50]]), np.array([0.9]), np.array([0]), label, np.array([0]))
    assert tp[0, 0] and not tp[0, 1:].any()


def test_match_greedy_by_confidence_not_by_iou() -> None:
    labels = np.array([[0, 0, 100, 100]])
    preds = np.array([[0, 0, 100, 60], [0, 0, 100, 95]])  # IoU 0.60 (more confident), 0.95
    tp = match_predictions(preds, np.array([0.9, 0.5]), np.array([0, 0]), labels, np.array([0]))
    # The confident, poorer box takes the label at the thresholds it reaches; the better one is then a duplicate
    # there, and only matches at the thresholds above 0.60 that the first one could not claim.
    assert tp[0].tolist() == [t <= 0.6 for t in IOU_THRESHOLDS]
    assert tp[1].tolist() == [0.6 < t <= 0.95 for t in IOU_THRESHOLDS]


def test_match_takes_highest_iou_unmatched_label_of_same_class() -> None:
    labels = np.array([[0, 0, 100, 100], [10, 0, 110, 100], [0, 0, 100, 100]])
    label_classes = np.array([0, 0, 1])
    pred = np.array([[8, 0, 108, 100]])  # IoU 0.85 with label 0, 0.96 with label 1; label 2 is another class
    tp = match_predictions(pred, np.array([0.9]), np.array([0]), labels, label_classes)
    assert tp[0].all()  # it took label 1 (IoU 0.96 passes every threshold)
    second = match_predictions(
        np.array([[8, 0, 108, 100], [9, 0, 109, 100]]), np.array([0.9, 0.8]), np.array([0, 0]), labels, label_classes
    )
    # The second prediction gets the leftover label 0 (IoU 0.83): a match up to 0.80.
    assert second[1].tolist() == [t <= 0.83 for t in IOU_THRESHOLDS]


def test_crowd_region_hides_unmatched_predictions_of_its_class() -> None:
    preds = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [100, 100, 110, 110], [0, 0, 40, 10]], dtype=float)
    classes = np.array([0, 1, 0, 0])
    tp = np.zeros((4, 10), dtype=bool)
    tp[1] = True  # a true positive is never ignored
    crowd = np.array([[0, 0, 20, 20]])
    ignored = ignored_by_crowds(preds, classes, tp, crowd, np.array([1]), IOU_THRESHOLDS)
    assert not ignored.any()  # the crowd is class 1; the class-1 prediction is a true positive
    ignored = ignored_by_crowds(preds, classes, tp, crowd, np.array([0]), IOU_THRESHOLDS)
    assert ignored[0].all()  # inside the crowd: intersection / own area = 1
    assert not ignored[2].any()  # elsewhere
    # Half of the wide box lies in the crowd: ignored up to threshold 0.5 only.
    assert ignored[3].tolist() == [True] + [False] * 9


def test_no_labels_or_no_predictions() -> None:
    tp = match_predictions(np.array([[0, 0, 1, 1]]), np.array([0.5]), np.array([0]), np.zeros((0, 4)), np.zeros(0))
    assert tp.shape == (1, 10) and not tp.any()
    tp = match_predictions(np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.array([[0, 0, 1, 1]]), np.array([0]))
    assert tp.shape == (0, 10)


def test_average_precision_101_point_known_curves() -> None:
    # Recall 0.5 at precision 1, then recall 1 at precision 0.5: 51 readings of 1 (r <= 0.5) and 50 of 0.5.
    assert average_precision(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx((51 + 25) / 101)
    # The envelope lifts the first point to the later, higher precision.
    assert average_precision(np.array([0.5, 1.0]), np.array([0.5, 1.0])) == pytest.approx(1.0)
    # Recall never above 0.5: thresholds 0.51 .. 1.0 read 0.
    assert average_precision(np.array([0.25, 0.5]), np.array([1.0, 1.0])) == pytest.approx(51 / 101)
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0


def _stats_one_class(confs: list[float], hits: list[bool], num_labels: int) -> DetectionStats:
    """One image, class 0: predictions that either coincide with a distinct label (hit) or land far away."""
    labels = np.array([[100 * i, 0, 100 * i + 50, 50] for i in range(num_labels)], dtype=float)
    preds, used = [], 0
    for hit in hits:
        preds.append(labels[used] if hit else [1000, 1000, 1050, 1050])
        used += hit
    stats = DetectionStats()
    stats.update(np.array(preds, dtype=float), np.array(confs), np.zeros(len(confs)), labels, np.zeros(num_labels))
    return stats


def test_precision_recall_f1_at_best_mean_f1() -> None:
    # conf >= 0.9: P 1, R 1/2, F1 2/3; >= 0.8: P 1/2, R 1/2; >= 0.3: P 2/3, R 1, F1 0.8 (the best).
    metrics = _stats_one_class([0.9, 0.8, 0.3], [True, False, True], num_labels=2).compute(["a"])
    assert metrics.precision == pytest.approx(2 / 3)
    assert metrics.recall == pytest.approx(1.0)
    assert metrics.f1 == pytest.approx(0.8)
    assert 0.29 < metrics.best_conf <= 0.3
    # AP: recall 0.5 at precision 1, then 1.0 at 2/3 -> (51 * 1 + 50 * 2/3) / 101 at every threshold.
    assert metrics.map50 == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert metrics.map == pytest.approx(metrics.map50)


def test_class_without_predictions_counts_zero_class_without_labels_ignored() -> None:
    stats = DetectionStats()
    labels = np.array([[0, 0, 50, 50], [100, 0, 150, 50]], dtype=float)
    preds = np.array([[0, 0, 50, 50], [300, 300, 350, 350]], dtype=float)
    # Class 0: found perfectly. Class 1: labelled, never predicted. Class 2: predicted, never labelled.
    stats.update(preds, np.array([0.9, 0.8]), np.array([0, 2]), labels, np.array([0, 1]))
    metrics = stats.compute(["a", "b", "c"])
    assert metrics.ap_class.tolist() == [0, 1]
    assert metrics.ap50.tolist() == pytest.approx([1.0, 0.0])
    assert metrics.map50 == pytest.approx(0.5)
    assert metrics.class_instances.tolist() == [1, 1]
    assert metrics.class_maps(3).tolist() == pytest.approx([1.0, 0.0, 0.5])


def test_class_never_predicted_has_precision_zero_not_one() -> None:
    """Class 0: one label found at conf 0.9. Class 1: one label, no prediction at all.

    Mean F1 is (1 + 0) / 2 up to conf 0.9 and 0 above, so P/R/F1 are read at the highest grid point <= 0.9:
    class 0 has P 1, R 1; class 1 keeps no detection there, so P 0 and R 0 (YOLOv5 and COCO give it 0 too).
    """
    stats = DetectionStats()
    labels = np.array([[0, 0, 50, 50], [100, 0, 150, 50]], dtype=float)
    stats.update(np.array([[0, 0, 50, 50]], dtype=float), np.array([0.9]), np.array([0]), labels, np.array([0, 1]))
    metrics = stats.compute(["a", "b"])
    assert metrics.best_conf == pytest.approx(899 / 999)  # the highest CONFIDENCE_GRID value <= 0.9
    assert metrics.class_precision.tolist() == [1.0, 0.0]
    assert metrics.class_recall.tolist() == [1.0, 0.0]
    assert metrics.class_f1.tolist() == [1.0, 0.0]
    assert (metrics.precision, metrics.recall, metrics.f1) == pytest.approx((0.5, 0.5, 0.5))
    assert metrics.map50 == pytest.approx(0.5)  # AP 1 and 0: unchanged by the precision convention


def test_class_with_no_detection_above_the_chosen_confidence_has_precision_zero() -> None:
    """Class 0: one label found at conf 0.9. Class 1: one label and one wrong box at conf 0.2.

    Mean F1 is 0.5 on the whole plateau (0, 0.9] (class 1's F1 is 0 everywhere), so the threshold is the highest
    grid point <= 0.9, where class 1 keeps no detection: P 0, R 0 there (it used to read P 1).
    """
    stats = DetectionStats()
    labels = np.array([[0, 0, 50, 50], [100, 0, 150, 50]], dtype=float)
    preds = np.array([[0, 0, 50, 50], [300, 300, 350, 350]], dtype=float)
    stats.update(preds, np.array([0.9, 0.2]), np.array([0, 1]), labels, np.array([0, 1]))
    metrics = stats.compute(["a", "b"])
    assert metrics.best_conf == pytest.approx(899 / 999)
    assert metrics.class_precision.tolist() == [1.0, 0.0]
    assert metrics.precision == pytest.approx(0.5)
    # The precision-confidence curves: class 0 is 1 up to its detection's 0.9 and 0 above (nothing kept);
    # class 1's only detection is wrong, so 0 everywhere.
    grid = np.linspace(0.0, 1.0, 1000)
    np.testing.assert_array_equal(metrics.curves.precision[0], np.where(grid <= 0.9, 1.0, 0.0))
    np.testing.assert_array_equal(metrics.curves.precision[1], np.zeros(1000))


def test_untrained_model_reports_precision_zero() -> None:
    """Every prediction misses: F1 is 0 at every threshold, and so are P and R (not P 1.000, R 0.000)."""
    stats = DetectionStats()
    labels = np.array([[0, 0, 50, 50], [100, 0, 150, 50]], dtype=float)
    preds = np.array([[300, 300, 350, 350], [400, 300, 450, 350], [500, 300, 550, 350]], dtype=float)
    stats.update(preds, np.array([0.05, 0.03, 0.01]), np.array([0, 1, 1]), labels, np.array([0, 1]))
    metrics = stats.compute(["a", "b"])
    assert metrics.class_precision.tolist() == [0.0, 0.0]
    assert (metrics.precision, metrics.recall, metrics.f1, metrics.map50) == (0.0, 0.0, 0.0, 0.0)


def test_empty_stats() -> None:
    metrics = DetectionStats().compute(["a"])
    assert (metrics.map, metrics.map50, metrics.precision, metrics.num_images) == (0.0, 0.0, 0.0, 0)


def test_fitness_weights() -> None:
    assert fitness(Metrics(map50=0.5, map=0.3)) == pytest.approx(0.1 * 0.5 + 0.9 * 0.3)


def test_confusion_matrix_hand_built() -> None:
    labels = np.array([[0, 0, 50, 50], [100, 0, 150, 50], [200, 0, 250, 50]], dtype=float)
    label_classes = np.array([0, 1, 1])
    preds = np.array(
        [
            [0, 0, 50, 50],  # class 0 on label 0: correct
            [100, 0, 150, 50],  # class 0 on label 1 (a 1): confusion
            [1, 0, 51, 50],  # class 0 on label 0 again: duplicate -> false alarm
            [400, 0, 450, 50],  # class 1 on nothing: false alarm
            [200, 0, 250, 50],  # class 1 on label 2 but conf 0.1 < 0.25: dropped -> label 2 missed
        ],
        dtype=float,
    )
    matrix = confusion_matrix(
        preds, np.array([0.9, 0.9, 0.8, 0.7, 0.1]), np.array([0, 0, 0, 1, 1]), labels, label_classes, num_classes=2
    )
    expected = np.array(
        [
            [1, 1, 1],  # predicted 0: true 0, true 1, background
            [0, 0, 1],  # predicted 1
            [0, 1, 0],  # background row: label 2 missed
        ]
    )
    np.testing.assert_array_equal(matrix, expected)
