"""Training events and the loggers that listen to them (console bar, results.csv/png, TensorBoard, batch images).

The trainer fires a fixed set of events, each with the trainer itself as the only argument (detectron2's
``HookBase`` idea). An integration (a tracking service, a custom early stop) is a :class:`Callback` subclass
that overrides the events it needs, or a plain function registered for one event::

    callbacks = Callbacks()
    callbacks.register("on_epoch_end", lambda trainer: print(trainer.epoch_record))
    Trainer(config, callbacks=callbacks).fit()

What the loggers read from the trainer (the contract): ``epoch`` (0-based), ``epochs``, ``start_epoch``,
``save_dir``, ``is_main``, ``names``, ``num_batches``, ``step_record`` (:class:`StepRecord`, after each step),
``epoch_record`` (:class:`EpochRecord`, at epoch end), ``last_batch`` ((images uint8 (B, 3, H, W), targets
(N, 6) [image, class, x, y, w, h] normalised xywh)), and ``config`` (the resolved TrainConfig).
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from detector.ops.boxes import xywhn2xyxy

LOGGER = logging.getLogger(__name__)

EVENTS = ("on_fit_start", "on_epoch_start", "on_step_end", "on_epoch_end", "on_fit_end")

# YOLOv5's results.csv column names, so tools that read its results files read ours.
LOSS_NAMES = ("box_loss", "obj_loss", "cls_loss")
METRIC_COLUMNS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95")
RESULT_COLUMNS = (
    "epoch",
    *(f"train/{name}" for name in LOSS_NAMES),
    *METRIC_COLUMNS,
    *(f"val/{name}" for name in LOSS_NAMES),
    "x/lr0",
    "x/lr1",
    "x/lr2",
)

Hook = Callable[[Any], None]


@dataclass
class StepRecord:
    """What one training step reports: running mean losses of the epoch so far and the batch it saw."""

    epoch: int
    batch_index: int  # 0-based within the epoch
    num_batches: int
    mean_losses: tuple[float, float, float]  # box, obj, cls, averaged over the epoch's steps so far
    instances: int  # labelled objects in this batch
    image_size: int  # side of this batch's images in pixels (varies with --multi-scale)
    memory: str  # e.g. "1.2G": CUDA memory reserved, or this process's resident memory on CPU


@dataclass
class EpochRecord:
    """One row of results.csv: train losses, validation metrics and losses, learning rates of the 3 groups."""

    epoch: int
    train_losses: tuple[float, float, float]
    precision: float = 0.0
    recall: float = 0.0
    map50: float = 0.0
    map: float = 0.0  # mAP@0.5:0.95
    val_losses: tuple[float, float, float] = (0.0, 0.0, 0.0)
    learning_rates: tuple[float, ...] = field(default_factory=tuple)
    fitness: float = 0.0

    def as_row(self) -> dict[str, float]:
        """The results.csv row, keyed by :data:`RESULT_COLUMNS`."""
        lrs = [*self.learning_rates, 0.0, 0.0, 0.0][:3]
        values = [
            self.epoch,
            *self.train_losses,
            self.precision,
            self.recall,
            self.map50,
            self.map,
            *self.val_losses,
            *lrs,
        ]
        return dict(zip(RESULT_COLUMNS, values, strict=True))


class Callback:
    """Base class for integrations: override any of the events in :data:`EVENTS`; each receives the trainer."""

    def on_fit_start(self, trainer: Any) -> None: ...

    def on_epoch_start(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any) -> None: ...

    def on_epoch_end(self, trainer: Any) -> None: ...

    def on_fit_end(self, trainer: Any) -> None: ...


class Callbacks:
    """The hook list: functions per event, run in registration order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self._hooks: dict[str, list[Hook]] = {event: [] for event in EVENTS}
        for callback in callbacks:
            self.add(callback)

    def register(self, event: str, hook: Hook) -> None:
        """Call ``hook(trainer)`` on ``event``; an unknown event name raises KeyError with a suggestion."""
        self._check_event(event)
        if not callable(hook):
            raise TypeError(f"callback for {event!r} must be callable, got {type(hook).__name__}")
        self._hooks[event].append(hook)

    def add(self, callback: Callback) -> None:
        """Register every event method that ``callback`` overrides from :class:`Callback`."""
        for event in EVENTS:
            method = getattr(type(callback), event, None)
            if method is not None and method is not getattr(Callback, event):
                self._hooks[event].append(getattr(callback, event))

    def extend(self, other: Callbacks) -> None:
        """Append every hook of ``other``, event by event, after this list's own."""
        for event in EVENTS:
            self._hooks[event].extend(other.hooks(event))

    def run(self, event: str, trainer: Any) -> None:
        self._check_event(event)
        for hook in self._hooks[event]:
            hook(trainer)

    def hooks(self, event: str) -> list[Hook]:
        self._check_event(event)
        return list(self._hooks[event])

    @staticmethod
    def _check_event(event: str) -> None:
        if event not in EVENTS:
            close = difflib.get_close_matches(event, EVENTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown callback event {event!r}{hint} (events: {', '.join(EVENTS)})")


# --------------------------------------------------------------------------------------------------------------------
# Console


def memory_usage(device: torch.device) -> str:
    """CUDA memory reserved on ``device``, or this process's resident memory on CPU, e.g. '1.23G'."""
    if device.type == "cuda":
        return f"{torch.cuda.memory_reserved(device) / 2**30:.3g}G"
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return f"{resident_pages * os.sysconf('SC_PAGE_SIZE') / 2**30:.3g}G"
    except (OSError, ValueError, IndexError):
        import resource  # lazy import: fallback where /proc is absent (macOS); peak, not current

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3g}G"


