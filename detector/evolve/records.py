"""The files of an evolution: ``evolve.csv`` (one row per trial), ``hyp_evolve.yaml`` (the best trial's
hyperparameters, loadable with ``--hyp``), ``evolve.png`` (one panel per evolved key) and the printed summary.

``evolve.csv`` is the search's only state: a resumed search reads its finished trials back from it. It is
rewritten atomically after every trial, so a kill at any moment leaves every finished trial in it and nothing
half-written. Its result columns carry YOLOv5's names (``metrics/mAP_0.5`` ...), then come every hyperparameter.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detector.errors import ConfigError
from detector.evolve.space import SearchSpace
from detector.evolve.strategies import TrialRecord
from detector.utils.files import atomic_write, atomic_write_csv
from detector.utils.plots import new_figure, save_figure

LOGGER = logging.getLogger(__name__)

# YOLOv5's names of the four figures, as in results.csv, in --fitness-weights order.
METRIC_COLUMNS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95")
METRIC_LABELS = ("P", "R", "mAP50", "mAP50-95")
DEFAULT_LOSS_COLUMNS = ("val/box_loss", "val/obj_loss", "val/cls_loss")
TRIAL_COLUMNS = ("trial", "generation", "fitness")
RUN_COLUMNS = ("time", "epochs", "status", "error")  # seconds of the trial, epochs it trained, ok/failed/stopped


@dataclass
class TrialOutcome:
    """What one trial gave: its results (``metrics`` keyed by results.csv's column names, e.g.
    ``metrics/mAP_0.5`` and ``val/box_loss``), how long it took, and how it ended."""

    index: int
    generation: int
    hyp: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    fitness: float = 0.0
    seconds: float = 0.0
    epochs: int = 0
    status: str = "ok"  # ok | failed (error says why) | stopped (ended early by a trial scheduler)
    error: str = ""

    def record(self) -> TrialRecord:
        return TrialRecord(self.index, self.generation, self.fitness, dict(self.hyp), self.status)


def validation_results(row: Mapping[str, Any]) -> dict[str, float]:
    """The validation figures of a results row (a results.csv row, a trial's report): the ``metrics/`` and ``val/``
    columns, the ones evolve.csv keeps."""
    return {key: float(value) for key, value in row.items() if key.startswith(("metrics/", "val/"))}


class EvolveTable:
    """``evolve.csv``: the rows of the finished trials, with the columns fixed by the hyperparameter keys and
    widened (the file rewritten) if a trial brings a validation loss the header lacks."""

    def __init__(self, path: str | Path, hyp_keys: Sequence[str]) -> None:
        self.path = Path(path)
        self.hyp_keys = tuple(hyp_keys)
        self.loss_columns: tuple[str, ...] = DEFAULT_LOSS_COLUMNS
        self.rows: list[dict[str, str]] = []
        if self.path.exists():
            self._read()

    @property
    def columns(self) -> tuple[str, ...]:
        return (*TRIAL_COLUMNS, *METRIC_COLUMNS, *self.loss_columns, *RUN_COLUMNS, *self.hyp_keys)

    def records(self) -> list[TrialRecord]:
        """The finished trials, for the search strategy."""
        return [self._record(row, number) for number, row in enumerate(self.rows, start=2)]

    def add(self, outcome: TrialOutcome) -> None:
        """Append a trial's row and rewrite the file atomically."""
        losses = [key for key in outcome.metrics if key.startswith("val/") and key not in self.loss_columns]
        self.loss_columns = (*self.loss_columns, *losses)
        row = {
            "trial": str(outcome.index),
            "generation": str(outcome.generation),
            "fitness": _number(outcome.fitness),
            **dict.fromkeys(METRIC_COLUMNS, "0"),  # a failed trial has no results: it scores 0
            **{key: _number(value) for key, value in outcome.metrics.items()},
            "time": f"{outcome.seconds:.1f}",
            "epochs": str(outcome.epochs),
            "status": outcome.status,
            "error": " ".join(outcome.error.split())[:500],  # one line, short: the trial's log has the rest
            **{key: _number(outcome.hyp[key]) for key in self.hyp_keys},
        }
        self.rows.append(row)
        atomic_write_csv(self.path, self.columns, self.rows)

    def best_row(self) -> dict[str, str] | None:
        """The row of the fittest trial (the first of equals), None before any trial finished."""
        if not self.rows:
            return None
        return max(self.rows, key=lambda row: float(row["fitness"]))

    def _read(self) -> None:
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            rows = list(reader)
        required = (*TRIAL_COLUMNS, *METRIC_COLUMNS, *RUN_COLUMNS, *self.hyp_keys)
        missing = [column for column in required if column not in header]
        if missing:
            raise ConfigError(f"{self.path}: not an evolve.csv of this search; columns missing: {', '.join(missing)}")
        self.loss_columns = tuple(c for c in header if c.startswith("val/"))
        self.rows = rows
        self.records()  # every row must parse: a damaged file stops here, naming the line

    def _record(self, row: Mapping[str, str], line: int) -> TrialRecord:
        try:
            return TrialRecord(
                index=int(row["trial"]),
                generation=int(row["generation"]),
                fitness=float(row["fitness"]),
                hyp={key: float(row[key]) for key in self.hyp_keys},
                status=row["status"],
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.path}: line {line} is not a complete trial row ({e})") from None


def _number(value: float) -> str:
    """Six significant digits: enough for log-scale keys such as lr0 1.2345e-05, short for the rest."""
    return f"{float(value):.6g}"


# --------------------------------------------------------------------------------------------------------------------
# hyp_evolve.yaml and the summary


def fitness_formula(weights: Sequence[float]) -> str:
    terms = [f"{w:g} * {label}" for w, label in zip(weights, METRIC_LABELS, strict=True) if w]
    return " + ".join(terms)


def results_line(row: Mapping[str, str]) -> str:
    figures = ", ".join(
        f"{label} {float(row[column]):.4f}" for column, label in zip(METRIC_COLUMNS, METRIC_LABELS, strict=True)
    )
    return f"trial {row['trial']} (generation {row['generation']}): fitness {float(row['fitness']):.5f}; {figures}"


def write_best_hyp(
    path: str | Path, table: EvolveTable, weights: Sequence[float], command: str, total_trials: int
) -> dict[str, str] | None:
    """hyp_evolve.yaml: the fittest trial's hyperparameters, with its results and the command in a header comment;
    ``--hyp hyp_evolve.yaml`` trains with them. Returns the best row (None before any trial finished)."""
    best = table.best_row()
    if best is None:
        return None
    header = [
        f"Hyperparameter evolution: the best of {len(table.rows)} trials (of {total_trials})",
        results_line(best),
        f"fitness = {fitness_formula(weights)}",
        f"command: {command}",
        f"train with these: python train.py --hyp {Path(path).name} ...",
    ]
    hyp = {key: _plain(float(best[key])) for key in table.hyp_keys}
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(hyp, sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return best


def _plain(value: float) -> float | int:
    return int(value) if value.is_integer() and abs(value) < 1e6 else value


def summary_lines(table: EvolveTable, start: Mapping[str, float], keys: Sequence[str]) -> list[str]:
    """The printed summary: the best trial, its results, and each evolved key that moved from the start."""
    best = table.best_row()
    if best is None:
        return ["No trial finished."]
    counts = {status: sum(row["status"] == status for row in table.rows) for status in ("ok", "stopped", "failed")}
    lines = [
        f"{len(table.rows)} trials ({counts['ok']} ok, {counts['stopped']} stopped early, {counts['failed']} failed)",
        f"Best: {results_line(best)}",
    ]
    changed = [
        f"{key} {start[key]:.5g} -> {float(best[key]):.5g}" for key in keys if float(best[key]) != float(start[key])
    ]
    lines.append("Changed from the start: " + (", ".join(changed) if changed else "nothing (the start is the best)"))
    return lines


# --------------------------------------------------------------------------------------------------------------------
# evolve.png


def evolve_figure(table: EvolveTable, keys: Sequence[str], space: SearchSpace):
    """One panel per evolved key: each trial's value against its fitness, coloured by trial order (later = yellower);
    the best trial is a red star and its value the panel's title. Log-scale keys get a log axis."""
    columns = max(1, min(5, math.ceil(math.sqrt(len(keys)))))
    panel_rows = max(1, math.ceil(len(keys) / columns))
    figure = new_figure((3.0 * columns, 2.6 * panel_rows))
    fitness = np.array([float(row["fitness"]) for row in table.rows])
    order = np.arange(len(table.rows))
    best = int(np.argmax(fitness)) if len(fitness) else -1
    for i, key in enumerate(keys):
        axes = figure.add_subplot(panel_rows, columns, i + 1)
        values = np.array([float(row[key]) for row in table.rows])
        axes.scatter(values, fitness, c=order, cmap="viridis", s=14, alpha=0.8, edgecolors="none")
        if best >= 0:
            axes.plot(values[best], fitness[best], "r*", markersize=13)
            axes.set_title(f"{key} = {values[best]:.4g}", fontsize=9)
        dimension = space.dimensions.get(key)
        if dimension is not None and dimension.scale == "log":
            from matplotlib.ticker import NullFormatter

            axes.set_xscale("log")
            axes.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a narrow panel
        axes.tick_params(labelsize=7)
        if i % columns == 0:
            axes.set_ylabel("fitness", fontsize=8)
    return figure


def plot_evolution(path: str | Path, table: EvolveTable, keys: Sequence[str], space: SearchSpace) -> Path | None:
    if not table.rows or not keys:
        return None
    return save_figure(evolve_figure(table, keys, space), path, dpi=120)
