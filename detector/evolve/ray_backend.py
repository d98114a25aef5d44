"""The evolution on Ray Tune: ``train.py --evolve N --evolve-backend ray``, several trials at once.

The search stays in this process (Tune's *driver*); only the training moves to Ray's workers:

- **Proposals.** A Tune ``Searcher`` hands out the trial numbers this session still owes
  (:meth:`EvolveRun.next_indices`: the lowest missing ones, so a resumed search re-runs the trials a kill lost) and
  each one's hyperparameters from ``--evolve-search``: ``ga`` asks ``run.strategy`` (and proposes nothing while
  ``strategy.ready`` says the trials a generation breeds from are still running), ``random`` draws the evolved keys
  from ``tune.uniform`` / ``tune.loguniform`` domains of the search space, ``optuna`` asks Ray's ``OptunaSearch``
  (warm-started from the finished trials of a resumed search). Every trial's config holds its number
  (:data:`INDEX_KEY`) and its full hyp, so its folder is ``trials/<number>`` from the start, as with the local
  backend. The first trials are the starting hyps (``--hyp``, ``--evolve-hyps``) for every search.
- **Trials.** :func:`train_trial` (a Tune function trainable) trains one trial with
  :func:`~detector.evolve.search.run_trial` and reports each validated epoch's fitness to Tune; ``--evolve-scheduler
  asha`` stops the trials whose fitness trails the others' at the same epoch (ASHA's rungs).
- **Records.** A Tune ``Callback`` writes each trial's row into evolve.csv through ``run.record`` as the trial ends:
  ``ok`` (trained to the end), ``stopped`` (ASHA ended it; its last reported fitness and epochs), or ``failed``
  (fitness 0 and the error). evolve.csv is the search's state, exactly as with the local backend, so the outputs
  (hyp_evolve.yaml, evolve.png) are the same files and ``--resume-evolve`` continues either backend's search.

Ray's own files (each trial's reported results, errors with tracebacks, the experiment state of an interrupted
run) go under ``<evolve folder>/ray``. A trial's training log and results.csv are in ``trials/<number>``.

Ray is imported inside functions only: ``import detector`` and the local backend never need it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import logging
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detector.config import TrainConfig
from detector.errors import ConfigError
from detector.evolve.records import TrialOutcome, validation_results
from detector.evolve.strategies import round_significant

if TYPE_CHECKING:
    from detector.evolve.search import EvolveRun

LOGGER = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "detector[tune]"'
METRIC = "fitness"  # what ASHA and Ray's searchers maximise: the trial's validation fitness (--fitness-weights)
TIME_ATTR = "epoch"  # ASHA's clock: epochs completed, so --asha-grace-period counts epochs
INDEX_KEY = "_index"  # the trial number, in every trial's config next to the hyp keys
FINISHED_KEY = "finished"  # True in the last result of a trial that trained to its end
RESOURCE_KEYS = ("cpu", "gpu")
SIGNIFICANT_DIGITS = 6  # proposals are rounded as the genetic strategy rounds its children


# --------------------------------------------------------------------------------------------------------------------
# The driver


def run_on_ray(run: EvolveRun) -> None:
    """Run ``run.remaining()`` trials with Ray Tune and record each in ``run`` as it ends.

    Ray is the instance this process is already connected to, else the cluster at ``--ray-address`` (``auto`` or
    ``HOST:PORT``), else a new local instance on this machine that is shut down at the end. Every option is checked
    before Ray starts.
    """
    remaining = run.remaining()
    if remaining == 0:
        LOGGER.info("Evolve: all %d trials are done; nothing to run on Ray", run.options.trials)
        return
    tune = import_tune()
    options = run.options
    requested = parse_trial_resources(options.trial_resources)
    scheduler = build_scheduler(run)
    searcher = build_searcher(run)
    ray, started = connect(options.ray_address)
    try:
        resources = complete_resources(requested, run.train_config.device, ray.cluster_resources(), local=started)
        setup = TrialSetup(
            run=worker_copy(run),
            hyp_keys=tuple(run.start),
            every_epoch=options.scheduler == "asha",
            threads=max(1, int(resources["cpu"])),
        )
        trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup), resources)
        storage = (run.save_dir / "ray").resolve()
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=remaining,
                max_concurrent_trials=options.concurrency or None,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=time.strftime("tune-%Y%m%d-%H%M%S"),
                storage_path=str(storage),
                callbacks=[tune_classes().RecordTrials(run)],
                failure_config=tune.FailureConfig(max_failures=0),  # a failed trial is a result (fitness 0)
                verbose=0,  # Tune's tables list all ~30 hyp keys per trial; RecordTrials logs a line per trial
            ),
        )
        LOGGER.info(
            "Evolve: %d trials on Ray (%s search, %s scheduler), each with %s; Ray's files in %s",
            remaining,
            options.search,
            options.scheduler,
            ", ".join(f"{key}={value:g}" for key, value in resources.items()),
            storage,
        )
        tuner.fit()
    finally:
        if started:
            ray.shutdown()
    if run.remaining():
        LOGGER.warning(
            "WARNING: Ray ended with %d of %d trials unfinished; continue with --resume-evolve %s",
            run.remaining(),
            options.trials,
            run.save_dir,
        )


def import_tune() -> types.ModuleType:
    """``ray.tune``, or a one-line ConfigError saying how to install it."""
    try:
        from ray import tune
    except ImportError as e:
        raise ConfigError(f"--evolve-backend ray needs Ray Tune ({e}): {INSTALL_HINT}") from None
    return tune


def connect(address: str) -> tuple[types.ModuleType, bool]:
    """``(ray, started)``: the Ray this process is connected to, or the cluster at ``address``, or a new local
    instance (``started`` True: the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        LOGGER.info("Ray: using the instance this process is already connected to")
        return ray, False
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False)
    except (OSError, RuntimeError, ValueError) as e:  # ConnectionError / TimeoutError: no cluster there
        where = f"--ray-address {address}" if address else "a local Ray instance"
        raise ConfigError(f"{where}: Ray did not start ({_first_line(e)})") from None
    return ray, not address


