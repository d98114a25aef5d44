"""The loggers every training run gets, as hooks: console bar, results.csv/png, training-batch images; and the
TensorBoard tracker (``--logger``, :mod:`detector.engine.trackers`).

Their columns come from the loss's term names (``trainer.step_record.mean_losses`` and
``trainer.epoch_record``): a loss that returns a new term (e.g. ``distill``) gets a ``distill_loss`` column in
the bar, results.csv, results.png and TensorBoard with no other change. With the default loss the columns are
YOLOv5's, in YOLOv5's order, so tools that read its results files read ours.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from detector.engine.callbacks import METRIC_COLUMNS, Callback, StepRecord, loss_column, result_columns
from detector.ops.boxes import xywhn2xyxy
from detector.utils.files import atomic_write, atomic_write_csv

if TYPE_CHECKING:
    from detector.engine.trainer import Trainer

LOGGER = logging.getLogger(__name__)


def resident_memory_bytes() -> int | None:
    """This process's current resident memory in bytes (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_usage(device: torch.device) -> str:
    """CUDA memory reserved on ``device``, or this process's resident memory on CPU, e.g. '1.23G'."""
    if device.type == "cuda":
        return f"{torch.cuda.memory_reserved(device) / 2**30:.3g}G"
    resident = resident_memory_bytes()
    if resident is not None:
        return f"{resident / 2**30:.3g}G"
    import resource  # lazy import: fallback where /proc is absent (macOS); peak, not current

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3g}G"


# --------------------------------------------------------------------------------------------------------------------
# Console