class ConsoleLogger(Callback):
    """A tqdm bar per epoch (epoch, memory, box/obj/cls losses, instances, size) and a summary line per epoch."""

    HEADER = ("Epoch", "Memory", *LOSS_NAMES, "Instances", "Size")

    def __init__(self) -> None:
        self._bar: Any = None

    def on_epoch_start(self, trainer: Any) -> None:
        if not trainer.is_main:
            return
        from tqdm import tqdm  # lazy import: only the main process draws bars

        LOGGER.info(("\n" + "%11s" * len(self.HEADER)) % self.HEADER)
        self._bar = tqdm(total=trainer.num_batches, bar_format="{l_bar}{bar:10}{r_bar}", leave=True)

    def on_step_end(self, trainer: Any) -> None:
        if self._bar is None:
            return
        step: StepRecord = trainer.step_record
        epoch = f"{step.epoch}/{trainer.epochs - 1}"
        self._bar.set_description(
            ("%11s" * 2 + "%11.4g" * 3 + "%11d%11d")
            % (epoch, step.memory, *step.mean_losses, step.instances, step.image_size)
        )
        self._bar.update(1)
        if step.batch_index + 1 >= step.num_batches:  # close before validation draws its own bar
            self._bar.close()
            self._bar = None

    def on_epoch_end(self, trainer: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if trainer.is_main and (record := trainer.epoch_record) is not None:
            LOGGER.debug("epoch %d: %s", record.epoch, record.as_row())

    def on_fit_end(self, trainer: Any) -> None:
        if self._bar is not None:  # an exception ended the epoch early
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------------------------------------------------
# results.csv and results.png


class CSVLogger(Callback):
    """Appends one row per epoch to ``save_dir/results.csv`` (flushed and fsynced) and plots results.png at the end.

    On resume, rows of epochs that are re-run (epoch >= the trainer's start epoch) are dropped first, so a run
    killed between writing a row and its checkpoint does not leave a duplicate.
    """

    def __init__(self, filename: str = "results.csv") -> None:
        self.filename = filename

    def path(self, trainer: Any) -> Path:
        return Path(trainer.save_dir) / self.filename

    def on_fit_start(self, trainer: Any) -> None:
        if not trainer.is_main:
            return
        path = self.path(trainer)
        kept = [row for row in read_results(path) if row["epoch"] < trainer.start_epoch] if path.exists() else []
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows({k: _format(v) for k, v in row.items()} for row in kept)

    def on_epoch_end(self, trainer: Any) -> None:
        if not trainer.is_main or trainer.epoch_record is None:
            return
        with open(self.path(trainer), "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=RESULT_COLUMNS).writerow(
                {k: _format(v) for k, v in trainer.epoch_record.as_row().items()}
            )
            f.flush()
            os.fsync(f.fileno())

    def on_fit_end(self, trainer: Any) -> None:
        if trainer.is_main and not trainer.config.noplots and self.path(trainer).exists():
            plot_results(self.path(trainer))


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def read_results(path: str | Path) -> list[dict[str, float]]:
    """The rows of a results.csv as floats (epoch as int); columns are stripped of YOLOv5's padding spaces."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            row = {key.strip(): float(value) for key, value in raw.items() if key and value not in (None, "")}
            if "epoch" in row:
                row["epoch"] = int(row["epoch"])
                rows.append(row)
    return rows


def plot_results(csv_path: str | Path, save_path: str | Path | None = None) -> Path:
    """Plot a results.csv (ours or YOLOv5's) as a 2x5 grid of curves; returns the PNG path (default results.png)."""
    import matplotlib  # lazy import: keep `import detector.engine` free of matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    save_path = Path(save_path) if save_path else csv_path.with_name("results.png")
    rows = read_results(csv_path)
    panels = [f"train/{n}" for n in LOSS_NAMES] + list(METRIC_COLUMNS[:2])
    panels += [f"val/{n}" for n in LOSS_NAMES] + list(METRIC_COLUMNS[2:])
    figure, axes = plt.subplots(2, 5, figsize=(12, 6), tight_layout=True)
    epochs = np.array([row["epoch"] for row in rows], dtype=float)
    for ax, column in zip(axes.ravel(), panels, strict=True):
        values = np.array([row.get(column, np.nan) for row in rows], dtype=float)
        ax.plot(epochs, values, marker=".", linewidth=2, markersize=8, label="results")
        if len(values) >= 5:  # a smoothed trend helps read noisy per-epoch losses
            ax.plot(epochs, _smooth(values), ":", label="smooth", linewidth=2)
        ax.set_title(column, fontsize=12)
        ax.set_xlabel("epoch")
    axes.ravel()[1].legend()
    figure.savefig(save_path, dpi=200)
    plt.close(figure)
    return save_path


def _smooth(values: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Box-filter smoothing over ~``fraction`` of the points (odd window), edges padded with edge values."""
    window = max(3, round(len(values) * fraction) // 2 * 2 + 1)
    padded = np.pad(values, window // 2, mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


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

    def on_step_end(self, trainer: Any) -> None:
        if not trainer.is_main or trainer.config.noplots or trainer.epoch != trainer.start_epoch:
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

    def on_fit_start(self, trainer: Any) -> None:
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

    def on_step_end(self, trainer: Any) -> None:
        if self.writer is None or trainer.epoch != trainer.start_epoch:
            return
        index = trainer.step_record.batch_index
        path = Path(trainer.save_dir) / f"train_batch{index}.jpg"
        if index < self.max_batches and path.is_file():
            image = cv2.imread(str(path))
            if image is not None:
                self.writer.add_image(f"train_batch{index}", image[..., ::-1].copy(), trainer.epoch, dataformats="HWC")

    def on_epoch_end(self, trainer: Any) -> None:
        if self.writer is None or trainer.epoch_record is None:
            return
        row = trainer.epoch_record.as_row()
        for column, value in row.items():
            if column != "epoch":
                self.writer.add_scalar(column, value, row["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_callbacks() -> list[Callback]:
    """The loggers every training run gets: console bar, results.csv/png, batch images, TensorBoard."""
    return [ConsoleLogger(), CSVLogger(), TrainingBatchPlotter(), TensorBoardLogger()]
