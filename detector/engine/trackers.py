"""Experiment trackers chosen with ``--logger``: TensorBoard (the default), MLflow, Weights & Biases.

The console bar, results.csv and the plots are always on (:func:`detector.engine.loggers.default_loggers`); the
trackers named by ``TrainConfig.logger`` come on top. Each is a :class:`~detector.engine.callbacks.Callback`
registered by name in :data:`LOGGERS`, so a new one is one class and one line::

    class MyTracker(Callback):
        requires = "mytracker"  # the package it imports; checked before the run writes anything

        def on_epoch_end(self, trainer: Trainer) -> None:
            mytracker.log(trainer.epoch_record.as_row())

    LOGGERS["mine"] = MyTracker  # python train.py --logger tensorboard,mine

The trainer refuses an unknown name, or a tracker whose package is not installed, with a one-line
:class:`~detector.errors.ConfigError` before it makes the run folder (:func:`check_loggers`), and runs the trackers
after its default hooks (:func:`build_loggers`): at ``on_fit_end`` they find the final plots and the stripped
best.pt/last.pt. Trackers log from the main process only.
"""

from __future__ import annotations

import atexit
import difflib
import importlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from detector.config import config_to_dict
from detector.engine.callbacks import Callback
from detector.errors import ConfigError

if TYPE_CHECKING:
    from detector.engine.trainer import Trainer

