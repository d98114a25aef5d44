"""The default hooks around the training step: LR schedule, EMA, validation, time budget, early stopping,
checkpointing.

Each is a :class:`~detector.engine.callbacks.Callback` on the trainer's one event list; the loop itself only
trains batches and fires events. :func:`default_hooks` is the list every run gets (``Trainer.build_hooks``),
in an order that matters at ``on_epoch_end``: validate, fit the epochs to the time budget, let the schedule and
early stopping see the fitness,
log the row, then save the checkpoint, so that the checkpoint holds everything the epoch decided. A caller's
own hooks run after these.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from detector.engine.callbacks import Callback
from detector.engine.loggers import default_loggers
from detector.engine.schedules import set_momentum, warmup

if TYPE_CHECKING:
    from detector.engine.trainer import Trainer

LOGGER = logging.getLogger(__name__)


class LRScheduleHook(Callback):
    """Sets every parameter group's learning rate (and momentum) for the coming iteration, from the trainer's
    :class:`~detector.engine.schedules.LRSchedule`: YOLOv5's warmup during the first ``trainer.warmup_iterations``,
    then ``initial_lr x schedule.factor(iteration) x state.lr_factor``. At each epoch end the schedule sees the
    validation fitness (``plateau`` reacts to it)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.apply(trainer, trainer.state.iteration)

    def on_step_end(self, trainer: Trainer) -> None:
        self.apply(trainer, trainer.state.iteration + 1)

    def on_epoch_end(self, trainer: Trainer) -> None:
        trainer.schedule.on_epoch_end(trainer.state.epoch, trainer.state.fitness)

    @staticmethod
    def apply(trainer: Trainer, iteration: int) -> None:
        schedule, optimizer = trainer.schedule, trainer.optimizer
        factor = schedule.factor(iteration) * trainer.state.lr_factor
        if iteration < trainer.warmup_iterations:
            warmup(optimizer, iteration, trainer.warmup_iterations, factor, trainer.config.hyp)
            return
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        momentum = schedule.momentum(iteration)
        if momentum is not None:
            set_momentum(optimizer, momentum)


class EMAHook(Callback):
    """Updates the exponential moving average of the weights after every optimizer step (rank 0 holds it)."""

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.ema is not None and trainer.state.stepped:
            trainer.timed("optimizer", lambda: trainer.ema.update(trainer.model))  # timed with the step it follows


def validation_due(trainer: Trainer) -> bool:
    """Whether the epoch ending now is validated: the last one always, the others every ``--val-period`` epochs
    (none with ``--noval``)."""
    config, state = trainer.config, trainer.state
    return state.is_last_epoch or (not config.noval and (state.epoch + 1) % config.val_period == 0)


class ValidationHook(Callback):
    """Validates the EMA model at the end of the epochs :func:`validation_due` names (every epoch by default),
    records the fitness (None for an epoch not validated) and the best epoch; at the end of the run, validates
    best.pt with plots and the per-class table."""

    def __init__(self, final: bool = True) -> None:
        self.final = final

    def on_epoch_end(self, trainer: Trainer) -> None:
        state = trainer.state
        state.fitness = None
        if not trainer.is_main:
            return
        if validation_due(trainer):
            trainer.validate()
        state.update_best()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.final and trainer.is_main:
            trainer.validate_best()