def parse_trial_resources(spec: str) -> dict[str, float]:
    """``--trial-resources "cpu=2,gpu=1"`` -> ``{"cpu": 2.0, "gpu": 1.0}``; "" -> ``{}`` (the defaults)."""
    resources: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = (text.strip() for text in item.partition("="))
        key = key.lower()
        if not sep or key not in RESOURCE_KEYS:
            close = difflib.get_close_matches(key, RESOURCE_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close and sep else ""
            raise ConfigError(
                f"--trial-resources {spec!r}: expected KEY=NUMBER items such as cpu=2,gpu=1 (keys: cpu, gpu), "
                f"got {item!r}{hint}"
            )
        try:
            amount = float(value)
        except ValueError:
            amount = float("nan")
        if not amount >= 0 or key in resources:
            problem = "is given twice" if key in resources else f"needs a number >= 0, got {value!r}"
            raise ConfigError(f"--trial-resources {spec!r}: {key} {problem}")
        resources[key] = amount
    if resources.get("cpu") == 0:
        raise ConfigError(f"--trial-resources {spec!r}: a trial needs at least part of a CPU (cpu > 0)")
    return resources


def complete_resources(
    requested: Mapping[str, float], device: str, cluster: Mapping[str, float], *, local: bool
) -> dict[str, float]:
    """Each trial's resources: ``requested`` over the defaults (1 CPU; 1 GPU when the cluster has one and
    ``--device`` is not cpu). On a local instance a trial larger than the machine is refused (it would wait
    forever); on a cluster it only warns, since an autoscaler may add nodes."""
    has_gpu = cluster.get("GPU", 0) > 0 and device.strip().lower() != "cpu"
    resources = {"cpu": 1.0, "gpu": 1.0 if has_gpu else 0.0, **requested}
    too_big = [key for key in RESOURCE_KEYS if resources[key] > cluster.get(key.upper(), 0.0)]
    if too_big:
        available = ", ".join(f"{key}={cluster.get(key.upper(), 0.0):g}" for key in RESOURCE_KEYS)
        message = (
            f"--trial-resources: a trial asks for {', '.join(f'{k}={resources[k]:g}' for k in too_big)} but Ray has "
            f"{available} in all"
        )
        if local:
            raise ConfigError(message)
        LOGGER.warning("WARNING: %s; trials wait until the cluster grows", message)
    return resources


def build_scheduler(run: EvolveRun) -> Any:
    """``--evolve-scheduler``: None (fifo: every trial trains to the end) or Tune's ASHA on the per-epoch fitness,
    over ``--epochs`` with ``--asha-grace-period`` and ``--asha-reduction-factor``."""
    options, epochs = run.options, run.train_config.epochs
    if options.scheduler == "fifo":
        return None
    if options.grace_period > epochs:
        raise ConfigError(
            f"--asha-grace-period {options.grace_period} is more than --epochs {epochs}: no trial could be stopped"
        )
    if options.grace_period == epochs:
        LOGGER.warning("WARNING: --asha-grace-period equals --epochs (%d): ASHA will stop no trial early", epochs)
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=METRIC,
        mode="max",
        max_t=epochs,
        grace_period=options.grace_period,
        reduction_factor=options.reduction_factor,
    )


