"""Learning-rate schedules, evaluated every iteration, chosen by name (``--lr-schedule``) from a registry.

A schedule is an object with ``factor(iteration) -> float``: the multiplier of each parameter group's initial
learning rate (``lr0``) at that iteration. Iterations count batches from the start of training, so a schedule
is a function of the fractional epoch ``iteration / iterations_per_epoch``; a resumed run lands on the same
values. A schedule may also cycle momentum (``momentum(iteration)``, 1cycle) or react to the validation
fitness at each epoch end (``on_epoch_end(epoch, fitness)``, plateau); whatever it learns that way is in its
``state_dict`` and travels in the checkpoint.

The registered schedules (:data:`LR_SCHEDULES`):

- ``linear`` / ``cosine``: YOLOv5's decays from 1 at the start to ``lrf`` at the end of the last epoch.
- ``onecycle``: Smith's 1cycle (https://arxiv.org/abs/1708.07120, as ``torch.optim.lr_scheduler.OneCycleLR``):
  the rate rises from ``lr0 / div`` to ``lr0`` over the first ``pct`` of training while momentum falls from
  ``hyp.momentum`` to ``min_momentum``, then the rate anneals to ``lr0 * lrf`` as momentum climbs back.
  Its rising phase is its warmup: ``hyp.warmup_epochs`` does not apply on top of it.
- ``cosine-restarts``: SGDR (https://arxiv.org/abs/1608.03983, as ``CosineAnnealingWarmRestarts``): cosine
  from 1 to ``lrf`` over ``t0`` epochs, then a restart; each cycle ``t_mult`` times longer than the last.
- ``plateau``: constant until the validation fitness stops improving for ``patience`` epochs, then multiplied by
  ``factor`` (never below ``lrf``), with a ``cooldown`` (as ``ReduceLROnPlateau`` in mode "max").

Warmup (:func:`warmup`) overrides the rate and momentum during the first iterations for every schedule that
does not bring its own (``has_warmup``): YOLOv5's ramp from ``warmup_bias_lr`` (biases) or 0 (other groups)
to the scheduled rate, and from ``warmup_momentum`` to ``momentum``.

A new schedule is one class here::

    @register_schedule("step")
    class StepSchedule(LRSchedule):
        def factor(self, iteration: int) -> float:
            return 0.1 ** (self.epoch_of(iteration) // 30)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from detector.config import Hyperparameters, ScheduleConfig
from detector.errors import ConfigError
from detector.utils.checks import check_choice

MIN_WARMUP_ITERATIONS = 100

LR_SCHEDULES: dict[str, type[LRSchedule]] = {}


def register_schedule(name: str) -> Callable[[type[LRSchedule]], type[LRSchedule]]:
    """Class decorator: make a schedule available to ``--lr-schedule NAME``."""

    def add(cls: type[LRSchedule]) -> type[LRSchedule]:
        if name in LR_SCHEDULES:
            raise ValueError(f"learning-rate schedule {name!r} is registered twice")
        cls.name = name
        LR_SCHEDULES[name] = cls
        return cls

    return add


class LRSchedule:
    """Base class: a multiplier of ``lr0`` per iteration. Subclasses override :meth:`factor` (and optionally
    :meth:`momentum`, :meth:`on_epoch_end`, :meth:`state_dict`/:meth:`load_state_dict` for learnt state).

    epochs: the run's length; iterations_per_epoch: batches per epoch; lrf: the final rate as a fraction of
    lr0; hyp: the run's hyperparameters (momentum); settings: the schedules' own parameters (--config file).
    """

    name: ClassVar[str] = ""
    has_warmup: ClassVar[bool] = False  # True when the schedule ramps up itself (YOLOv5's warmup then skipped)

    def __init__(
        self,
        epochs: int,
        iterations_per_epoch: int,
        lrf: float,
        hyp: Hyperparameters | None = None,
        settings: ScheduleConfig | None = None,
    ) -> None:
        if epochs < 1:
            raise ConfigError(f"--epochs must be at least 1 for a learning-rate schedule, got {epochs}")
        if iterations_per_epoch < 1:
            raise ConfigError(
                f"a learning-rate schedule needs at least one batch per epoch, got {iterations_per_epoch}"
            )
        self.epochs = epochs
        self.iterations_per_epoch = iterations_per_epoch
        self.lrf = lrf
        self.hyp = hyp or Hyperparameters()
        self.settings = settings or ScheduleConfig()

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    def epoch_of(self, iteration: int) -> float:
        """The fractional epoch at the start of ``iteration`` (0 at the first batch, ``epochs`` at the end)."""
        return iteration / self.iterations_per_epoch

    def factor(self, iteration: int) -> float:
        raise NotImplementedError

    def momentum(self, iteration: int) -> float | None:
        """SGD momentum / Adam beta1 at ``iteration``; None leaves it to warmup and ``hyp.momentum``."""
        return None

    def on_epoch_end(self, epoch: int, fitness: float | None) -> None:
        """Called once per epoch after validation (``fitness`` None when the epoch was not validated)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (nothing for a schedule that is a pure function)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epochs={self.epochs}, iterations_per_epoch={self.iterations_per_epoch})"


