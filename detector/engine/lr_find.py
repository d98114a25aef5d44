"""The learning-rate range test (Smith 2017, https://arxiv.org/abs/1506.01186, section 3.3; fastai's ``lr_find``):
``python train.py --lr-find [--lr-find-iters 200 --lr-find-min 1e-6 --lr-find-max 1]``.

A throwaway model trains with the run's own components - model (``--cfg``/``--weights``), data, loss, optimizer,
gradient accumulation to ``nbs``, AMP, ``--sam``, clipping - while the learning rate of every parameter group grows
geometrically per optimizer step: step ``i`` of ``N`` uses ``min_lr * (max_lr / min_lr) ** (i / (N - 1))``, with
momentum at ``hyp.momentum`` and no warmup. Each step's loss (the mean over its accumulated batches of the summed
loss terms, as results.csv logs them) is smoothed by a debiased exponential moving average (beta 0.98, fastai's).
The test stops after ``N`` steps, when the smoothed loss exceeds 4x its minimum so far, or at a non-finite loss.

The suggested ``lr0`` is the learning rate where the smoothed loss falls fastest per log-unit of learning rate (its
steepest descent, fastai's "steep"), looked for before the smoothed loss's minimum and after the first tenth of
the steps (at most 10, fastai v1's ``skip_start``: an average of few losses still jumps with each): a rate that
still makes fast progress, safely below where training breaks down. The other common rule, the minimum's learning
rate / 10, is logged beside it. Where the smoothed loss never falls, the suggestion is that rule.

:class:`LRFinder` is a :class:`~detector.engine.trainer.Trainer` whose hooks are the range test's alone (no LR
schedule, EMA, validation, checkpoints or loggers): the same ``train_step`` drives it. It writes ``lr_find.csv``
(step, lr, loss, smoothed_loss) and ``lr_find.png`` (loss against the learning rate on a log axis, the suggestion
marked; not with ``--noplots``) into the run folder, beside its config.yaml and log.txt; it saves no weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from detector.config import LRFindConfig, TrainConfig, resolve_train_config
from detector.engine.callbacks import Callback, Callbacks
from detector.engine.trainer import Trainer
from detector.errors import ConfigError
from detector.models.loss import LossFunction
from detector.utils.files import atomic_write_csv
from detector.utils.logging import setup_logging
from detector.utils.plots import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOGGER = logging.getLogger(__name__)

SMOOTHING = 0.98  # beta of the debiased exponential moving average of the loss (fastai's)
DIVERGENCE_FACTOR = 4.0  # the test stops when the smoothed loss exceeds this multiple of its minimum so far
MIN_DESCENT_STEPS = 3  # points before the smoothed loss's minimum needed to look for its steepest descent
SKIP_START = 10  # the steepest descent is looked for after the first min(10, steps / 10) steps (fastai v1's skip)
CSV_COLUMNS = ("step", "lr", "loss", "smoothed_loss")


def check_lr_find_config(settings: LRFindConfig) -> None:
    """One-line ConfigError for a range test that cannot run."""
    if settings.iterations < 2:
        raise ConfigError(f"--lr-find-iters: expected 2 or more optimizer steps, got {settings.iterations}")
    if not 0 < settings.min_lr < settings.max_lr:
        raise ConfigError(
            f"--lr-find-min and --lr-find-max: expected 0 < min < max, got {settings.min_lr:g} and {settings.max_lr:g}"
        )


def suggest_lr(lrs: Sequence[float], smoothed_losses: Sequence[float]) -> float:
    """The learning rate of the steepest descent of the smoothed loss against log(lr), before its minimum and after
    the first few steps (where the average of few losses still jumps with each); the minimum's learning rate / 10
    when the loss falls over fewer than :data:`MIN_DESCENT_STEPS` points there."""
    lrs, smoothed = np.asarray(lrs, dtype=np.float64), np.asarray(smoothed_losses, dtype=np.float64)
    end = int(np.argmin(smoothed)) + 1
    start = min(SKIP_START, len(smoothed) // 10)
    if end - start < MIN_DESCENT_STEPS:
        return float(lrs[end - 1] / 10)
    slopes = np.gradient(smoothed[start:end], np.log(lrs[start:end]))
    return float(lrs[start + int(np.argmin(slopes))])


class RangeTest:
    """The range test's schedule and stopping rule, apart from any training: :meth:`lr` gives the learning rate of
    the coming optimizer step, :meth:`record` takes that step's loss and says whether the test is over."""

    def __init__(
        self, settings: LRFindConfig, smoothing: float = SMOOTHING, divergence: float = DIVERGENCE_FACTOR
    ) -> None:
        check_lr_find_config(settings)
        self.settings = settings
        self.smoothing = smoothing
        self.divergence = divergence
        self.lrs: list[float] = []  # of the steps recorded so far
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.average = 0.0  # the exponential moving average before debiasing
        self.stop_reason: str | None = None

    def lr(self, step: int) -> float:
        """``min_lr * (max_lr / min_lr) ** (step / (iterations - 1))``: a constant ratio between steps."""
        settings = self.settings
        return settings.min_lr * (settings.max_lr / settings.min_lr) ** (step / (settings.iterations - 1))

    @property
    def next_lr(self) -> float:
        return self.lr(len(self.losses))

    def record(self, loss: float) -> bool:
        """The loss of the step just made at :attr:`next_lr`; True when the test is over (see ``stop_reason``)."""
        lr = self.next_lr
        if not math.isfinite(loss):
            self.stop_reason = f"the loss diverged (non-finite) at lr {lr:.3g}"
            return True
        self.lrs.append(lr)
        self.losses.append(loss)
        self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        smoothed = self.average / (1 - self.smoothing ** len(self.losses))
        self.smoothed.append(smoothed)
        best = min(self.smoothed)
        if smoothed > self.divergence * best:
            self.stop_reason = (
                f"the loss diverged at lr {lr:.3g} (smoothed {smoothed:.4g} > {self.divergence:g}x its minimum "
                f"{best:.4g})"
            )
        elif len(self.losses) >= self.settings.iterations:
            self.stop_reason = f"{self.settings.iterations} steps up to lr {lr:.3g}"
        return self.stop_reason is not None


