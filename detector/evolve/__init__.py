"""Hyperparameter evolution (``train.py --evolve``), one concern per module.

=====================  ==============================================================================
module                 holds
=====================  ==============================================================================
``space.py``           :class:`SearchSpace`: bounds, scale and whether each hyp key evolves (a YAML file)
``strategies.py``      :class:`Strategy` and its registry: ``genetic`` (tournament, crossover, range-scaled
                       mutation, elitism) and ``yolov5`` (YOLOv5's single-parent mutation)
``records.py``         evolve.csv, hyp_evolve.yaml, evolve.png and the printed summary
``search.py``          :class:`EvolveRun` (the folder, options and finished trials, resume), one trial
                       (:func:`run_trial`), the local loop and :func:`evolve` (``detector.evolve``)
``ray_backend.py``     the same search on Ray Tune: concurrent trials, Ray's searchers, ASHA
=====================  ==============================================================================

A new strategy is one :class:`Strategy` subclass decorated with :func:`register_strategy` in ``strategies.py``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from detector.evolve.space import DEFAULT_SPACE, Dimension, SearchSpace
from detector.evolve.strategies import STRATEGIES, Strategy, TrialRecord, build_strategy, register_strategy


def evolve(**options: Any) -> TrialRecord | None:
    """``detector.evolve(evolve=16, data="coco128.yaml", epochs=3)``: see :func:`detector.evolve.search.evolve`."""
    from detector.evolve.search import evolve as run  # lazy import: the trainer imports torch

    return run(**options)


class _CallablePackage(types.ModuleType):
    """``detector.evolve`` names both this package and the public function ``detector.evolve(...)`` (as
    ``detector.export`` does): calling the package calls the function."""

    def __call__(self, **options: Any) -> TrialRecord | None:
        return evolve(**options)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = [
    "DEFAULT_SPACE",
    "STRATEGIES",
    "Dimension",
    "SearchSpace",
    "Strategy",
    "TrialRecord",
    "build_strategy",
    "evolve",
    "register_strategy",
]