def build_searcher(run: EvolveRun) -> Any:
    """The Tune Searcher of ``--evolve-search`` (ga, random or optuna) over the trials this session runs."""
    search = run.options.search
    classes = tune_classes()
    if search == "ga":
        return classes.EvolveSearcher(run, propose_genetic)
    if search == "random":
        return classes.EvolveSearcher(run, functools.partial(propose_random, domains=random_domains(run)))
    if search == "optuna":
        optuna = optuna_searcher(run)
        return classes.EvolveSearcher(run, functools.partial(propose_optuna, searcher=optuna), inner=optuna)
    raise ConfigError(f"--evolve-search {search!r}: expected one of ga, random, optuna")


def trial_name(trial: Any) -> str:
    """Tune's name (and folder) of a trial: its number, then Tune's id (unique across resumed sessions)."""
    return f"trial_{int(trial.config[INDEX_KEY]):04d}_{trial.trial_id}"


# --------------------------------------------------------------------------------------------------------------------
# Proposals: one function per --evolve-search, each (run, trial_id, index) -> the trial's full hyp, or None (not yet)


def propose_genetic(run: EvolveRun, trial_id: str, index: int) -> dict[str, float] | None:
    """``run.strategy``'s proposal once it is ready (a generation waits for the trials it breeds from)."""
    if not run.strategy.ready(index, run.history):
        return None
    return run.strategy.propose(index, run.history)


def random_domains(run: EvolveRun) -> dict[str, Any]:
    """A Tune domain per evolved key: ``tune.loguniform`` for log-scale keys, else ``tune.uniform``."""
    from ray import tune

    domains = {}
    for key in run.strategy.keys:
        dimension = run.space.dimensions[key]
        if dimension.low < dimension.high:
            sample = tune.loguniform if dimension.scale == "log" else tune.uniform
            domains[key] = sample(dimension.low, dimension.high)
    return domains


def propose_random(run: EvolveRun, trial_id: str, index: int, *, domains: Mapping[str, Any]) -> dict[str, float]:
    """A start for the first trials (as the genetic strategy does), then each evolved key drawn from its domain with
    a generator seeded by (seed, trial number), so a trial re-run after a kill gets the same values."""
    strategy = run.strategy
    if index < len(strategy.starts):
        return strategy.propose(index, run.history)
    rng = np.random.default_rng([run.train_config.seed, index])
    drawn = {}
    for key, domain in domains.items():
        value = round_significant(float(domain.sample(random_state=rng)), SIGNIFICANT_DIGITS)
        drawn[key] = run.space.dimensions[key].clip(value)
    return {**strategy.starts[0], **drawn}