LOGGER = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'detector[tracking]'"


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: ``{"hyp": {"lr0": 0.01}}`` -> ``{"hyp.lr0": 0.01}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def require(package: str, logger: str) -> ModuleType:
    """Import ``package`` for ``--logger logger``, or raise a ConfigError that says what to install."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(f"--logger {logger} needs {package}: {INSTALL_HINT} (or pip install {package})") from e


# --------------------------------------------------------------------------------------------------------------------
# MLflow


def mlflow_metric_name(column: str) -> str:
    """A results.csv column as an MLflow metric name: characters MLflow refuses on some platforms (':' on
    Windows) become '-', so ``metrics/mAP_0.5:0.95`` is ``metrics/mAP_0.5-0.95`` everywhere."""
    return re.sub(r"[^\w/.\- ]", "-", column)


class MLflowLogger(Callback):
    """Logs a run to MLflow through its client (``MLFLOW_TRACKING_URI``, else MLflow's default store).

    The experiment is ``MLFLOW_EXPERIMENT_NAME`` or the ``--project`` folder's name (runs/train -> "train"), the run
    is named after the run folder. It logs the resolved config as params (flattened: ``hyp.lr0``), every
    results.csv column per epoch (step = epoch), and at the end the plots (PNG), results.csv and
    weights/best.pt, last.pt as artifacts, then ends the run FINISHED. A process that exits before the end of
    training (an exception, Ctrl-C) ends it FAILED. The run id is kept in the run folder
    (``mlflow_run_id.txt``), so ``--resume`` continues the same MLflow run.
    """

    requires = "mlflow"
    RUN_ID_FILE = "mlflow_run_id.txt"
    MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch request

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient  # lazy import: mlflow is optional

        self.client = MlflowClient()
        id_file = Path(trainer.save_dir) / self.RUN_ID_FILE
        self.run_id = self._resumed_run(id_file) if trainer.config.resume else None
        if self.run_id is None:
            self.run_id = self._new_run(trainer)
            id_file.write_text(self.run_id + "\n", encoding="utf-8")
        atexit.register(self._end, "FAILED")  # unregistered at on_fit_end: only an unfinished run gets here
        LOGGER.info("MLflow: run %s in %s", self.run_id, self.client.tracking_uri)

    def _resumed_run(self, id_file: Path) -> str | None:
        """The run id saved in the run folder, set running again; None (a new run) if it cannot be continued."""
        if not id_file.is_file():
            return None
        from mlflow.exceptions import MlflowException  # lazy import: mlflow is optional

        run_id = id_file.read_text(encoding="utf-8").strip()
        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as e:
            LOGGER.warning(
                "WARNING: MLflow run %s (%s) cannot be continued: %s; starting a new run", run_id, id_file, e
            )
            return None
        return run_id

    def _new_run(self, trainer: Trainer) -> str:
        """A new run in the experiment, with the resolved config as params; returns its id."""
        from mlflow.entities import Param  # lazy import: mlflow is optional

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or Path(trainer.config.project).resolve().name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        save_dir = Path(trainer.save_dir)
        run = self.client.create_run(experiment_id, run_name=save_dir.name, tags={"save_dir": str(save_dir)})
        params = [Param(key, str(value)) for key, value in flatten(config_to_dict(trainer.config)).items()]
        for start in range(0, len(params), self.MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=params[start : start + self.MAX_PARAMS_PER_BATCH])
        return run.info.run_id

    def on_epoch_end(self, trainer: Trainer) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric  # lazy import: mlflow is optional
        from mlflow.exceptions import MlflowException

        row = trainer.epoch_record.as_row()
        timestamp = int(time.time() * 1000)
        metrics = [
            Metric(mlflow_metric_name(column), float(value), timestamp, int(row["epoch"]))
            for column, value in row.items()
            if column != "epoch"
        ]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except MlflowException as e:  # a tracking server out of reach for a while must not end a long training run
            LOGGER.warning("WARNING: MLflow: epoch %d not logged (results.csv has it): %s", row["epoch"], e)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.run_id is None:
            return
        save_dir = Path(trainer.save_dir)
        for path in [*sorted(save_dir.glob("*.png")), save_dir / "results.csv"]:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        for path in (trainer.checkpointer.best, trainer.checkpointer.last):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path="weights")
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        atexit.unregister(self._end)
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


# --------------------------------------------------------------------------------------------------------------------
# Weights & Biases


class WandbLogger(Callback):
    """Logs a run to Weights & Biases (offline with ``WANDB_MODE=offline``; ``wandb sync`` uploads it later).

    The project is ``WANDB_PROJECT`` or the ``--project`` folder's name, the run is named after the run folder, and
    its files go to ``WANDB_DIR`` or else the run folder. It logs the resolved config, every results.csv column per
    epoch (step = epoch), at the end the plots (PNG) as images and, with ``log_model``, best.pt as a model
    artifact; then it finishes the run (wandb itself marks a run that crashed as failed). The run id is kept in the
    run folder (``wandb_run_id.txt``), so ``--resume`` continues the same W&B run.
    """

    requires = "wandb"
    RUN_ID_FILE = "wandb_run_id.txt"

    def __init__(self, log_model: bool = True) -> None:
        self.log_model = log_model
        self.run: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        wandb = require("wandb", "wandb")
        save_dir = Path(trainer.save_dir)
        id_file = save_dir / self.RUN_ID_FILE
        resume_id = id_file.read_text(encoding="utf-8").strip() if trainer.config.resume and id_file.is_file() else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or Path(trainer.config.project).resolve().name,
            name=save_dir.name,
            config=config_to_dict(trainer.config),
            dir=os.environ.get("WANDB_DIR") or str(save_dir),
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        id_file.write_text(self.run.id + "\n", encoding="utf-8")

    def on_epoch_end(self, trainer: Trainer) -> None:
        if self.run is None:
            return
        row = trainer.epoch_record.as_row()
        self.run.log({column: value for column, value in row.items() if column != "epoch"}, step=int(row["epoch"]))

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.run is None:
            return
        import wandb  # lazy import: wandb is optional

        plots = sorted(Path(trainer.save_dir).glob("*.png"))
        if plots:  # one key per plot (their sizes differ), at the last epoch's step
            self.run.log({f"Results/{path.stem}": wandb.Image(str(path)) for path in plots}, step=trainer.state.epoch)
        best = trainer.checkpointer.best
        if self.log_model and best.is_file():
            artifact = wandb.Artifact(f"run_{self.run.id}_model", type="model")
            artifact.add_file(str(best))
            self.run.log_artifact(artifact, aliases=["latest", "best"])
        self.run.finish()
        self.run = None


# --------------------------------------------------------------------------------------------------------------------
# The registry


def tensorboard_logger() -> Callback:
    """:class:`detector.engine.loggers.TensorBoardLogger`, imported when asked for (this module stays free of torch)."""
    from detector.engine.loggers import TensorBoardLogger

    return TensorBoardLogger()


def ndjson_file_logger() -> Callback:
    """:class:`detector.engine.loggers.NDJSONLogger` writing ``results.ndjson`` (``--ndjson-file``)."""
    from detector.engine.loggers import NDJSONLogger

    return NDJSONLogger()


def ndjson_console_logger() -> Callback:
    """:class:`detector.engine.loggers.NDJSONLogger` printing to stdout (``--ndjson-console``)."""
    from detector.engine.loggers import NDJSONLogger

    return NDJSONLogger(console=True)


LOGGERS: dict[str, Callable[[], Callback]] = {  # --logger name -> tracker class (or factory); `requires`: its package
    "tensorboard": tensorboard_logger,
    "ndjson": ndjson_file_logger,
    "ndjson-console": ndjson_console_logger,
    "mlflow": MLflowLogger,
    "wandb": WandbLogger,
}


def logger_names(names: Iterable[str]) -> list[str]:
    """The tracker names of ``--logger``, in order, without blanks or repeats."""
    return list(dict.fromkeys(name.strip() for name in names if name.strip()))


def check_loggers(names: Iterable[str]) -> None:
    """One-line ConfigError for an unknown tracker name or a tracker whose package is not installed."""
    for name in logger_names(names):
        if name not in LOGGERS:
            close = difflib.get_close_matches(name, LOGGERS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"--logger: unknown logger '{name}'{hint} (known: {', '.join(LOGGERS)}; console, results.csv and "
                "plots are always on)"
            )
        package = getattr(LOGGERS[name], "requires", None)
        if package:
            require(package, name)


def build_loggers(names: Iterable[str]) -> list[Callback]:
    """The trackers of ``--logger``, checked (:func:`check_loggers`), in the order given."""
    check_loggers(names)
    return [LOGGERS[name]() for name in logger_names(names)]
