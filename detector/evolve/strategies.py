"""Search strategies: how the next trial's hyperparameters follow from the starting hyps and the finished trials.

A strategy is an object with ``propose(index, history) -> hyp``. It is a pure function of the seed, the trial's
index and the part of the history it uses (its random numbers come from ``default_rng([seed, index])``), so a
resumed search proposes what the interrupted one would have, and trials may run in any order or all at once.
Trials ``0 .. len(starts) - 1`` are the starting hyps themselves: the baseline every later trial is measured against.

The registered strategies (:data:`STRATEGIES`):

- ``genetic`` (default): a generational genetic algorithm. Generation ``g`` (trials ``g*P .. g*P + P - 1``) is
  bred only from the trials of earlier generations, so it does not depend on which trial happened to finish first.
  Parents come by tournament from the best ``P`` trials so far (elitism: a good trial is never lost), their keys
  mix by uniform crossover, and Gaussian mutation moves each key by a fraction of its range (see
  :mod:`detector.evolve.space`).
- ``yolov5``: YOLOv5's classic search. Each trial mutates one parent (a fitness-weighted draw from the best 5, or
  their weighted mean) by random factors. It uses whatever has finished, so it never waits.

A new strategy is one class here::

    @register_strategy("random")
    class RandomStrategy(Strategy):
        def make_child(self, index, history, rng):
            dims = self.space.dimensions
            return {key: dims[key].from_unit(rng.random()) for key in self.keys}
"""

from __future__ import annotations

import difflib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from detector.errors import ConfigError
from detector.evolve.space import SearchSpace
from detector.utils.checks import check_choice

LOGGER = logging.getLogger(__name__)

STRATEGIES: dict[str, type[Strategy]] = {}


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial, as read back from evolve.csv."""

    index: int
    generation: int
    fitness: float  # 0 for a failed trial
    hyp: dict[str, float]  # every hyperparameter
    status: str = "ok"  # "ok" | "failed" | "stopped" (a trial scheduler such as ASHA ended it early)


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a strategy available by ``name`` (``EvolveConfig.strategy``)."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        if name in STRATEGIES:
            raise ValueError(f"search strategy {name!r} is registered twice")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return add


def build_strategy(name: str, space: SearchSpace, starts: Sequence[Mapping[str, float]], **kwargs: Any) -> Strategy:
    """The registered strategy ``name`` (a one-line ConfigError with a suggestion if there is none)."""
    return check_choice("--evolve-strategy", name, STRATEGIES)(space, starts, **kwargs)


class Strategy(ABC):
    """Base class: proposes the hyperparameters of trial ``index``. Subclasses implement :meth:`make_child` (the
    evolved keys of a trial after the starts) and, if they wait for earlier trials, :meth:`ready`.

    space: bounds and scales; starts: the starting hyps (``starts[0]`` is ``--hyp``: it decides which keys evolve
    and gives the others their value); seed: with the index, seeds each trial's random numbers; population: trials
    per generation; options: the strategy's settings, defaults in :attr:`OPTIONS`.
    """

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Any]] = {}  # the settings this strategy reads, with their defaults

    def __init__(
        self,
        space: SearchSpace,
        starts: Sequence[Mapping[str, float]],
        *,
        seed: int = 0,
        population: int = 8,
        **options: Any,
    ) -> None:
        if not starts:
            raise ValueError("a search strategy needs at least one starting hyp")
        if seed < 0:
            raise ConfigError(f"evolve seed: expected 0 or more, got {seed}")
        if population < 1:
            raise ConfigError(f"--evolve-population: expected 1 or more, got {population}")
        self.space = space
        self.starts = tuple({key: float(value) for key, value in start.items()} for start in starts)
        self.seed = seed
        self.population = population
        self.options = self._resolve_options(options)
        self._keys = space.evolved_keys(self.starts[0])
        if not self._keys:
            raise ConfigError(
                f"{space.source}: no hyperparameter can evolve (each is evolve: false, or 0 in the starting hyp)"
            )

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys this search changes, in the space file's order."""
        return self._keys

    def generation(self, index: int) -> int:
        """The generation of trial ``index`` (its column in evolve.csv)."""
        return index // self.population

    def ready(self, index: int, history: Sequence[TrialRecord]) -> bool:
        """Whether trial ``index`` can be proposed from ``history`` now; by default it always can."""
        return True

    def propose(self, index: int, history: Sequence[TrialRecord]) -> dict[str, float]:
        """The full hyp of trial ``index`` (every key of ``starts[0]``): a start as given, else a child whose
        evolved keys come from :meth:`make_child` and whose other keys are ``starts[0]``'s."""
        if index < len(self.starts):
            return {key: self.starts[index].get(key, value) for key, value in self.starts[0].items()}
        if not self.ready(index, history):
            raise ValueError(f"trial {index} of strategy {self.name!r} is not ready: earlier trials are missing")
        child = self.make_child(index, _unique(history), np.random.default_rng([self.seed, index]))
        return {**self.starts[0], **child}

    @abstractmethod
    def make_child(self, index: int, history: Sequence[TrialRecord], rng: np.random.Generator) -> dict[str, float]:
        """The evolved keys' values of trial ``index`` (past the starts), within their bounds. ``history`` holds
        each finished trial once."""

    def _resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """This strategy's options over its defaults. An option of another registered strategy is ignored (the
        caller may pass every setting of EvolveConfig, e.g. yolov5's ``parent``); any other name is an error."""
        known = {key for cls in STRATEGIES.values() for key in cls.OPTIONS}
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"strategy {self.name!r}: unknown option {key!r}{hint}")
        return {key: options.get(key, default) for key, default in self.OPTIONS.items()}