def optuna_searcher(run: EvolveRun) -> Any:
    """Ray's OptunaSearch (TPE, seeded) over the evolved keys. A resumed search passes its finished trials as
    evaluated points; a new one has Optuna evaluate the starting hyps first."""
    try:
        import optuna  # noqa: F401  (OptunaSearch would fail only later, inside Tune)
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:
        raise ConfigError(f"--evolve-search optuna needs Optuna ({e}): pip install optuna") from None
    dimensions = run.space.dimensions
    keys = [key for key in run.strategy.keys if dimensions[key].low < dimensions[key].high]
    domains = {key: value for key, value in random_domains(run).items() if key in keys}
    space = OptunaSearch.convert_search_space(domains)
    if run.history:
        points = [{key: dimensions[key].clip(record.hyp[key]) for key in keys} for record in run.history]
        rewards: list[float] | None = [record.fitness for record in run.history]
    else:
        points = [{key: dimensions[key].clip(start[key]) for key in keys} for start in run.strategy.starts]
        rewards = None
    return OptunaSearch(
        space=space,
        metric=METRIC,
        mode="max",
        points_to_evaluate=points,
        evaluated_rewards=rewards,
        seed=run.train_config.seed,
    )


def propose_optuna(run: EvolveRun, trial_id: str, index: int, *, searcher: Any) -> dict[str, float] | None:
    """Optuna's values of the evolved keys over ``--hyp``'s for the rest."""
    point = searcher.suggest(trial_id)
    if point is None or point == searcher.FINISHED:
        return None
    return {**run.strategy.starts[0], **{key: float(value) for key, value in point.items()}}


# --------------------------------------------------------------------------------------------------------------------
# Records: what a finished Tune trial becomes in evolve.csv


def trial_hyp(config: Mapping[str, Any], keys: tuple[str, ...] | list[str]) -> dict[str, float]:
    """The hyperparameters in a trial's Tune config."""
    return {key: float(config[key]) for key in keys}


def completed_outcome(
    config: Mapping[str, Any], result: Mapping[str, Any], keys: tuple[str, ...] | list[str], generation: int
) -> TrialOutcome:
    """A trial that ended without an error: ``ok`` if it trained to its end (its last result is marked
    :data:`FINISHED_KEY`), else ``stopped`` by the scheduler, with the fitness and epochs it last reported."""
    return TrialOutcome(
        index=int(config[INDEX_KEY]),
        generation=generation,
        hyp=trial_hyp(config, keys),
        metrics=validation_results(result),
        fitness=float(result.get(METRIC, 0.0)),
        seconds=float(result.get("time_total_s", 0.0)),
        epochs=int(result.get(TIME_ATTR, 0)),
        status="ok" if result.get(FINISHED_KEY) else "stopped",
    )


def failed_outcome(
    config: Mapping[str, Any],
    result: Mapping[str, Any],
    keys: tuple[str, ...] | list[str],
    generation: int,
    error: str,
) -> TrialOutcome:
    """A trial that raised (or whose worker died): fitness 0 and the error, as the local backend records it."""
    return TrialOutcome(
        index=int(config[INDEX_KEY]),
        generation=generation,
        hyp=trial_hyp(config, keys),
        fitness=0.0,
        seconds=float(result.get("time_total_s", 0.0)),
        epochs=int(result.get(TIME_ATTR, 0)),
        status="failed",
        error=error,
    )


def error_message(error: BaseException | str | None) -> str:
    """One line for evolve.csv's error column: ``Type: message`` of the exception a trial raised (Ray wraps it in a
    RayTaskError whose ``cause`` is the original), else the last line of Ray's error text."""
    if error is None:
        return "the trial failed (Ray kept no error)"
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            error = cause
        text = str(error).strip()
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else "the trial failed (Ray kept no error)"


# --------------------------------------------------------------------------------------------------------------------
# Tune's classes: defined on first use, as they subclass Ray's


