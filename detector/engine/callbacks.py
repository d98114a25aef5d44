"""The trainer's event list (hooks) and the records that hooks read.

The trainer fires a fixed set of events, each with the trainer itself as the only argument (detectron2's
``HookBase`` idea). Everything around the training step is a hook on this list: the learning-rate schedule, the
EMA, validation, early stopping, checkpointing (:mod:`detector.engine.hooks`) and the loggers
(:mod:`detector.engine.loggers`). An integration (a tracker, a tuner's trial scheduler, a custom stop rule) is a
:class:`Callback` subclass that overrides the events it needs, or a plain function registered for one event::

    class StopAtMap(Callback):
        def on_epoch_end(self, trainer: Trainer) -> None:
            if trainer.state.metrics is not None and trainer.state.metrics.map50 > 0.5:
                trainer.request_stop("mAP50 above 0.5")

    Trainer(config, callbacks=[StopAtMap()]).fit()

Events, in the order they fire: ``on_fit_start``, then per epoch ``on_epoch_start``, ``on_before_optimizer_step``
before each optimizer step (the gradients complete, unscaled and clipped: a hook may still change them, as
``--sparsity`` does), ``on_step_end`` after each batch, ``on_epoch_end``; finally ``on_fit_end``. A hook reads
the typed trainer (``trainer.state`` is the :class:`~detector.engine.state.TrainState`; ``trainer.step_record`` /
``trainer.epoch_record`` below).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detector.engine.trainer import Trainer

EVENTS = ("on_fit_start", "on_epoch_start", "on_before_optimizer_step", "on_step_end", "on_epoch_end", "on_fit_end")

# YOLOv5's results.csv metric columns, so tools that read its results files read ours.
METRIC_COLUMNS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95")
NUM_LOGGED_LR_GROUPS = 3  # x/lr0, x/lr1, x/lr2: the bias, weight and norm parameter groups

Hook = Callable[["Trainer"], None]


def loss_column(name: str) -> str:
    """The column of a loss term: ``box`` -> ``box_loss`` (YOLOv5's names)."""
    return f"{name}_loss"


def result_columns(loss_names: Iterable[str]) -> tuple[str, ...]:
    """results.csv's header for these loss terms, in YOLOv5's order: epoch, train losses, P, R, mAP50, mAP50-95,
    val losses, the learning rates. With the default loss (box, obj, cls) it is exactly YOLOv5's header."""
    names = [loss_column(n) for n in loss_names]
    return (
        "epoch",
        *(f"train/{n}" for n in names),
        *METRIC_COLUMNS,
        *(f"val/{n}" for n in names),
        *(f"x/lr{i}" for i in range(NUM_LOGGED_LR_GROUPS)),
    )


@dataclass
class StepRecord:
    """What one training step reports: running mean losses of the epoch so far and the batch it saw."""

    epoch: int
    batch_index: int  # 0-based within the epoch
    num_batches: int
    mean_losses: dict[str, float]  # each loss term averaged over the epoch's steps so far
    instances: int  # labelled objects in this batch
    image_size: int  # side of this batch's images in pixels (varies with --multi-scale)
    memory: str  # e.g. "1.2G": CUDA memory reserved, or this process's resident memory on CPU


@dataclass
class EpochRecord:
    """One row of results.csv: train losses, validation metrics and losses, learning rates of the groups.

    ``train_losses``/``val_losses`` are keyed by the loss's term names; a term the validation did not compute
    (or an epoch without validation) is written as 0, as YOLOv5 does.
    """

    epoch: int
    train_losses: Mapping[str, float]
    precision: float = 0.0
    recall: float = 0.0
    map50: float = 0.0
    map: float = 0.0  # mAP@0.5:0.95
    val_losses: Mapping[str, float] = field(default_factory=dict)
    learning_rates: tuple[float, ...] = field(default_factory=tuple)
    fitness: float = 0.0

    @property
    def loss_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.train_losses, *self.val_losses]))

    def columns(self) -> tuple[str, ...]:
        return result_columns(self.loss_names)

    def as_row(self) -> dict[str, float]:
        """The results.csv row, keyed by :meth:`columns`."""
        names = self.loss_names
        lrs = [*self.learning_rates, *(0.0,) * NUM_LOGGED_LR_GROUPS][:NUM_LOGGED_LR_GROUPS]
        values = [
            self.epoch,
            *(self.train_losses.get(n, 0.0) for n in names),
            self.precision,
            self.recall,
            self.map50,
            self.map,
            *(self.val_losses.get(n, 0.0) for n in names),
            *lrs,
        ]
        return dict(zip(self.columns(), values, strict=True))


class Callback:
    """Base class for hooks: override any of the events in :data:`EVENTS`; each receives the trainer."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer) -> None: ...

    def on_before_optimizer_step(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...


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
        if not isinstance(callback, Callback):
            raise TypeError(f"expected a Callback instance, got {type(callback).__name__}")
        for event in EVENTS:
            method = getattr(type(callback), event, None)
            if method is not None and method is not getattr(Callback, event):
                self._hooks[event].append(getattr(callback, event))

    def extend(self, other: Callbacks | Iterable[Callback]) -> None:
        """Append every hook of ``other`` (a Callbacks list or Callback objects), after this list's own."""
        if not isinstance(other, Callbacks):
            for callback in other:
                self.add(callback)
            return
        for event in EVENTS:
            self._hooks[event].extend(other.hooks(event))

    def run(self, event: str, trainer: Trainer) -> None:
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