class ConsoleLogger(Callback):
    """A tqdm bar per epoch (epoch, memory, one column per loss term, instances, size); the header line is printed
    at the first step of each epoch, from the loss terms that step returned."""

    def __init__(self) -> None:
        self._bar: Any = None

    def on_step_end(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        step: StepRecord = trainer.step_record
        header = ("Epoch", "Memory", *(loss_column(n) for n in step.mean_losses), "Instances", "Size")
        if self._bar is None:
            from tqdm import tqdm  # lazy import: only the main process draws bars

            LOGGER.info("\n" + _row(header))
            self._bar = tqdm(total=step.num_batches, bar_format="{l_bar}{bar:10}{r_bar}", leave=True)
        epoch = f"{step.epoch}/{trainer.state.epochs - 1}"
        values = (epoch, step.memory, *(f"{v:.4g}" for v in step.mean_losses.values()), step.instances, step.image_size)
        self._bar.set_description(_row(values, header))
        self._bar.update(1)
        if step.batch_index + 1 >= step.num_batches:  # close before validation draws its own bar
            self._close()

    def on_epoch_end(self, trainer: Trainer) -> None:
        self._close()  # a stop request can end an epoch before its last batch
        if trainer.is_main:
            LOGGER.debug("epoch %d: %s", trainer.state.epoch, trainer.epoch_record.as_row())

    def on_fit_end(self, trainer: Trainer) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _row(values: tuple, header: tuple[str, ...] | None = None) -> str:
    """Right-aligned columns of YOLOv5's width 11, wider where a column name is longer (``distill_loss``)."""
    names = header if header is not None else values
    return "".join(f"{value:>{max(11, len(name) + 1)}}" for value, name in zip(values, names, strict=True))


# --------------------------------------------------------------------------------------------------------------------
# results.csv and results.png


class CSVLogger(Callback):
    """Writes one row per epoch to ``save_dir/results.csv`` (flushed and fsynced) and plots results.png at the end.

    The header follows the loss terms (:func:`~detector.engine.callbacks.result_columns`); if a later epoch
    brings a new term, the file is rewritten (atomically) with the wider header. On resume, rows of epochs that
    are re-run (epoch >= the start epoch) are dropped first, so a run killed between writing a row and its
    checkpoint does not leave a duplicate.
    """

    def __init__(self, filename: str = "results.csv") -> None:
        self.filename = filename
        self.columns: tuple[str, ...] = ()
        self.rows: list[dict[str, float]] = []

    def path(self, trainer: Trainer) -> Path:
        return Path(trainer.save_dir) / self.filename

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        path = self.path(trainer)
        self.columns, self.rows = (), []
        if path.exists():
            text = _complete_lines(path)
            self.columns = tuple(name.strip() for name in next(csv.reader(io.StringIO(text)), []))
            self.rows = [row for row in _parse_results(text) if row["epoch"] < trainer.state.start_epoch]
        self._rewrite(path)

    def on_epoch_end(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        row = trainer.epoch_record.as_row()
        self.rows.append(row)
        path = self.path(trainer)
        if set(row) <= set(self.columns):
            with open(path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(_formatted(row))
                f.flush()
                os.fsync(f.fileno())
        else:
            self.columns = result_columns(dict.fromkeys([*_loss_names(self.columns), *_loss_names(tuple(row))]))
            self._rewrite(path)

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.is_main and not trainer.config.noplots and self.path(trainer).exists():
            plot_results(self.path(trainer))

    def _rewrite(self, path: Path) -> None:
        atomic_write_csv(path, self.columns, (_formatted(row) for row in self.rows))


class NDJSONLogger(Callback):
    """Each epoch's results.csv row as one JSON object on a line (NDJSON): on stdout (``--ndjson-console``) or
    appended to ``save_dir/results.ndjson`` (``--ndjson-file``), as YOLOv5's flags of those names.

    Keys are results.csv's column names (``epoch``, ``train/box_loss``, ..., ``metrics/mAP_0.5:0.95``, ...,
    ``x/lr0``), values numbers, so ``jq`` or ``pandas.read_json(path, lines=True)`` read a run as it trains. The
    file is flushed and fsynced each epoch; on resume the lines of epochs that are re-run are dropped first (the
    file rewritten atomically), as results.csv does.
    """

    def __init__(self, console: bool = False, filename: str = "results.ndjson") -> None:
        self.console = console
        self.filename = filename

    def path(self, trainer: Trainer) -> Path:
        return Path(trainer.save_dir) / self.filename

    def on_fit_start(self, trainer: Trainer) -> None:
        path = self.path(trainer)
        if self.console or not trainer.is_main or not path.exists():
            return
        kept = [
            line
            for line in _complete_lines(path).splitlines(keepends=True)
            if _epoch_of_line(line) < trainer.state.start_epoch
        ]
        atomic_write(path, lambda f: f.write("".join(kept).encode()))

    def on_epoch_end(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        line = json.dumps(trainer.epoch_record.as_row(), default=float)  # NumPy scalars too
        if self.console:
            print(line, file=sys.stdout, flush=True)
            return
        with open(self.path(trainer), "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def _complete_lines(path: Path) -> str:
    """A log file's text up to its last newline: the line a run killed while writing it left half-written is not
    part of it (results.csv and results.ndjson on resume)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[: text.rfind("\n") + 1]


def _epoch_of_line(line: str) -> float:
    """The epoch of a results.ndjson line; infinity (not kept) for a blank or unreadable one."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return epoch if isinstance(epoch, int | float) else math.inf


def _loss_names(columns: tuple[str, ...]) -> list[str]:
    """The loss terms of a results.csv header (``train/box_loss`` -> ``box``)."""
    return [c[len("train/") : -len("_loss")] for c in columns if c.startswith("train/") and c.endswith("_loss")]


def _formatted(row: dict[str, float]) -> dict[str, str]:
    return {k: _format(v) for k, v in row.items()}


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def read_results(path: str | Path) -> list[dict[str, float]]:
    """The rows of a results.csv as floats (epoch as int); columns are stripped of YOLOv5's padding spaces."""
    with open(path, newline="", encoding="utf-8") as f:
        return _parse_results(f.read())


def _parse_results(text: str) -> list[dict[str, float]]:
    rows = []
    for raw in csv.DictReader(io.StringIO(text, newline="")):
        row = {key.strip(): float(value) for key, value in raw.items() if key and value not in (None, "")}
        if "epoch" in row:
            row["epoch"] = int(row["epoch"])
            rows.append(row)
    return rows


def results_panels(columns: tuple[str, ...]) -> list[list[str]]:
    """results.png's two rows of panels: train losses, precision, recall / val losses, mAP50, mAP50-95."""
    names = _loss_names(columns)
    return [
        [f"train/{loss_column(n)}" for n in names] + list(METRIC_COLUMNS[:2]),
        [f"val/{loss_column(n)}" for n in names] + list(METRIC_COLUMNS[2:]),
    ]


def plot_results(csv_path: str | Path, save_path: str | Path | None = None) -> Path:
    """Plot a results.csv (ours or YOLOv5's) as :func:`detector.utils.plots.results_figure` with the panels of
    :func:`results_panels`; returns the PNG path (default: results.png beside the CSV)."""
    from detector.utils.plots import results_figure, save_figure  # lazy import: matplotlib only when plotting

    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        columns = tuple(name.strip() for name in next(csv.reader(f), []))
    figure = results_figure(read_results(csv_path), results_panels(columns))
    return save_figure(figure, Path(save_path) if save_path else csv_path.with_name("results.png"), dpi=200)


# --------------------------------------------------------------------------------------------------------------------
# Training-batch images and TensorBoard


def targets_to_detections(
    targets: torch.Tensor | np.ndarray, batch_size: int, height: int, width: int
) -> list[np.ndarray]:
    """Batch targets (N, 6) [image, class, x, y, w, h] (xywh normalised) -> per image (n, 6) [x1, y1, x2, y2, 1, class]
    in pixels of an image of ``height`` x ``width``: the layout :func:`detector.utils.plots.plot_batch` draws."""
    targets = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    targets = targets.astype(np.float64).reshape(-1, 6)
    boxes = xywhn2xyxy(targets[:, 2:6], width, height)
    rows = np.concatenate((boxes, np.ones((len(targets), 1)), targets[:, 1:2]), axis=1)
    return [rows[targets[:, 0] == index] for index in range(batch_size)]


class TrainingBatchPlotter(Callback):
    """Draws the first ``max_batches`` batches of the first epoch as train_batch0.jpg, train_batch1.jpg, ..."""

    def __init__(self, max_batches: int = 3) -> None:
        self.max_batches = max_batches

    def on_step_end(self, trainer: Trainer) -> None:
        if not trainer.is_main or trainer.config.noplots or trainer.state.epoch != trainer.state.start_epoch:
            return
        index = trainer.step_record.batch_index
        if index < self.max_batches:
            from detector.utils.plots import plot_batch  # lazy import: matplotlib only when plotting

            images, targets, paths = trainer.last_batch
            detections = targets_to_detections(targets, len(images), images.shape[2], images.shape[3])
            path = Path(trainer.save_dir) / f"train_batch{index}.jpg"
            plot_batch(images.numpy(), detections, trainer.names, path, paths=paths, show_conf=False)


class TensorBoardLogger(Callback):
    """Per-epoch scalars (every results.csv column) and the first training batches as images, in ``save_dir``.

    The batch images are the train_batch*.jpg files of :class:`TrainingBatchPlotter` (registered before this).
    """

    def __init__(self, max_batches: int = 3) -> None:
        self.max_batches = max_batches
        self.writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazy import: optional at run time
        except ImportError as e:
            LOGGER.warning("TensorBoard logging off: %s (pip install tensorboard)", e)
            return
        self.writer = SummaryWriter(log_dir=str(trainer.save_dir))
        LOGGER.info(
            "TensorBoard: tensorboard --logdir %s, view at http://localhost:6006/", Path(trainer.save_dir).parent
        )

    def on_step_end(self, trainer: Trainer) -> None:
        if self.writer is None or trainer.state.epoch != trainer.state.start_epoch:
            return
        index = trainer.step_record.batch_index
        path = Path(trainer.save_dir) / f"train_batch{index}.jpg"
        if index < self.max_batches and path.is_file():
            image = cv2.imread(str(path))
            if image is not None:
                self.writer.add_image(
                    f"train_batch{index}", image[..., ::-1].copy(), trainer.state.epoch, dataformats="HWC"
                )

    def on_epoch_end(self, trainer: Trainer) -> None:
        if self.writer is None:
            return
        row = trainer.epoch_record.as_row()
        for column, value in row.items():
            if column != "epoch":
                self.writer.add_scalar(column, value, row["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_loggers() -> list[Callback]:
    """The loggers every training run gets: console bar, results.csv/png, batch images. The experiment trackers
    (TensorBoard by default, MLflow, W&B) are chosen with ``--logger`` (:mod:`detector.engine.trackers`)."""
    return [ConsoleLogger(), CSVLogger(), TrainingBatchPlotter()]
