"""One training state and its one owner on disk: :class:`TrainState` and :class:`Checkpointer`.

``TrainState`` is the trainer's progress (epoch, iteration, best fitness, learning-rate recovery factor, ...),
typed, for hooks to read. ``Checkpointer`` owns the checkpoint schema: it alone writes the dict (atomically),
strips it for release, restores it for ``--resume``, and takes the in-memory snapshot the non-finite-loss
recovery goes back to. The schema (plain types and tensors, so ``torch.load(weights_only=True)`` reads it)::

    format: "detector-checkpoint-v1", date: str
    model_yaml: dict, names: list[str], model: state_dict | None      (detector.models.loading)
    ema: state_dict | None, ema_updates: int                           (ModelEMA.state_dict)
    optimizer: state_dict | None, scaler: state_dict | None, schedule: dict
    epoch, best_fitness, best_epoch, lr_factor, class_maps,            (TrainState.to_checkpoint)
    epochs (the run's length, fitted under --time), train_seconds
    train_config: dict, hyp: dict, results: dict[str, float]           (the resolved config, the epoch's row)
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from detector.config import config_to_dict
from detector.models.loading import checkpoint_model_entries
from detector.ops.metrics import DEFAULT_FITNESS_WEIGHTS, Metrics, fitness
from detector.utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from detector.utils.files import atomic_write

if TYPE_CHECKING:
    from detector.engine.trainer import Trainer

LOGGER = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a run is. ``epoch`` is 0-based; ``iteration`` counts batches from the start of training (the batch
    being trained, ``epoch * num_batches + batch_index``); ``stepped`` says whether that batch ended with an
    optimizer step. ``fitness`` is this epoch's validation fitness (None when the epoch was not validated)."""

    epochs: int
    start_epoch: int = 0
    epoch: int = 0
    batch_index: int = 0
    iteration: int = 0
    stepped: bool = False
    best_fitness: float = 0.0
    best_epoch: int = -1
    fitness: float | None = None
    metrics: Metrics | None = None  # the latest validation (rank 0)
    class_maps: list[float] = field(default_factory=list)  # per-class mAP50-95 of the latest validation
    lr_factor: float = 1.0  # lowered after a non-finite-loss recovery
    learning_rates: tuple[float, ...] = ()  # of each parameter group at the last step
    stop_reason: str | None = None  # set by Trainer.request_stop
    fitness_weights: tuple[float, ...] = DEFAULT_FITNESS_WEIGHTS  # of P, R, mAP50, mAP50-95 (--fitness-weights)
    seconds_before: float = 0.0  # wall-clock seconds of the earlier sessions of a resumed run (--time budget)
    train_seconds: float = 0.0  # wall-clock seconds of the run so far, all sessions, at the last epoch end
    mosaic_closed: bool = False  # the close-mosaic phase has begun (--close-mosaic); it never reopens

    @property
    def is_last_epoch(self) -> bool:
        """The current epoch is the run's last: the final one, or a stop was requested."""
        return self.epoch + 1 >= self.epochs or self.stop_reason is not None

    def record_validation(self, metrics: Metrics, num_classes: int) -> None:
        self.metrics = metrics
        self.fitness = float(fitness(metrics, self.fitness_weights))
        self.class_maps = [float(v) for v in metrics.class_maps(num_classes)]

    def update_best(self) -> bool:
        """Make this epoch the best when its fitness ties or beats the best so far. An epoch not validated counts
        as fitness 0 until one has been (with --noval every epoch is the best); after that it never replaces a
        validated best (--val-period)."""
        if self.fitness is None and self.metrics is not None:
            return False
        current = self.fitness if self.fitness is not None else 0.0
        if current >= self.best_fitness:  # ties count (YOLOv5): with --noval every epoch is "best"
            self.best_fitness, self.best_epoch = current, self.epoch
            return True
        return False

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "best_fitness": self.best_fitness,
            "best_epoch": self.best_epoch,
            "lr_factor": self.lr_factor,
            "class_maps": list(self.class_maps),
            "epochs": self.epochs,
            "train_seconds": self.train_seconds,
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue after the checkpoint's epoch."""
        self.start_epoch = self.epoch = int(checkpoint["epoch"]) + 1
        self.best_fitness = float(checkpoint.get("best_fitness", 0.0))
        self.best_epoch = int(checkpoint.get("best_epoch", checkpoint["epoch"]))
        self.lr_factor = float(checkpoint.get("lr_factor", 1.0))
        self.class_maps = [float(v) for v in checkpoint.get("class_maps", self.class_maps)]
        self.seconds_before = self.train_seconds = float(checkpoint.get("train_seconds", 0.0))


