"""Models: the layer registry, blocks, the Detect head, ``DetectionModel`` and loading of checkpoints.

Names are imported lazily so ``import detector.models`` stays cheap until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DetectionModel": "detector.models.yolo",
    "LayerSpec": "detector.models.yolo",
    "ModelInfo": "detector.models.yolo",
    "Detect": "detector.models.head",
    "register": "detector.models.registry",
    "get_layer": "detector.models.registry",
    "load_model": "detector.models.loading",
    "model_from_checkpoint": "detector.models.loading",
    "checkpoint_model_entries": "detector.models.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detector.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