@register_schedule("linear")
class LinearSchedule(LRSchedule):
    """Straight line from 1 at the first iteration to ``lrf`` at the end of the last epoch (YOLOv5's default)."""

    def factor(self, iteration: int) -> float:
        progress = min(self.epoch_of(iteration) / self.epochs, 1.0)
        return (1.0 - progress) * (1.0 - self.lrf) + self.lrf


@register_schedule("cosine")
class CosineSchedule(LRSchedule):
    """Half a cosine from 1 to ``lrf`` over the run (YOLOv5's ``--cos-lr``)."""

    def factor(self, iteration: int) -> float:
        progress = min(self.epoch_of(iteration) / self.epochs, 1.0)
        return self.lrf + (1.0 - self.lrf) * (1.0 + math.cos(math.pi * progress)) / 2


def _cosine_between(start: float, end: float, fraction: float) -> float:
    """Cosine interpolation from ``start`` (fraction 0) to ``end`` (fraction 1), torch's ``anneal_strategy='cos'``."""
    return end + (start - end) / 2.0 * (1.0 + math.cos(math.pi * fraction))


@register_schedule("onecycle")
class OneCycleSchedule(LRSchedule):
    """1cycle: up from ``1 / div`` to 1 over the first ``pct`` of the iterations, then down to ``lrf``; momentum
    mirrors it from ``hyp.momentum`` down to ``min_momentum`` and back. Equals torch's ``OneCycleLR`` with
    ``max_lr = lr0``, ``div_factor = div``, ``final_div_factor = 1 / (div * lrf)`` (tested)."""

    has_warmup = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.settings
        if not 0.0 < settings.onecycle_pct < 1.0:
            raise ConfigError(f"schedule.onecycle_pct must be in (0, 1), got {settings.onecycle_pct}")
        if settings.onecycle_div < 1.0:
            raise ConfigError(f"schedule.onecycle_div must be at least 1, got {settings.onecycle_div}")
        # The phase boundaries, in iterations, as OneCycleLR computes them (its step count starts at 0).
        self.peak = float(settings.onecycle_pct * self.total_iterations) - 1
        self.end = float(self.total_iterations) - 1

    def _phase(self, iteration: int) -> tuple[bool, float]:
        """(rising, fraction of the phase done) at ``iteration``."""
        if iteration <= self.peak:
            return True, iteration / self.peak if self.peak > 0 else 1.0
        return False, min((iteration - self.peak) / max(self.end - self.peak, 1e-12), 1.0)

    def factor(self, iteration: int) -> float:
        start = 1.0 / self.settings.onecycle_div
        rising, fraction = self._phase(iteration)
        return _cosine_between(start, 1.0, fraction) if rising else _cosine_between(1.0, self.lrf, fraction)

    def momentum(self, iteration: int) -> float:
        high, low = self.hyp.momentum, self.settings.onecycle_min_momentum
        rising, fraction = self._phase(iteration)
        return _cosine_between(high, low, fraction) if rising else _cosine_between(low, high, fraction)