class Checkpointer:
    """Saves, strips and restores a trainer's checkpoints in ``weights_dir`` (last.pt, best.pt, epoch<N>.pt)."""

    def __init__(self, weights_dir: Path, *, save_period: int = -1, nosave: bool = False) -> None:
        self.weights_dir = Path(weights_dir)
        self.last = self.weights_dir / "last.pt"
        self.best = self.weights_dir / "best.pt"
        self.save_period = save_period
        self.nosave = nosave

    def state_dict(self, trainer: Trainer) -> dict[str, Any]:
        """The checkpoint of ``trainer`` now (the schema in the module docstring)."""
        ema = trainer.ema.state_dict() if trainer.ema is not None else {"ema": None, "updates": 0}
        return plain_values(
            {
                "format": CHECKPOINT_FORMAT,
                **checkpoint_model_entries(trainer.model),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "ema": ema["ema"],
                "ema_updates": ema["updates"],
                "optimizer": trainer.optimizer.state_dict(),
                "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
                "schedule": trainer.schedule.state_dict(),
                **trainer.state.to_checkpoint(),
                "train_config": config_to_dict(trainer.config),
                "hyp": dataclasses.asdict(trainer.config.hyp),
                "results": trainer.epoch_record.as_row(),
            }
        )

    def save(self, trainer: Trainer, *, is_best: bool = False, final: bool = False) -> None:
        """last.pt (atomically), best.pt when ``is_best``, epoch<N>.pt every ``save_period``; with ``nosave`` only
        the final epoch is written."""
        if self.nosave and not final:
            return
        buffer = io.BytesIO()
        torch.save(self.state_dict(trainer), buffer)
        data = buffer.getvalue()
        targets = [self.last]
        if is_best:
            targets.append(self.best)
        epoch = trainer.state.epoch
        if self.save_period > 0 and (epoch + 1) % self.save_period == 0:
            targets.append(self.weights_dir / f"epoch{epoch}.pt")
        for path in targets:
            atomic_write(path, lambda f: f.write(data))

    def restore(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        """Continue a run (``--resume``): weights, EMA, optimizer, scaler, schedule and progress."""
        source = trainer.config.resume
        trainer.model.load_state_dict(checkpoint["model"] if checkpoint.get("model") is not None else checkpoint["ema"])
        if trainer.ema is not None and checkpoint.get("ema") is not None:
            trainer.ema.load_state_dict({"ema": checkpoint["ema"], "updates": checkpoint.get("ema_updates", 0)})
        if checkpoint.get("optimizer") is not None:
            weight_decays = [group["weight_decay"] for group in trainer.optimizer.param_groups]
            trainer.optimizer.load_state_dict(checkpoint["optimizer"])
            for group, weight_decay in zip(trainer.optimizer.param_groups, weight_decays, strict=True):
                group["weight_decay"] = weight_decay  # re-derived: --batch-size may have changed
        else:
            LOGGER.info("%s: optimizer state was stripped at the end of the run; continuing with a fresh one", source)
        if checkpoint.get("scaler") is not None and trainer.scaler.is_enabled():
            trainer.scaler.load_state_dict(checkpoint["scaler"])
        trainer.schedule.load_state_dict(checkpoint.get("schedule") or {})
        trainer.state.restore(checkpoint)
        LOGGER.info("Resuming %s from epoch %d of %d", source, trainer.state.start_epoch, trainer.state.epochs)

    def finalize(self) -> None:
        """At the end of a run: drop the optimizer from last.pt and best.pt (best.pt keeps only the EMA weights)."""
        for path, keep_model in ((self.last, True), (self.best, False)):
            if path.exists():
                strip_optimizer(path, keep_model=keep_model)

    # -- the in-memory state the non-finite-loss recovery goes back to ----------------------------------------------

    @staticmethod
    def snapshot(trainer: Trainer) -> dict[str, Any] | None:
        """Deep CPU copies of the weights, optimizer and EMA; None when the weights are not finite (never make broken
        weights the state to go back to)."""
        if not all(torch.isfinite(p).all() for p in trainer.model.parameters()):
            return None
        return {
            "model": state_snapshot(trainer.model.state_dict()),
            "optimizer": state_snapshot(trainer.optimizer.state_dict()),
            "ema": state_snapshot(trainer.ema.state_dict()) if trainer.ema is not None else None,
        }

    @staticmethod
    def restore_snapshot(trainer: Trainer, snapshot: dict[str, Any]) -> None:
        trainer.model.load_state_dict(snapshot["model"])
        trainer.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        if trainer.ema is not None and snapshot["ema"] is not None:
            trainer.ema.load_state_dict(snapshot["ema"])


def strip_optimizer(path: str | Path, keep_model: bool = True) -> None:
    """Drop the optimizer (and scaler) state from a finished run's checkpoint, atomically; fp32 kept for exactness.

    ``keep_model`` False also drops the raw model (``load_model`` uses the EMA), as for best.pt.
    """
    checkpoint = load_checkpoint(path)
    checkpoint.update(optimizer=None, scaler=None)
    if not keep_model and checkpoint.get("ema") is not None:
        checkpoint["model"] = None
    save_checkpoint({k: v for k, v in checkpoint.items() if k != "format"}, path)


def state_snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a state dict on the CPU, safe from later in-place updates."""
    return copy.deepcopy(_to_cpu(state))


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def plain_values(value: Any) -> Any:
    """``value`` with NumPy scalars/arrays turned into Python numbers/lists (tensors kept), so that
    ``torch.load(weights_only=True)`` accepts it; e.g. ``np.interp`` leaves np.float64 learning rates behind."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_values(v) for v in value)
    return value