@functools.cache
def tune_classes() -> types.SimpleNamespace:
    """``EvolveSearcher`` (a Tune Searcher) and ``RecordTrials`` (a Tune Callback), made when Ray is imported."""
    from ray.tune import Callback
    from ray.tune.search import Searcher

    class EvolveSearcher(Searcher):
        """Hands out this session's trial numbers in order, each with the hyp from ``propose(run, trial_id,
        index)``; returns None (ask again later) while ``propose`` cannot answer yet, FINISHED after the last.
        ``inner`` is a Ray searcher (Optuna) that hears of each trial's results."""

        def __init__(self, run: EvolveRun, propose: Any, inner: Any = None) -> None:
            super().__init__(metric=METRIC, mode="max")
            self.run = run
            self.propose = propose
            self.inner = inner
            self.indices = run.next_indices(run.remaining())
            self.proposed = 0

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            if self.proposed >= len(self.indices):
                return Searcher.FINISHED
            index = self.indices[self.proposed]
            hyp = self.propose(self.run, trial_id, index)
            if hyp is None:
                return None
            self.proposed += 1
            return {INDEX_KEY: index, **hyp}

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.inner is not None:
                self.inner.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            # The genetic strategy reads run.history, which RecordTrials fills; Optuna keeps its own study.
            if self.inner is not None:
                self.inner.on_trial_complete(trial_id, result=result, error=error)

        def save(self, checkpoint_path: str) -> None:
            """Nothing to save: evolve.csv is the search's state (a resumed search starts a new Tune run)."""

        def restore(self, checkpoint_path: str) -> None:
            """See :meth:`save`."""

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its searcher into tuner.pkl for Tuner.restore, which we never use: skip the run.
            return {key: value for key, value in self.__dict__.items() if key != "run"}

    class RecordTrials(Callback):
        """Records each trial in ``run`` (evolve.csv, hyp_evolve.yaml) as it ends, here in the driver."""

        def __init__(self, run: EvolveRun) -> None:
            self.run = run
            self.recorded: set[str] = set()

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            running = 1 + sum(t.status == "RUNNING" for t in trials if t is not trial)
            LOGGER.info("Evolve: trial %d started (%d running)", trial.config[INDEX_KEY], running)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not trial.last_result or INDEX_KEY not in trial.config:
                return  # removed before it reported anything (e.g. the run was stopped): it is proposed again
            self._record(trial, completed_outcome(trial.config, trial.last_result, self._keys, self._generation(trial)))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if INDEX_KEY not in trial.config:
                return
            error = error_message(_trial_error(trial))
            outcome = failed_outcome(trial.config, trial.last_result or {}, self._keys, self._generation(trial), error)
            LOGGER.warning("WARNING: evolve trial %d failed (fitness 0): %s", outcome.index, error)
            self._record(trial, outcome)

        @property
        def _keys(self) -> list[str]:
            return list(self.run.start)

        def _generation(self, trial: Any) -> int:
            # Generations are the genetic strategy's; Ray's searchers have none.
            return self.run.strategy.generation(int(trial.config[INDEX_KEY])) if self.run.options.search == "ga" else 0

        def _record(self, trial: Any, outcome: TrialOutcome) -> None:
            if trial.trial_id not in self.recorded:
                self.recorded.add(trial.trial_id)
                self.run.record(outcome)

        def __getstate__(self) -> dict[str, Any]:
            return {key: value for key, value in self.__dict__.items() if key != "run"}

    return types.SimpleNamespace(EvolveSearcher=EvolveSearcher, RecordTrials=RecordTrials)


def _trial_error(trial: Any) -> BaseException | str | None:
    """The exception a trial raised, as Tune stored it: pickled, else as text, in the driver's copy of the trial's
    folder (the storage copy under ``ray/`` is synced later, so it may not exist yet when the callback runs)."""
    from ray import cloudpickle

    try:
        pickled, text = trial.pickled_error_file, trial.error_file
        if pickled and Path(pickled).is_file():
            with open(pickled, "rb") as f:
                return cloudpickle.load(f)
        if text and Path(text).is_file():
            return Path(text).read_text(encoding="utf-8", errors="replace")
        return trial.get_pickled_error() or trial.get_error()
    except Exception as e:  # an unreadable error file must not cost the trial its row
        LOGGER.debug("could not read the error of trial %s: %s", trial.trial_id, e)
        return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --------------------------------------------------------------------------------------------------------------------
# The workers