@register_strategy("genetic")
class GeneticStrategy(Strategy):
    """Generational (mu + lambda) genetic algorithm: tournament selection from the best ``population`` trials so
    far, uniform crossover, Gaussian mutation in unit space. Generation 0 (after the starts) mutates the starts.

    Options: mutation_prob, the chance that each evolved key mutates; sigma, the mutation's standard deviation as
    a fraction of the key's range (of its decades, for a log key).
    """

    OPTIONS: ClassVar[dict[str, Any]] = {"mutation_prob": 0.5, "sigma": 0.1}
    TOURNAMENT_SIZE = 3  # small enough that weaker trials sometimes breed (diversity), large enough to favour the best
    MAX_DRAWS = 20  # attempts at a child that no finished trial already tried
    DIGITS = 6  # significant digits kept: evolve.csv stays readable, and near-identical trials count as equal

    def __init__(self, space: SearchSpace, starts: Sequence[Mapping[str, float]], **kwargs: Any) -> None:
        super().__init__(space, starts, **kwargs)
        self.mutation_prob = _probability(self.options["mutation_prob"], "mutation_prob", self.name)
        self.sigma = _non_negative(self.options["sigma"], "sigma", self.name)
        self._mutation_on = self.mutation_prob > 0 and self.sigma > 0

    def ready(self, index: int, history: Sequence[TrialRecord]) -> bool:
        """True when every trial of the earlier generations has finished (always true in generation 0)."""
        if index < len(self.starts):
            return True
        finished = {record.index for record in history}
        return all(i in finished for i in range(self.generation(index) * self.population))

    def make_child(self, index: int, history: Sequence[TrialRecord], rng: np.random.Generator) -> dict[str, float]:
        generation = self.generation(index)
        past = [record for record in history if self.generation(record.index) < generation]
        pool = self._pool(past) if generation > 0 else []
        tried = {self._signature(hyp) for hyp in [*self.starts, *(record.hyp for record in past)]}
        for _ in range(self.MAX_DRAWS):
            if generation == 0:
                base = self._evolved(self.starts[index % len(self.starts)])
            else:
                base = self._crossover(*self._parents(pool, rng), rng)
            child = self._mutate(base, rng)
            changed = not self._mutation_on or self._signature(child) != self._signature(base)
            if changed and self._signature(child) not in tried:
                return child
        LOGGER.warning("evolve: trial %d repeats an earlier trial after %d draws", index, self.MAX_DRAWS)
        return child

    def _pool(self, past: Sequence[TrialRecord]) -> list[TrialRecord]:
        """The best ``population`` trials, best first (ties: the earlier trial). Failed trials (fitness 0, and a
        hyp that may be the reason) breed only when every trial so far failed."""
        usable = [record for record in past if record.status != "failed"] or list(past)
        return sorted(usable, key=lambda record: (-record.fitness, record.index))[: self.population]

    def _parents(self, pool: Sequence[TrialRecord], rng: np.random.Generator) -> tuple[TrialRecord, TrialRecord]:
        """Two parents by tournament; the second is drawn from the pool without the first (when the pool has
        more than one trial), so crossover mixes two different trials."""
        first = self._tournament(pool, rng)
        second = self._tournament([record for record in pool if record is not first] or pool, rng)
        return first, second

    def _tournament(self, pool: Sequence[TrialRecord], rng: np.random.Generator) -> TrialRecord:
        """The fittest of ``TOURNAMENT_SIZE`` pool members drawn at random (``pool`` is sorted best first)."""
        entrants = rng.choice(len(pool), size=min(self.TOURNAMENT_SIZE, len(pool)), replace=False)
        return pool[int(entrants.min())]

    def _crossover(self, first: TrialRecord, second: TrialRecord, rng: np.random.Generator) -> dict[str, float]:
        """Uniform crossover: each evolved key from either parent with probability 0.5."""
        from_first = rng.random(len(self.keys)) < 0.5
        return {
            key: float((first if take else second).hyp[key]) for key, take in zip(self.keys, from_first, strict=True)
        }

    def _mutate(self, values: Mapping[str, float], rng: np.random.Generator) -> dict[str, float]:
        """Each key mutates with ``mutation_prob`` (at least one key when that is above 0, so no draw is wasted):
        its unit-space position moves by N(0, sigma), then the value is clipped and rounded."""
        mutates = rng.random(len(self.keys)) < self.mutation_prob
        forced = rng.integers(len(self.keys))  # drawn every time: the draws that follow do not depend on the mask
        if self._mutation_on and not mutates.any():
            mutates[forced] = True
        steps = rng.normal(0.0, self.sigma, len(self.keys))
        child = {}
        for key, mutate, step in zip(self.keys, mutates, steps, strict=True):
            dim = self.space.dimensions[key]
            value = dim.from_unit(dim.to_unit(values[key]) + step) if mutate else values[key]
            child[key] = dim.clip(round_significant(value, self.DIGITS))
        return child

    def _evolved(self, hyp: Mapping[str, float]) -> dict[str, float]:
        return {key: float(hyp[key]) for key in self.keys}

    def _signature(self, hyp: Mapping[str, float]) -> tuple[float, ...]:
        """What makes two trials the same: their evolved keys, rounded as children are."""
        return tuple(round_significant(float(hyp[key]), self.DIGITS) for key in self.keys)