@register_schedule("cosine-restarts")
class CosineRestartsSchedule(LRSchedule):
    """Cosine from 1 to ``lrf`` over ``t0`` epochs, then restart at 1; cycle ``i`` lasts ``t0 * t_mult**i`` epochs.
    Equals torch's ``CosineAnnealingWarmRestarts(T_0=t0, T_mult=t_mult, eta_min=lr0 * lrf)`` stepped with the
    fractional epoch (tested)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.settings.t0 <= 0:
            raise ConfigError(
                f"schedule.t0 (epochs of the first cosine cycle) must be positive, got {self.settings.t0}"
            )
        if self.settings.t_mult < 1:
            raise ConfigError(f"schedule.t_mult must be an integer >= 1, got {self.settings.t_mult}")

    def cycle_position(self, epoch: float) -> tuple[float, float]:
        """(epochs into the current cycle, length of the current cycle) at fractional ``epoch``."""
        t0, t_mult = self.settings.t0, self.settings.t_mult
        if t_mult == 1:
            return epoch % t0, t0
        cycle = int(math.log(epoch / t0 * (t_mult - 1) + 1, t_mult)) if epoch >= t0 else 0
        start = t0 * (t_mult**cycle - 1) / (t_mult - 1)
        return epoch - start, t0 * t_mult**cycle

    def factor(self, iteration: int) -> float:
        into, length = self.cycle_position(self.epoch_of(iteration))
        return self.lrf + (1.0 - self.lrf) * (1.0 + math.cos(math.pi * into / length)) / 2


@register_schedule("plateau")
class PlateauSchedule(LRSchedule):
    """Constant, multiplied by ``factor`` when the validation fitness has not improved (by more than a relative
    ``threshold``) for more than ``patience`` epochs, then ``cooldown`` epochs of rest; never below ``lrf``.
    Follows ``ReduceLROnPlateau(mode="max", threshold_mode="rel")`` epoch by epoch (tested). Needs validation
    (not ``--noval``); with ``--val-period`` N its patience and cooldown count validated epochs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.settings
        if not 0.0 < settings.plateau_factor < 1.0:
            raise ConfigError(f"schedule.plateau_factor must be in (0, 1), got {settings.plateau_factor}")
        if settings.plateau_patience < 0 or settings.plateau_cooldown < 0:
            raise ConfigError("schedule.plateau_patience and schedule.plateau_cooldown must be >= 0")
        self.current = 1.0
        self.best = -math.inf
        self.bad_epochs = 0
        self.cooldown_left = 0

    def factor(self, iteration: int) -> float:
        return self.current

    def on_epoch_end(self, epoch: int, fitness: float | None) -> None:
        if fitness is None:
            return
        settings = self.settings
        if fitness > self.best * (1.0 + settings.plateau_threshold):  # torch's mode "max", threshold_mode "rel"
            self.best, self.bad_epochs = fitness, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > settings.plateau_patience:
            reduced = max(self.current * settings.plateau_factor, self.lrf)
            if self.current - reduced > 1e-12:  # torch's eps: no change smaller than that
                self.current = reduced
            self.cooldown_left, self.bad_epochs = settings.plateau_cooldown, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = float(state["current"])
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.cooldown_left = int(state["cooldown_left"])


def build_schedule(
    name: str,
    epochs: int,
    iterations_per_epoch: int,
    hyp: Hyperparameters,
    settings: ScheduleConfig | None = None,
) -> LRSchedule:
    """The registered schedule ``name`` for a run of ``epochs`` x ``iterations_per_epoch`` batches."""
    return schedule_class(name)(epochs, iterations_per_epoch, hyp.lrf, hyp, settings)


def schedule_class(name: str) -> type[LRSchedule]:
    """The schedule registered as ``name``; a one-line ConfigError with a suggestion for an unknown one."""
    return check_choice("--lr-schedule", name, LR_SCHEDULES)


# --------------------------------------------------------------------------------------------------------------------
# Warmup


def warmup_iterations(warmup_epochs: float, iterations_per_epoch: int, minimum: int = MIN_WARMUP_ITERATIONS) -> int:
    """Warmup length: ``max(round(warmup_epochs * iterations_per_epoch), 100)``; 0 when ``warmup_epochs`` is 0
    (YOLOv5 would still warm up for 100 iterations; an explicit 0 here means no warmup)."""
    if warmup_epochs <= 0:
        return 0
    return max(round(warmup_epochs * iterations_per_epoch), minimum)


def warmup(
    optimizer: torch.optim.Optimizer,
    iteration: int,
    warmup_iterations: int,
    lr_factor: float,
    hyp: Hyperparameters,
) -> None:
    """Set each group's learning rate (and momentum) for ``iteration`` < ``warmup_iterations``.

    Linear from the start value at iteration 0 to the scheduled value at ``warmup_iterations``: the bias group from
    ``hyp.warmup_bias_lr`` down (or up) to ``initial_lr * lr_factor``, the other groups from 0 up to it, and SGD
    momentum from ``hyp.warmup_momentum`` to ``hyp.momentum``. ``lr_factor`` is the schedule's multiplier at this
    iteration. Adam's betas are left alone, as in YOLOv5.
    """
    points = [0, warmup_iterations]
    for group in optimizer.param_groups:
        start_lr = hyp.warmup_bias_lr if group.get("name") == "bias" else 0.0
        target_lr = group.get("initial_lr", hyp.lr0) * lr_factor
        group["lr"] = float(np.interp(iteration, points, [start_lr, target_lr]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(iteration, points, [hyp.warmup_momentum, hyp.momentum]))


def warmup_accumulate_steps(iteration: int, warmup_iterations: int, batch_size: int, nominal_batch_size: int) -> int:
    """Gradient accumulation during warmup: from 1 at iteration 0 up to ``nominal / batch_size`` at the end."""
    steps = np.interp(iteration, [0, warmup_iterations], [1, nominal_batch_size / batch_size])
    return max(1, round(float(steps)))


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """SGD's ``momentum`` or Adam's ``beta1`` of every group (1cycle's momentum cycling)."""
    for group in optimizer.param_groups:
        if "momentum" in group:
            group["momentum"] = momentum
        elif "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
