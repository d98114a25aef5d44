"""Hyperparameter evolution: ``train.py --evolve N`` and ``detector.evolve(...)``.

An evolution is a folder (``runs/evolve/exp``) and a loop: the strategy (:mod:`detector.evolve.strategies`)
proposes the hyperparameters of trial ``i`` from the finished trials, the trial trains ``--epochs`` with them
(:func:`run_trial`: no checkpoints, validated at the end), and its row joins ``evolve.csv``
(:mod:`detector.evolve.records`). The folder holds all the search needs to go on after any interruption:

- ``evolve.yaml``: the training options, the search options and the command (a resumed search must match them);
- ``space.yaml``: the search space as it was loaded, so a resumed search keeps it even if the file changed;
- ``evolve.csv``: the finished trials, rewritten atomically after each one. A search killed mid-trial loses only
  that trial; resuming proposes the lowest missing trial numbers again, and as proposals depend only on the
  seed, the trial number and the earlier trials, they are the ones an uninterrupted search would have run.

Trials run one after another in this process (the ``local`` backend), or several at once on Ray
(:mod:`detector.evolve.ray_backend`). Each trial releases its memory before the next: the dataset, the cache
and the model go with its trainer, and the freed heap is handed back to the OS.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from detector.config import (
    EvolveConfig,
    Hyperparameters,
    TrainConfig,
    build_config,
    check_evolve_config,
    check_train_config,
    config_to_dict,
    load_hyp,
    load_yaml,
    resolve_train_config,
)
from detector.engine.callbacks import Callback, Callbacks
from detector.engine.hooks import EarlyStopping, EMAHook, LRScheduleHook, TimeBudget, ValidationHook
from detector.engine.loggers import ConsoleLogger, CSVLogger, resident_memory_bytes
from detector.engine.trainer import Trainer
from detector.errors import ConfigError
from detector.evolve.records import (
    EvolveTable,
    TrialOutcome,
    fitness_formula,
    plot_evolution,
    summary_lines,
    validation_results,
    write_best_hyp,
)
from detector.evolve.space import SearchSpace
from detector.evolve.strategies import Strategy, TrialRecord, build_strategy
from detector.utils.files import atomic_write, increment_path
from detector.utils.logging import add_file_log, remove_file_log
from detector.utils.memory import release_memory

LOGGER = logging.getLogger(__name__)

DEFAULT_PROJECT = "runs/evolve"

# train.py's evolution flags (argparse dests, and detector.evolve()'s keywords) -> EvolveConfig fields.
EVOLVE_OPTIONS = {
    "evolve": "trials",
    "evolve_space": "space",
    "evolve_strategy": "strategy",
    "evolve_population": "population",
    "evolve_parent": "parent",
    "evolve_hyps": "hyps",
    "resume_evolve": "resume",
    "evolve_backend": "backend",
    "ray_address": "ray_address",
    "trial_resources": "trial_resources",
    "evolve_concurrency": "concurrency",
    "evolve_search": "search",
    "evolve_scheduler": "scheduler",
    "asha_grace_period": "grace_period",
    "asha_reduction_factor": "reduction_factor",
}
# Options a resumed search may change: where and how its trials run, not what they are.
RESUMABLE_TRAIN_KEYS = ("device", "workers", "cache_dir", "project", "name", "exist_ok")
RESUMABLE_EVOLVE_KEYS = ("trials", "resume", "backend", "ray_address", "trial_resources", "concurrency")


def evolve(**options: Any) -> TrialRecord | None:
    """Python API of ``train.py --evolve``: ``detector.evolve(evolve=16, data="coco128.yaml", epochs=3)``.

    ``options`` are train.py's options as TrainConfig fields (``data``, ``epochs``, ``hyp``, ``fitness_weights``...)
    and the evolution flags by their train.py names (``evolve`` = the number of trials, ``evolve_space``,
    ``evolve_strategy``, ``resume_evolve``, ``evolve_backend``...). Returns the best trial (None if none finished).
    """
    from detector.utils.logging import setup_logging

    setup_logging()
    command = "detector.evolve(" + ", ".join(f"{key}={value!r}" for key, value in options.items()) + ")"
    return run_evolution(options, command, source="detector.evolve()")


def run_evolution(options: Mapping[str, Any], command: str, source: str = "command line") -> TrialRecord | None:
    """Check every option, prepare (or reopen) the evolve folder, run the remaining trials, write the outputs."""
    run = EvolveRun.prepare(options, command, source)
    log = add_file_log(run.save_dir)  # the search's log.txt: every trial's output, and failed trials' tracebacks
    try:
        if run.options.backend == "ray":
            from detector.evolve.ray_backend import run_on_ray

            run_on_ray(run)
        else:
            run_locally(run)
        return run.finish()
    finally:
        remove_file_log(log)


def run_locally(run: EvolveRun) -> None:
    """The trials one after another in this process, until ``options.trials`` have finished."""
    while run.remaining() > 0:
        index = run.next_indices(1)[0]
        hyp = run.strategy.propose(index, run.history)
        LOGGER.info(
            "\nEvolve: trial %d of %d (generation %d)", index + 1, run.options.trials, run.strategy.generation(index)
        )
        run.record(execute_trial(run, index, hyp))


def execute_trial(
    run: EvolveRun, index: int, hyp: Mapping[str, float], report: Callable[[int, float, dict], None] | None = None
) -> TrialOutcome:
    """Train trial ``index`` with ``hyp``; a trial that fails (diverges, runs out of memory, ...) gives fitness 0
    with its error, and the search goes on. Only Ctrl-C (KeyboardInterrupt) ends the search."""
    outcome = TrialOutcome(index=index, generation=run.strategy.generation(index), hyp=dict(hyp))
    started = time.perf_counter()
    try:
        outcome.fitness, outcome.metrics, outcome.epochs = run_trial(run.trial_config(index, hyp), report=report)
    except Exception as e:  # any failure of one trial is that trial's result, not the search's end
        outcome.status, outcome.error = "failed", f"{type(e).__name__}: {e}"
        LOGGER.warning("WARNING: evolve trial %d failed (fitness 0): %s", index, outcome.error)
        LOGGER.debug("evolve trial %d traceback", index, exc_info=True)  # in the evolution's log.txt
    outcome.seconds = time.perf_counter() - started
    return outcome


def run_trial(
    config: TrainConfig, *, report: Callable[[int, float, dict[str, float]], None] | None = None
) -> tuple[float, dict[str, float], int]:
    """Train one trial in this process: no checkpoints, no plots, validation at the end (or every epoch when
    ``config.noval`` is False). ``report(epoch, fitness, metrics)`` is called after each validated epoch (a trial
    scheduler's input). Returns (fitness, the final results keyed by results.csv's columns, epochs trained);
    raises what the training raised. The trainer and everything it holds are freed before it returns."""
    trainer = TrialTrainer(config, report=report)
    try:
        trainer.fit()
        state = trainer.state
        fitness = state.fitness if state.fitness is not None else 0.0
        return float(fitness), result_metrics(trainer), state.epoch - state.start_epoch + 1
    finally:
        del trainer
        release_memory()


class TrialTrainer(Trainer):
    """A trial's trainer: the training hooks (EMA, validation without the final best.pt pass, LR schedule, early
    stopping), a progress bar and results.csv, and the fitness reported each validated epoch; no checkpoints,
    TensorBoard or plots."""

    def __init__(self, config: TrainConfig, report: Callable[[int, float, dict[str, float]], None] | None) -> None:
        self.report = report
        super().__init__(config)

    def build_hooks(self) -> Callbacks:
        hooks = [
            EMAHook(),
            ValidationHook(final=False),
            TimeBudget(),  # --time: each trial fits its epochs to the budget
            LRScheduleHook(),
            EarlyStopping(),
            ConsoleLogger(),
            CSVLogger(),
        ]
        if self.report is not None:
            hooks.append(ReportFitness(self.report))
        return Callbacks(hooks)


class ReportFitness(Callback):
    """Hands each validated epoch's fitness and results to ``report`` (e.g. Ray Tune, for ASHA)."""

    def __init__(self, report: Callable[[int, float, dict[str, float]], None]) -> None:
        self.report = report

    def on_epoch_end(self, trainer: Trainer) -> None:
        if trainer.is_main and trainer.state.fitness is not None:
            self.report(trainer.state.epoch, float(trainer.state.fitness), result_metrics(trainer))