class TimeBudget(Callback):
    """``--time MINUTES``: fits the run's number of epochs to a wall-clock budget (ultralytics' ``time=``).

    The budget counts from the trainer's creation (data set-up included) and, on ``--resume``, the time of the
    earlier sessions too. After every epoch (so first after the first one) it measures the epoch, training and
    validation, takes the mean over this session's epochs as the cost of one more, reserves time for the final
    validation of best.pt, and makes the run as many epochs long as then fit, capped by ``--epochs``:
    :meth:`Trainer.set_epochs` refits the LR schedule, warmup and close-mosaic phase to that number. The epoch it
    makes the last is saved (and validated, if it was not) as a last epoch, so the run ends the normal way. Should
    an epoch overrun the budget anyway, the run stops after the current batch.
    Under DDP rank 0's estimate is shared, so all ranks run the same epochs.
    """

    FINAL_VALIDATION_FACTOR = 1.5  # best.pt's validation plots and prints more than an epoch's validation

    def __init__(self) -> None:
        self.epoch_started = 0.0
        self.epoch_seconds: list[float] = []  # of this session's epochs: their mean is the estimate

    @staticmethod
    def budget(trainer: Trainer) -> float:
        return trainer.config.time * 60.0

    def reserve(self, trainer: Trainer) -> float:
        """Seconds kept for the end of the run: the final validation of best.pt, checkpoint stripping, plots."""
        return self.FINAL_VALIDATION_FACTOR * trainer.validation_seconds + 2.0

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.epoch_started = trainer.clock()

    def on_step_end(self, trainer: Trainer) -> None:
        if self.budget(trainer) > 0 and trainer.elapsed_seconds() > self.budget(trainer) - self.reserve(trainer):
            trainer.request_stop(f"the --time budget of {trainer.config.time:g} min is used up")

    def on_epoch_end(self, trainer: Trainer) -> None:
        if self.budget(trainer) <= 0 or trainer.state.stop_reason is not None:
            return
        state = trainer.state
        self.epoch_seconds.append(trainer.clock() - self.epoch_started)
        epoch_seconds = sum(self.epoch_seconds) / len(self.epoch_seconds)  # steadier than the last epoch alone
        remaining = self.budget(trainer) - trainer.elapsed_seconds() - self.reserve(trainer)
        epochs = min(state.epoch + 1 + max(math.floor(remaining / max(epoch_seconds, 1e-9)), 0), trainer.config.epochs)
        if trainer.context.is_distributed:
            shared = [epochs]
            torch.distributed.broadcast_object_list(shared, src=0)
            epochs = shared[0]
        if epochs == state.epochs:
            return
        LOGGER.info(
            "--time %g min: %.1f min used, %.0f s per epoch: %d epochs fit (was %d)",
            trainer.config.time,
            trainer.elapsed_seconds() / 60,
            epoch_seconds,
            epochs,
            state.epochs,
        )
        trainer.set_epochs(epochs)
        if state.is_last_epoch and trainer.is_main and state.fitness is None:
            trainer.validate()  # the last epoch is always validated; this one became the last just now
            state.update_best()


class EarlyStopping(Callback):
    """Stops the run when the fitness has not improved for ``config.patience`` epochs (0 = never); it decides at
    validated epochs only (with ``--val-period`` N, a run stops at the first validation ``patience`` or more epochs
    after the best)."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        state, patience = trainer.state, trainer.config.patience
        if not trainer.is_main or patience <= 0 or state.is_last_epoch or state.fitness is None:
            return
        if state.epoch - state.best_epoch >= patience:
            trainer.request_stop(
                f"no improvement in the last {patience} epochs; best results at epoch {state.best_epoch}, best.pt "
                "saved. Use --patience 0 to disable (or --resume --patience N to continue)"
            )


class CheckpointHook(Callback):
    """Saves last.pt every epoch (best.pt when the fitness improved, epoch<N>.pt every --save-period) through the
    trainer's :class:`~detector.engine.state.Checkpointer`; strips the optimizer from them at the end."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        if trainer.is_main:
            state = trainer.state
            trainer.checkpointer.save(trainer, is_best=state.best_epoch == state.epoch, final=state.is_last_epoch)

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.is_main:
            trainer.checkpointer.finalize()


def default_hooks() -> list[Callback]:
    """What every training run gets, in order (see the module docstring)."""
    return [
        EMAHook(),
        ValidationHook(),
        TimeBudget(),
        LRScheduleHook(),
        EarlyStopping(),
        *default_loggers(),
        CheckpointHook(),
    ]
