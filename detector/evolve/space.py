"""The search space of hyperparameter evolution: the bounds, scale and on/off switch of each hyperparameter.

A space is a YAML mapping from ``Hyperparameters`` keys to ``{low, high, scale, evolve}`` (the default is
``configs/evolve/default.yaml``, YOLOv5's ranges). Strategies move values in *unit space*: each value's position
in its range, from 0 at ``low`` to 1 at ``high``, measured on a log axis for ``scale: log``. One mutation size
then suits every key: a step of 0.1 is a tenth of the range of ``box`` (0.02..0.2) and a tenth of the decades of
``lr0`` (1e-5..0.1), so a learning rate moves by factors, never by a fixed amount that is huge at 1e-5.

A key evolves unless its ``evolve`` is false, or (``evolve`` left out) the starting hyp sets it to 0: a 0 means
"this augmentation is off" (``mixup`` in hyp.scratch-low.yaml), and the search should not switch it on.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from detector.config import CONFIG_DIR, Hyperparameters, load_yaml
from detector.errors import ConfigError

DEFAULT_SPACE = CONFIG_DIR / "evolve" / "default.yaml"

SCALES = ("linear", "log")
_FIELDS = ("low", "high", "scale", "evolve")
_HYP_DEFAULTS: dict[str, float] = dataclasses.asdict(Hyperparameters())


@dataclass(frozen=True)
class Dimension:
    """The range of one hyperparameter. ``scale="log"`` (needs ``low > 0``) spaces positions by ratio, not by
    difference; ``evolve`` None means "evolves unless its starting value is 0", True/False force it."""

    name: str
    low: float
    high: float
    scale: Literal["linear", "log"] = "linear"
    evolve: bool | None = None

    def to_unit(self, value: float) -> float:
        """Position of ``value`` in the range: 0 at ``low``, 1 at ``high`` (on a log axis for log scale). Values
        outside the range are clipped first, so the position always lies in [0, 1]."""
        start, stop = self._axis()
        if stop == start:
            return 0.0
        return (self._to_axis(self.clip(value)) - start) / (stop - start)

    def from_unit(self, position: float) -> float:
        """The value at ``position`` (clipped to [0, 1] first); the inverse of :meth:`to_unit`."""
        start, stop = self._axis()
        point = start + min(max(position, 0.0), 1.0) * (stop - start)
        value = math.exp(point) if self.scale == "log" else point
        return self.clip(value)  # exp(log(x)) may land a hair outside the bounds

    def clip(self, value: float) -> float:
        """``value`` limited to [low, high]."""
        return min(max(float(value), self.low), self.high)

    def evolves(self, start: float) -> bool:
        """Whether the search may change this key, given its value in the starting hyp."""
        return self.evolve if self.evolve is not None else start != 0

    def _axis(self) -> tuple[float, float]:
        return self._to_axis(self.low), self._to_axis(self.high)

    def _to_axis(self, value: float) -> float:
        return math.log(value) if self.scale == "log" else value


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a search, in file order, and the file they came from (named in every error)."""

    dimensions: dict[str, Dimension]
    source: str

    @classmethod
    def load(cls, path: str | Path | None = None) -> SearchSpace:
        """Read and check a space YAML (``None``: the shipped default); each mistake is a one-line ConfigError
        naming the file and the key."""
        path = DEFAULT_SPACE if path is None else Path(path)
        source = str(path)
        data = load_yaml(path)
        if not data:
            raise ConfigError(f"{source}: the search space is empty; give low and high for some hyperparameters")
        dimensions = {str(key): _parse_dimension(str(key), entry, source) for key, entry in data.items()}
        return cls(dimensions, source)

    def evolved_keys(self, start: Mapping[str, float]) -> tuple[str, ...]:
        """The keys the search changes, in file order, given the starting hyp (keys it lacks take the defaults)."""
        return tuple(key for key, dim in self.dimensions.items() if dim.evolves(_start_value(start, key)))

    def check_start(self, start: Mapping[str, float], source: str) -> None:
        """Refuse a starting hyp (read from ``source``) with an evolving value outside its bounds: the search
        could never return to it, and clipping it silently would change the user's baseline."""
        for key in self.evolved_keys(start):
            dim = self.dimensions[key]
            value = _start_value(start, key)
            if not dim.low <= value <= dim.high:
                raise ConfigError(
                    f"{source}: hyp.{key} = {value} is outside its bounds [{dim.low}, {dim.high}] in {self.source}"
                )

    def clip(self, hyp: Mapping[str, float]) -> dict[str, float]:
        """A copy of ``hyp`` with every key of the space limited to its bounds; other keys unchanged."""
        dims = self.dimensions
        return {key: dims[key].clip(value) if key in dims else value for key, value in hyp.items()}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The space in its YAML form (what :meth:`load` reads back): per key low, high, scale, and evolve when
        it is forced."""
        entries = {}
        for key, dim in self.dimensions.items():
            entries[key] = {"low": dim.low, "high": dim.high, "scale": dim.scale}
            if dim.evolve is not None:
                entries[key]["evolve"] = dim.evolve
        return entries


def _start_value(start: Mapping[str, float], key: str) -> float:
    """``start[key]``, or the Hyperparameters default when a (partial) starting hyp lacks the key."""
    return float(start[key] if key in start else _HYP_DEFAULTS[key])


def _parse_dimension(key: str, entry: Any, source: str) -> Dimension:
    """One ``key: {low, high, scale, evolve}`` entry, checked field by field."""
    where = f"{source}: key '{key}'"
    if key not in _HYP_DEFAULTS:
        close = difflib.get_close_matches(key, list(_HYP_DEFAULTS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown hyperparameter '{key}'{hint}")
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} expects a mapping like {{low: 0.0, high: 1.0}}, got {entry!r}")
    for name in entry:
        if name not in _FIELDS:
            close = difflib.get_close_matches(str(name), _FIELDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown field '{name}'{hint} (valid fields: {', '.join(_FIELDS)})")
    low, high = _number(entry, "low", where), _number(entry, "high", where)
    if low > high:
        raise ConfigError(f"{where}: low {low} is above high {high}")
    scale = entry.get("scale", "linear")
    if scale not in SCALES:
        raise ConfigError(f"{where}: scale must be one of {list(SCALES)}, got {scale!r}")
    if scale == "log" and low <= 0:
        raise ConfigError(f"{where}: scale log needs low > 0, got low {low}")
    evolve = entry.get("evolve")
    if evolve is not None and not isinstance(evolve, bool):
        raise ConfigError(f"{where}: evolve must be true or false (or left out for auto), got {evolve!r}")
    return Dimension(key, low, high, scale, evolve)


def _number(entry: Mapping[str, Any], name: str, where: str) -> float:
    """A finite number; strings such as "1e-5" count too (YAML 1.1 reads 1e-5 without a dot as a string)."""
    if name not in entry:
        raise ConfigError(f"{where}: {name} is missing")
    value = entry[name]
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    return number