def result_metrics(trainer: Trainer) -> dict[str, float]:
    """The epoch's validation results, keyed by results.csv's columns (metrics/mAP_0.5, val/box_loss, ...)."""
    return validation_results(trainer.epoch_record.as_row())


# --------------------------------------------------------------------------------------------------------------------
# The evolution's folder, options and state


class EvolveRun:
    """One evolution: its folder, training and search options, search space, strategy and finished trials."""

    def __init__(
        self,
        save_dir: Path,
        train_config: TrainConfig,
        options: EvolveConfig,
        space: SearchSpace,
        command: str,
        hyp_source: str = "--hyp",
    ) -> None:
        self.save_dir = Path(save_dir)
        self.train_config = train_config
        self.options = options
        self.space = space
        self.command = command
        self.start = dataclasses.asdict(train_config.hyp)
        starts = [self.start]
        space.check_start(self.start, hyp_source)
        for path in options.hyps:
            hyp = dataclasses.asdict(load_hyp(path))
            space.check_start(hyp, str(path))
            starts.append(hyp)
        self.strategy: Strategy = build_strategy(
            options.strategy,
            space,
            starts,
            seed=train_config.seed,
            population=options.population,
            parent=options.parent,
        )
        self.table = EvolveTable(self.save_dir / "evolve.csv", hyp_keys=list(self.start))
        self.history: list[TrialRecord] = self.table.records()

    # -- opening ----------------------------------------------------------------------------------------------------

    @classmethod
    def prepare(cls, options: Mapping[str, Any], command: str, source: str = "command line") -> EvolveRun:
        """Every option checked and the search set up before the folder is made; then the folder (new, or an
        earlier one to continue: ``resume_evolve``, or ``exist_ok`` onto a folder with an evolve.yaml)."""
        train_flags, evolve_fields = split_options(options)
        evolve_options = build_config(EvolveConfig, (source, evolve_fields))
        check_evolve_config(evolve_options)
        if train_flags.get("resume"):
            raise ConfigError("--resume continues a training run; to continue an evolution use --resume-evolve DIR")
        if evolve_options.resume:
            return cls._reopen(Path(evolve_options.resume), train_flags, evolve_fields, command, source)
        train_flags.setdefault("project", DEFAULT_PROJECT)
        train_config = resolve_train_config(train_flags, source)
        check_train_config(train_config)
        _check_data(train_config)
        space = SearchSpace.load(evolve_options.space or None)
        save_dir = Path(train_config.project) / train_config.name
        if train_config.exist_ok and (save_dir / "evolve.yaml").exists():
            return cls._reopen(save_dir, train_flags, evolve_fields, command, source)
        hyp = train_flags.get("hyp")
        hyp_source = str(hyp) if isinstance(hyp, (str, Path)) and hyp else "the default hyperparameters"
        save_dir = increment_path(save_dir, exist_ok=train_config.exist_ok, mkdir=False)
        run = cls(save_dir, train_config, evolve_options, space, command, hyp_source)  # checks starts vs the space
        run._save_settings()  # the folder is made here, with its first file
        LOGGER.info("Evolve: %d trials of %s into %s", evolve_options.trials, evolve_options.strategy, run.save_dir)
        return run

    @classmethod
    def _reopen(
        cls,
        save_dir: Path,
        train_flags: Mapping[str, Any],
        evolve_fields: Mapping[str, Any],
        command: str,
        source: str,
    ) -> EvolveRun:
        """Continue the search in ``save_dir`` with its saved options; the options given now must agree with them,
        except where and how the trials run (:data:`RESUMABLE_TRAIN_KEYS`, :data:`RESUMABLE_EVOLVE_KEYS`)."""
        settings_path = save_dir / "evolve.yaml"
        settings = load_yaml(settings_path)
        saved_train = build_config(TrainConfig, (str(settings_path), settings.get("train", {})))
        saved_options = build_config(EvolveConfig, (str(settings_path), settings.get("evolve", {})))
        changed: list[str] = []
        if set(train_flags) - set(RESUMABLE_TRAIN_KEYS):  # e.g. the same command again with --exist-ok
            location = {"project": saved_train.project, "name": saved_train.name}
            fresh = resolve_train_config({**train_flags, **location}, source)
            changed += _differences(saved_train, fresh, RESUMABLE_TRAIN_KEYS)
        given = build_config(EvolveConfig, (source, evolve_fields))
        changed += [
            f"--{flag.replace('_', '-')}"
            for flag, name in EVOLVE_OPTIONS.items()
            if name in evolve_fields
            and name not in RESUMABLE_EVOLVE_KEYS
            and getattr(given, name) != getattr(saved_options, name)
        ]
        if changed:
            raise ConfigError(
                f"{settings_path}: this evolution ran with other options ({', '.join(changed)}); to continue it only "
                "--evolve N, --device, --workers, --cache-dir and the Ray options may change"
            )
        runtime = {key: train_flags[key] for key in ("device", "workers", "cache_dir") if key in train_flags}
        train_config = dataclasses.replace(saved_train, **runtime)
        here = {name: getattr(given, name) for name in RESUMABLE_EVOLVE_KEYS if name in evolve_fields}
        here["resume"] = str(save_dir)
        options = dataclasses.replace(saved_options, **here)
        check_evolve_config(options)
        space = SearchSpace.load(save_dir / "space.yaml")
        run = cls(save_dir, train_config, options, space, str(settings.get("command", command)), str(settings_path))
        LOGGER.info("Evolve: continuing %s: %d of %d trials done", save_dir, len(run.history), options.trials)
        return run

    def _save_settings(self) -> None:
        settings = {
            "command": self.command,
            "evolve": config_to_dict(self.options),
            "train": config_to_dict(self.train_config),
        }
        text = yaml.safe_dump(settings, sort_keys=False)
        atomic_write(self.save_dir / "evolve.yaml", lambda f: f.write(text.encode("utf-8")))
        space_text = yaml.safe_dump(self.space.as_dict(), sort_keys=False)
        header = f"# the search space of this evolution, from {self.space.source}\n"
        atomic_write(self.save_dir / "space.yaml", lambda f: f.write((header + space_text).encode("utf-8")))

    # -- trials -----------------------------------------------------------------------------------------------------

    def remaining(self) -> int:
        """Trials still to finish."""
        return max(0, self.options.trials - len(self.history))

    def next_indices(self, count: int) -> list[int]:
        """The ``count`` lowest trial numbers not finished (a trial lost to a kill is proposed again)."""
        done = {record.index for record in self.history}
        indices: list[int] = []
        index = 0
        while len(indices) < count:
            if index not in done:
                indices.append(index)
            index += 1
        return indices

    def trial_config(self, index: int, hyp: Mapping[str, float], *, every_epoch: bool = False) -> TrainConfig:
        """The TrainConfig of trial ``index``: the run's options with ``hyp``, in ``trials/<index>``, no
        checkpoints or plots, validated at the end only unless ``every_epoch`` (a trial scheduler needs each epoch's
        fitness) or the LR schedule reacts to the validation (plateau)."""
        config = self.train_config
        validate_each = every_epoch or config.lr_schedule == "plateau"
        trial_dir = self.save_dir / "trials" / f"{index:04d}"
        shutil.rmtree(trial_dir, ignore_errors=True)  # a trial lost to a kill starts again from nothing
        return dataclasses.replace(
            config,
            hyp=Hyperparameters(**{key: float(value) for key, value in hyp.items()}),
            project=str(trial_dir.parent.resolve()),
            name=trial_dir.name,
            exist_ok=True,
            resume="",
            nosave=True,
            noplots=True,
            noval=not validate_each,
        )

    def record(self, outcome: TrialOutcome) -> None:
        """A finished trial: its row in evolve.csv (atomically), the history, hyp_evolve.yaml, a log line."""
        self.table.add(outcome)
        self.history.append(outcome.record())
        self.write_best()
        best = max(self.history, key=lambda r: r.fitness)
        LOGGER.info(
            "Evolve: trial %d %s in %.1f s, fitness %.5f (best %.5f, trial %d); %d of %d done; memory %.0f MB",
            outcome.index,
            outcome.status,
            outcome.seconds,
            outcome.fitness,
            best.fitness,
            best.index,
            len(self.history),
            self.options.trials,
            (resident_memory_bytes() or 0) / 1e6,
        )

    def write_best(self) -> dict[str, str] | None:
        return write_best_hyp(
            self.save_dir / "hyp_evolve.yaml",
            self.table,
            self.train_config.fitness_weights,
            self.command,
            self.options.trials,
        )

    def finish(self) -> TrialRecord | None:
        """hyp_evolve.yaml, evolve.png and the printed summary; returns the best trial."""
        self.write_best()
        if not self.train_config.noplots:
            plot_evolution(self.save_dir / "evolve.png", self.table, self.strategy.keys, self.space)
        LOGGER.info("\nEvolve: fitness = %s", fitness_formula(self.train_config.fitness_weights))
        for line in summary_lines(self.table, self.start, self.strategy.keys):
            LOGGER.info("Evolve: %s", line)
        LOGGER.info(
            "Evolve: results in %s (evolve.csv, hyp_evolve.yaml, evolve.png); train with the best: python train.py "
            "--hyp %s ...",
            self.save_dir,
            self.save_dir / "hyp_evolve.yaml",
        )
        return max(self.history, key=lambda r: r.fitness) if self.history else None


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """train.py-style options -> (training flags, EvolveConfig fields)."""
    train_flags: dict[str, Any] = {}
    evolve_fields: dict[str, Any] = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name in EVOLVE_OPTIONS:
            evolve_fields[EVOLVE_OPTIONS[name]] = value
        else:
            train_flags[name] = value
    return train_flags, evolve_fields


def command_line(argv: Sequence[str] | None) -> str:
    """The command as typed, for hyp_evolve.yaml's header."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "train.py", *args])


def _check_data(config: TrainConfig) -> None:
    """The dataset YAML loads (and its images exist) before the folder is made."""
    from detector.data.dataset_config import load_dataset_config

    load_dataset_config(config.data)


def _differences(saved: Any, given: Any, allowed: Sequence[str]) -> list[str]:
    """The options (as flags) whose values differ between two configs, besides ``allowed``."""
    saved_values, given_values = config_to_dict(saved), config_to_dict(given)
    return [
        f"--{key.replace('_', '-')}"
        for key in saved_values
        if key not in allowed and saved_values[key] != given_values[key]
    ]
