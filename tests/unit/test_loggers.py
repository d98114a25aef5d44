"""Callback events, loss-term columns, results.csv/png (what it draws), training-batch drawing, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from detector.engine.callbacks import EVENTS, Callback, Callbacks, EpochRecord, result_columns
from detector.engine.loggers import (
    CSVLogger,
    NDJSONLogger,
    TrainingBatchPlotter,
    plot_results,
    read_results,
    results_panels,
    targets_to_detections,
)
from detector.engine.state import TrainState
from detector.utils.plots import results_figure

# YOLOv5's results.csv header, verbatim (utils/loggers/__init__.py keys), the contract for tools that read it.
YOLOV5_COLUMNS = (
    "epoch",
    "train/box_loss",
    "train/obj_loss",
    "train/cls_loss",
    "metrics/precision",
    "metrics/recall",
    "metrics/mAP_0.5",
    "metrics/mAP_0.5:0.95",
    "val/box_loss",
    "val/obj_loss",
    "val/cls_loss",
    "x/lr0",
    "x/lr1",
    "x/lr2",
)


def fake_trainer(save_dir: Path, start_epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        save_dir=save_dir,
        is_main=True,
        state=TrainState(epochs=10, start_epoch=start_epoch, epoch=start_epoch),
        epoch_record=None,
        config=SimpleNamespace(noplots=False),
    )


def record(epoch: int, **extra_terms: float) -> EpochRecord:
    return EpochRecord(
        epoch=epoch,
        train_losses={"box": 0.1 / (epoch + 1), "obj": 0.2, "cls": 0.3, **extra_terms},
        precision=0.5,
        recall=0.4,
        map50=0.3 + 0.01 * epoch,
        map=0.2,
        val_losses={"box": 0.01, "obj": 0.02, "cls": 0.03},
        learning_rates=(0.01, 0.02, 0.03),
    )


def test_unknown_event_raises_with_suggestion():
    callbacks = Callbacks()
    with pytest.raises(KeyError, match="did you mean 'on_epoch_end'"):
        callbacks.register("on_epoch_ends", lambda trainer: None)
    with pytest.raises(KeyError, match="unknown callback event"):
        callbacks.run("on_val_end", None)


def test_hooks_run_in_order_and_only_overridden_methods_register():
    calls: list[str] = []

    class OnlyEpochEnd(Callback):
        def on_epoch_end(self, trainer):
            calls.append(f"object:{trainer}")

    callbacks = Callbacks([OnlyEpochEnd()])
    callbacks.register("on_epoch_end", lambda trainer: calls.append(f"function:{trainer}"))
    for event in EVENTS:
        callbacks.run(event, "t")
    assert calls == ["object:t", "function:t"]
    assert {event: len(callbacks.hooks(event)) for event in EVENTS} == {**dict.fromkeys(EVENTS, 0), "on_epoch_end": 2}


def test_extend_appends_hooks_after_existing_ones():
    calls: list[str] = []
    first, second = Callbacks(), Callbacks()
    first.register("on_fit_end", lambda trainer: calls.append("first"))
    second.register("on_fit_end", lambda trainer: calls.append("second"))
    first.extend(second)
    first.run("on_fit_end", None)
    assert calls == ["first", "second"]


def test_epoch_record_row_has_yolov5_columns():
    row = record(2).as_row()
    assert tuple(row) == YOLOV5_COLUMNS == result_columns(("box", "obj", "cls"))
    assert row["epoch"] == 2 and row["metrics/mAP_0.5"] == pytest.approx(0.32) and row["x/lr2"] == 0.03


def test_a_new_loss_term_gets_its_columns_and_a_rewritten_header(tmp_path):
    trainer = fake_trainer(tmp_path)
    logger = CSVLogger()
    logger.on_fit_start(trainer)
    trainer.epoch_record = record(0)
    logger.on_epoch_end(trainer)
    trainer.epoch_record = record(1, distill=0.7)  # a term that appears from epoch 1 on
    logger.on_epoch_end(trainer)
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header == ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "train/distill_loss",
                      *YOLOV5_COLUMNS[4:8], "val/box_loss", "val/obj_loss", "val/cls_loss", "val/distill_loss",
                      "x/lr0", "x/lr1", "x/lr2"]  # fmt: skip
    rows = read_results(tmp_path / "results.csv")
    assert "train/distill_loss" not in rows[0] and rows[1]["train/distill_loss"] == pytest.approx(0.7)
    assert rows[1]["val/distill_loss"] == 0.0  # validation did not compute it: 0, as YOLOv5 writes absent values


def log_three_epochs(logger: Callback, save_dir: Path) -> None:
    """A run of ``logger`` from its start to the end of epoch 2."""
    trainer = fake_trainer(save_dir)
    logger.on_fit_start(trainer)
    for epoch in range(3):
        trainer.epoch_record = record(epoch)
        logger.on_epoch_end(trainer)


def test_csv_logger_appends_and_truncates_rerun_epochs_on_resume(tmp_path):
    logger = CSVLogger()
    log_three_epochs(logger, tmp_path)
    rows = read_results(tmp_path / "results.csv")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[1]["train/box_loss"] == pytest.approx(0.05)

    # A run killed after writing epoch 2's row but before its checkpoint resumes at epoch 2: the row goes; so does
    # the start of a row the kill cut short ("1" of "12,...", which would read as an epoch-1 row).
    with open(tmp_path / "results.csv", "a", newline="") as f:
        f.write("1")
    resumed = fake_trainer(tmp_path, start_epoch=2)
    logger.on_fit_start(resumed)
    assert [r["epoch"] for r in read_results(tmp_path / "results.csv")] == [0, 1]
    resumed.epoch_record = record(2)
    logger.on_epoch_end(resumed)
    assert [r["epoch"] for r in read_results(tmp_path / "results.csv")] == [0, 1, 2]


def test_ndjson_logger_drops_rerun_epochs_and_a_torn_last_line_on_resume(tmp_path):
    logger = NDJSONLogger()
    log_three_epochs(logger, tmp_path)
    path = tmp_path / "results.ndjson"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2] and lines[1]["train/box_loss"] == pytest.approx(0.05)
    assert list(lines[0]) == list(YOLOV5_COLUMNS)

    # killed while writing epoch 3's line, after epoch 2's checkpoint: resumed at epoch 3, the torn line goes
    with open(path, "a") as f:
        f.write('{"epoch": 3, "train/box_')
    resumed = fake_trainer(tmp_path, start_epoch=3)
    logger.on_fit_start(resumed)
    resumed.epoch_record = record(3)
    logger.on_epoch_end(resumed)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_read_results_accepts_yolov5_padded_headers(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("               epoch,      train/box_loss\n                   0,            0.1\n")
    assert read_results(path) == [{"epoch": 0, "train/box_loss": 0.1}]


def test_plot_results_draws_each_column_against_the_epoch(tmp_path):
    trainer = fake_trainer(tmp_path)
    logger = CSVLogger()
    logger.on_fit_start(trainer)
    for epoch in range(6):
        trainer.epoch_record = record(epoch, distill=0.5 - 0.05 * epoch)
        logger.on_epoch_end(trainer)
    png = plot_results(tmp_path / "results.csv")
    assert png.name == "results.png"
    assert cv2.imread(str(png)).shape == (1200, 2880, 3)  # 6 panels x 2.4 by 6 inches at 200 dpi

    rows = read_results(tmp_path / "results.csv")
    figure = results_figure(rows, results_panels(tuple(rows[0])))
    drawn = {ax.get_title(): ax.lines[0] for ax in figure.axes}
    assert list(drawn)[:6] == ["train/box_loss", "train/obj_loss", "train/cls_loss", "train/distill_loss",
                               "metrics/precision", "metrics/recall"]  # fmt: skip
    assert list(drawn)[6:] == ["val/box_loss", "val/obj_loss", "val/cls_loss", "val/distill_loss",
                               "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"]  # fmt: skip
    for title, line in drawn.items():  # every panel draws exactly the CSV column against the epoch
        np.testing.assert_allclose(line.get_xdata(), range(6))
        np.testing.assert_allclose(line.get_ydata(), [row[title] for row in rows], rtol=1e-5)
    np.testing.assert_allclose(drawn["train/box_loss"].get_ydata(), [0.1 / (e + 1) for e in range(6)], rtol=1e-5)
    np.testing.assert_allclose(drawn["train/distill_loss"].get_ydata(), [0.5 - 0.05 * e for e in range(6)], rtol=1e-5)


def test_targets_to_detections_converts_to_pixel_boxes_per_image():
    targets = torch.tensor([[1, 3, 0.5, 0.5, 0.4, 0.4], [0, 2, 0.25, 0.5, 0.1, 0.2]])
    detections = targets_to_detections(targets, batch_size=3, height=100, width=200)
    assert [len(d) for d in detections] == [1, 1, 0]
    np.testing.assert_allclose(detections[1], [[60, 30, 140, 70, 1, 3]])
    np.testing.assert_allclose(detections[0], [[40, 40, 60, 60, 1, 2]])


def test_training_batch_plotter_draws_label_boxes(tmp_path):
    from detector.utils.drawing import class_color

    images = torch.zeros(2, 3, 128, 128, dtype=torch.uint8)
    targets = torch.tensor([[1, 0, 0.5, 0.5, 0.5, 0.5]])  # image 1: box x 32..96, y 32..96
    trainer = fake_trainer(tmp_path)
    trainer.step_record = SimpleNamespace(batch_index=0)
    trainer.last_batch = (images, targets, ("a.jpg", "b.jpg"))
    trainer.names = ["thing"]
    TrainingBatchPlotter().on_step_end(trainer)
    mosaic = cv2.imread(str(tmp_path / "train_batch0.jpg"))
    assert mosaic.shape[:2] == (128, 256)  # two tiles side by side
    tile = mosaic[:, 128:].astype(int)
    blue, green, red = tile[64, 31:34].max(0)  # the left edge of the box; class 0's colour is red
    assert class_color(0)[2] > 200 and red > 120 and red > green + 50 and red > blue + 50  # JPEG blurs a 1 px line
    assert tile[64, 64].max() < 20  # inside the box: the black image
    assert mosaic[64, 64].max() < 20  # image 0 has no labels


def test_tensorboard_logger_writes_scalars(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from detector.engine.loggers import TensorBoardLogger

    trainer = fake_trainer(tmp_path)
    logger = TensorBoardLogger()
    logger.on_fit_start(trainer)
    for epoch in range(2):
        trainer.epoch_record = record(epoch)
        logger.on_epoch_end(trainer)
    logger.on_fit_end(trainer)
    accumulator = event_accumulator.EventAccumulator(str(tmp_path))
    accumulator.Reload()
    values = [event.value for event in accumulator.Scalars("metrics/mAP_0.5")]
    assert values == pytest.approx([0.30, 0.31])