@dataclass(frozen=True)
class LRFindResult:
    """What the range test measured (one entry per optimizer step) and the lr0 it suggests."""

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggestion: float  # steepest descent of the smoothed loss (see the module docstring)
    minimum_rule: float  # learning rate of the smoothed loss's minimum / 10
    stop_reason: str
    save_dir: Path


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Every parameter group at ``lr`` (the test ignores the bias group's warmup rate: there is no warmup)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class RangeTestHook(Callback):
    """Drives a :class:`RangeTest` from the trainer's events: the learning rate before each optimizer step, the mean
    loss of the step's batches after it, a stop request when the test is over; at the end, the files and the log."""

    def __init__(self, test: RangeTest) -> None:
        self.test = test
        self.epoch_total = 0.0  # the epoch's running sum of the logged loss terms, as of the last batch
        self.window_loss, self.window_batches = 0.0, 0  # the batches of the coming optimizer step

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.epoch_total = 0.0  # the trainer restarts its sums each epoch; accumulation never spans two epochs
        self.window_loss, self.window_batches = 0.0, 0
        set_learning_rate(trainer.optimizer, self.test.next_lr)

    def on_step_end(self, trainer: Trainer) -> None:
        if self.test.stop_reason is not None:
            return
        if trainer.nonfinite_streak > 0:  # the trainer skipped a non-finite loss or gradient
            self.test.record(math.nan)
            trainer.request_stop(self.test.stop_reason)
            return
        total = float(sum(trainer.loss_sums.values())) if trainer.loss_sums else 0.0
        self.window_loss += total - self.epoch_total
        self.window_batches += 1
        self.epoch_total = total
        if not trainer.state.stepped:
            return
        if self.test.record(self.window_loss / self.window_batches):
            trainer.request_stop(self.test.stop_reason)
        else:
            set_learning_rate(trainer.optimizer, self.test.next_lr)
        self.window_loss, self.window_batches = 0.0, 0

    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        test = self.test
        if len(test.losses) < 2:
            LOGGER.warning(
                "WARNING: LR range test: %s after %d steps; nothing to plot", test.stop_reason, len(test.lrs)
            )
            return
        result = range_test_result(test, trainer.save_dir)
        rows = [
            {"step": step, "lr": lr, "loss": loss, "smoothed_loss": smoothed}
            for step, (lr, loss, smoothed) in enumerate(zip(test.lrs, test.losses, test.smoothed, strict=True))
        ]
        atomic_write_csv(trainer.save_dir / "lr_find.csv", CSV_COLUMNS, rows)
        if not trainer.config.noplots:
            save_figure(lr_find_figure(result), trainer.save_dir / "lr_find.png")
        LOGGER.info(
            "LR range test: %d steps, lr %.3g to %.3g (%s).\nSuggested lr0: %.3g (steepest descent of the smoothed "
            "loss; the minimum's lr / 10 would be %.3g). Set it as lr0 in a --hyp file. Results in %s (lr_find.csv%s)",
            len(test.lrs),
            test.lrs[0],
            test.lrs[-1],
            test.stop_reason,
            result.suggestion,
            result.minimum_rule,
            trainer.save_dir,
            "" if trainer.config.noplots else ", lr_find.png",
        )


def range_test_result(test: RangeTest, save_dir: Path) -> LRFindResult:
    """The result of a test with at least one recorded step."""
    return LRFindResult(
        lrs=list(test.lrs),
        losses=list(test.losses),
        smoothed_losses=list(test.smoothed),
        suggestion=suggest_lr(test.lrs, test.smoothed),
        minimum_rule=test.lrs[int(np.argmin(test.smoothed))] / 10,
        stop_reason=test.stop_reason or "stopped",
        save_dir=save_dir,
    )


def lr_find_figure(result: LRFindResult) -> Figure:
    """lr_find.png: the loss and its smoothed curve against the learning rate (log axis), the suggestion marked."""
    figure = new_figure((6.4, 4.2))
    axes = figure.subplots()
    axes.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    axes.plot(result.lrs, result.smoothed_losses, color="C0", linewidth=2, label="smoothed loss")
    at = float(np.interp(np.log(result.suggestion), np.log(result.lrs), result.smoothed_losses))
    axes.axvline(result.suggestion, color="C3", linestyle="--", linewidth=1)
    axes.plot([result.suggestion], [at], "o", color="C3", label=f"suggested lr0 {result.suggestion:.3g}")
    axes.set_xscale("log")
    top = max(result.smoothed_losses)  # raw spikes at the divergent end would squash the curve
    axes.set_ylim(min(result.losses) * 0.95, top + 0.05 * abs(top))
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(f"LR range test ({result.stop_reason})", fontsize=9)
    axes.legend()
    return figure


class LRFinder(Trainer):
    """The LR range test as a Trainer: built from a TrainConfig exactly like a training run (so the suggested lr0
    fits that run's batch, accumulation and optimizer), driven by :class:`RangeTestHook` instead of the training
    hooks. ``run()`` returns the :class:`LRFindResult`. ``--resume`` and ``--unlabeled`` are refused (the test
    starts fresh, on the labelled images); ``--close-mosaic`` and ``--time`` do not apply."""

    def __init__(
        self,
        config: TrainConfig,
        settings: LRFindConfig | None = None,
        *,
        model: nn.Module | None = None,
        loss: LossFunction | None = None,
        train_loader: Any = None,
        callbacks: Callbacks | Iterable[Callback] | None = None,
    ) -> None:
        if config.resume or config.unlabeled:
            flag = "--resume" if config.resume else "--unlabeled (pseudo-labels need the EMA model it does not keep)"
            raise ConfigError(
                f"--lr-find starts a fresh model on the labelled images; it cannot be combined with {flag}"
            )
        self.range_test = RangeTest(settings or LRFindConfig())  # build_hooks (called by Trainer) hands it out
        config = dataclasses.replace(config, close_mosaic=0, time=0.0)
        super().__init__(config, model=model, loss=loss, train_loader=train_loader, callbacks=callbacks)
        steps_per_epoch = math.ceil(self.num_batches / self.accumulate)  # accumulation never spans two epochs
        self.set_epochs(math.ceil(self.range_test.settings.iterations / steps_per_epoch))
        self.warmup_iterations = 0  # the test starts at min_lr and accumulates to nbs from its first step

    def build_hooks(self) -> Callbacks:
        return Callbacks([RangeTestHook(self.range_test)])

    def end_epoch(self) -> None:
        """The epoch-end events and the stop decision shared by the ranks, nothing else: epochs are an artefact of
        the test (no validation or checkpoint needs agreed BatchNorm statistics, no state to recover to), and a
        full epoch end costs two garbage collections, seconds per epoch where the test has hundreds."""
        self.callbacks.run("on_epoch_end", self)
        self._stop_requested_anywhere()

    def _check_replicas(self) -> None:
        """Nothing: no weights are saved, and at the divergent end of the test the ranks' weights may be NaN."""

    def build_ema(self) -> None:
        return None

    def build_val_loader(self) -> None:
        return None

    def run(self) -> LRFindResult | None:
        """Run the test; its result (None when it stopped before two steps)."""
        self.fit()
        if len(self.range_test.losses) < 2:
            return None
        return range_test_result(self.range_test, self.save_dir)


def lr_find(
    callbacks: Callbacks | Iterable[Callback] | None = None,
    *,
    iterations: int = LRFindConfig.iterations,
    min_lr: float = LRFindConfig.min_lr,
    max_lr: float = LRFindConfig.max_lr,
    **options: Any,
) -> LRFindResult | None:
    """Python API of ``train.py --lr-find``: ``lr_find(data="coco128.yaml", weights="yolov5n.pt", imgsz=320)``;
    ``options`` are TrainConfig fields, merged as :func:`detector.engine.trainer.train` merges them."""
    setup_logging()
    config = resolve_train_config(options, source="detector.engine.lr_find.lr_find()")
    settings = LRFindConfig(iterations=iterations, min_lr=min_lr, max_lr=max_lr)
    return LRFinder(config, settings, callbacks=callbacks).run()