@register_strategy("yolov5")
class YOLOv5Strategy(Strategy):
    """YOLOv5's classic evolution: one parent from the best 5 finished trials, mutated by random factors.

    Options: parent, "single" (one of the 5, drawn with weights fitness - lowest + 1e-6) or "weighted" (their
    fitness-weighted mean); mutation_prob, the chance each key mutates; sigma, the factors' spread.
    Multiplicative factors make every key move by ratios; a key whose parent value is 0 stays 0.
    """

    OPTIONS: ClassVar[dict[str, Any]] = {"parent": "single", "mutation_prob": 0.8, "sigma": 0.2}
    TOP = 5  # parents are drawn from this many best trials
    FACTOR_RANGE = (0.3, 3.0)  # no single mutation shrinks a value below 0.3x or grows it past 3x
    DIGITS = 5

    def __init__(self, space: SearchSpace, starts: Sequence[Mapping[str, float]], **kwargs: Any) -> None:
        super().__init__(space, starts, **kwargs)
        self.parent = self.options["parent"]
        if self.parent not in ("single", "weighted"):
            raise ConfigError(f"strategy 'yolov5': parent must be 'single' or 'weighted', got {self.parent!r}")
        self.mutation_prob = _probability(self.options["mutation_prob"], "mutation_prob", self.name)
        self.sigma = _non_negative(self.options["sigma"], "sigma", self.name)

    def make_child(self, index: int, history: Sequence[TrialRecord], rng: np.random.Generator) -> dict[str, float]:
        parent = self._parent(history, rng)
        factors = self._factors(rng)
        return {
            key: self.space.dimensions[key].clip(round_significant(parent[key] * factor, self.DIGITS))
            for key, factor in zip(self.keys, factors, strict=True)
        }

    def _parent(self, history: Sequence[TrialRecord], rng: np.random.Generator) -> dict[str, float]:
        """The evolved keys of the parent: from the best ``TOP`` trials that did not fail, else ``starts[0]``."""
        finished = [record for record in history if record.status != "failed"]
        top = sorted(finished, key=lambda record: (-record.fitness, record.index))[: self.TOP]
        if not top:
            return {key: self.starts[0][key] for key in self.keys}
        fitness = np.array([record.fitness for record in top], dtype=float)
        weights = fitness - fitness.min() + 1e-6  # the weakest of the 5 still has a (tiny) chance
        if self.parent == "single":
            chosen = top[int(rng.choice(len(top), p=weights / weights.sum()))]
            return {key: float(chosen.hyp[key]) for key in self.keys}
        values = np.array([[record.hyp[key] for key in self.keys] for record in top], dtype=float)
        return dict(zip(self.keys, (weights @ values / weights.sum()).tolist(), strict=True))

    def _factors(self, rng: np.random.Generator) -> np.ndarray:
        """One factor per evolved key: 1 + N(0, 1) * U(0, 1) * sigma with probability ``mutation_prob``, else 1;
        drawn again until some factor differs from 1 (all ones when mutation_prob is 0: mutation off). The single
        U(0, 1) per draw scales the whole mutation, so some children stay close to the parent and some go far."""
        factors = np.ones(len(self.keys))
        while self.mutation_prob > 0 and self.sigma > 0 and np.all(factors == 1):
            mutates = rng.random(len(self.keys)) < self.mutation_prob
            scale = rng.random() * self.sigma
            factors = np.clip(1 + mutates * rng.standard_normal(len(self.keys)) * scale, *self.FACTOR_RANGE)
        return factors


def round_significant(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant digits (0.00123456789, 6 -> 0.00123457)."""
    return float(f"{value:.{digits}g}")


def _unique(history: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Each trial once (the last record of an index wins), in index order."""
    return sorted({record.index: record for record in history}.values(), key=lambda record: record.index)


def _probability(value: Any, name: str, strategy: str) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"strategy {strategy!r}: {name} must be between 0 and 1, got {value}")
    return float(value)


def _non_negative(value: Any, name: str, strategy: str) -> float:
    if float(value) < 0:
        raise ConfigError(f"strategy {strategy!r}: {name} must be 0 or more, got {value}")
    return float(value)
