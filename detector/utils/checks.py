"""The small option checks every task shares: image sizes rounded to the model's stride, thresholds in [0, 1], a
name looked up in a registry.

One home for each, so train.py, val.py, detect.py and export.py round and refuse the same way.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

from detector.errors import ConfigError

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")


def round_to_stride(size: int, stride: int, minimum: int | None = None) -> int:
    """``size`` rounded up to a multiple of ``stride``, and at least ``minimum`` (default: one stride)."""
    return max(math.ceil(size / stride) * stride, stride if minimum is None else minimum)


def check_imgsz(
    imgsz: int | Sequence[int], stride: int, *, minimum: int | None = None, flag: str = "--imgsz"
) -> tuple[int, int]:
    """(height, width) from one size or (height, width), each rounded up to a multiple of ``stride``.

    Sizes that are not positive integers raise a one-line ConfigError naming ``flag``; a size that had to be
    rounded is logged once as a warning. ``minimum`` (default: one stride) is the smallest side allowed.
    """
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    if len(sizes) not in (1, 2) or any(isinstance(s, bool) or int(s) != s or int(s) <= 0 for s in sizes):
        raise ConfigError(f"{flag} expects one or two positive integers (size, or height width), got {sizes}")
    height, width = (int(sizes[0]),) * 2 if len(sizes) == 1 else (int(sizes[0]), int(sizes[1]))
    rounded = (round_to_stride(height, stride, minimum), round_to_stride(width, stride, minimum))
    if rounded != (height, width):
        shown = " ".join(map(str, sizes))
        LOGGER.warning(
            "WARNING: %s %s must be a multiple of the max stride %d; using %s", flag, shown, stride, list(rounded)
        )
    return rounded


def check_threshold(flag: str, value: float) -> float:
    """``value`` if it lies in [0, 1], else a ConfigError (a ValueError) naming ``flag``."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag} must be between 0 and 1, got {value}")
    return value


def check_choice(flag: str, name: str, options: Mapping[str, T]) -> T:
    """``options[name]`` (a registry: schedules, export formats), or a one-line ConfigError naming ``flag`` with the
    closest option and every option."""
    if name not in options:
        close = difflib.get_close_matches(name, list(options), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{flag} {name!r}: unknown{hint} (choose from {', '.join(options)})")
    return options[name]