@dataclass(frozen=True)
class TrialSetup:
    """What every trial's worker needs besides its config: a copy of the run (absolute paths, no history) to make
    the trial's TrainConfig, the hyp keys to read from the config, and how to train."""

    run: EvolveRun
    hyp_keys: tuple[str, ...]
    every_epoch: bool  # validate each epoch and report it (ASHA decides on it)
    threads: int  # torch threads: the CPUs the trial holds


def worker_copy(run: EvolveRun) -> EvolveRun:
    """The run as the workers get it: its folder and the training's input paths made absolute (a worker's working
    directory is not the driver's: Tune moves it into the trial's folder, and on a cluster it is another machine),
    without the history and table the workers do not use."""
    clone = copy.copy(run)
    clone.save_dir = run.save_dir.resolve()
    clone.train_config = absolute_paths(run.train_config)
    clone.history = []
    clone.table = None
    return clone


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with its relative file paths (weights, cfg, data, cache_dir) made absolute against this
    directory. Names that are not files here (``yolov5s.yaml`` in detector's configs, ``coco128.yaml``,
    downloadable weights) stay as they are: they resolve the same way anywhere."""
    changes = {}
    for name in ("weights", "cfg", "data"):
        value = getattr(config, name)
        if value and Path(value).expanduser().exists():
            changes[name] = str(Path(value).expanduser().resolve())
    if config.cache_dir:
        changes["cache_dir"] = str(Path(config.cache_dir).expanduser().resolve())
    return dataclasses.replace(config, **changes)


def trial_device(device: str, gpus: int) -> str:
    """A trial's ``--device`` inside its worker, where Ray's CUDA_VISIBLE_DEVICES shows only the trial's GPUs: the
    first of them, or the CPU when the trial holds none.

    A trial is one process: with several GPUs (``--trial-resources gpu=2``) it trains on the first only. Training a
    trial with DDP over its GPUs would need one process per GPU (Ray Train's TorchTrainer inside the trial, or
    torchrun); the trial's other GPUs stay idle here.
    """
    if device.strip().lower() == "cpu" or gpus == 0:
        return "cpu"
    if gpus > 1 or "," in device:
        LOGGER.warning("WARNING: an evolve trial trains in one process, on the first of its %d GPUs", gpus)
    return "0"


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune's function trainable: trains trial ``config[INDEX_KEY]`` with the hyp in ``config``.

    Each validated epoch but the last is reported as ``{"fitness", "epoch", metrics...}``; the trial's final result
    (its fitness, results and epochs, as :func:`run_trial` returns them) is reported last with ``finished: True``, so
    a trial ASHA stops never has it. An exception propagates: Tune records the trial as errored (with the traceback
    in its folder under ``ray/``) and the driver's callback records it as failed.
    """
    import contextlib

    import ray
    import torch
    from ray import tune

    from detector.evolve.search import run_trial
    from detector.utils.logging import setup_logging

    setup_logging(verbose=False)  # warnings reach the driver's console; the trial's full log is in its log.txt
    torch.set_num_threads(setup.threads)
    index = int(config[INDEX_KEY])
    train_config = setup.run.trial_config(index, trial_hyp(config, setup.hyp_keys), every_epoch=setup.every_epoch)
    train_config = dataclasses.replace(train_config, device=trial_device(train_config.device, len(ray.get_gpu_ids())))

    def report(epoch: int, fitness: float, metrics: dict[str, float]) -> None:
        completed = epoch + 1  # the trainer counts epochs from 0
        if completed < train_config.epochs:  # the last epoch is the final result below
            tune.report({METRIC: fitness, TIME_ATTR: completed, **metrics})

    # The progress bars (stderr) go to the trial's console.txt: several trials' bars would interleave in the driver.
    trial_dir = Path(train_config.project) / train_config.name
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "console.txt", "w", encoding="utf-8") as console, contextlib.redirect_stderr(console):
        fitness, metrics, epochs = run_trial(train_config, report=report if setup.every_epoch else None)
    tune.report({METRIC: fitness, TIME_ATTR: epochs, **metrics, FINISHED_KEY: True})
