"""detector: YOLOv5-style object detection - train, validate, detect and export.

Public API (imported lazily, so ``import detector`` stays cheap and does not import torch)::

    import detector
    model = detector.load_model("yolov5n.pt")            # ours or YOLOv5's .pt -> DetectionModel (eval mode)
    predictions = model(images)                          # (B, N, 5 + nc) xywh pixels, objectness, class scores
    metrics = detector.train(data="coco128.yaml", weights="yolov5n.pt", imgsz=320, epochs=3)  # train.py's options
    metrics = detector.val("best.pt", data="coco128.yaml", imgsz=640)  # val.py's options -> Metrics
    rows = detector.benchmarks("best.pt", data="coco128.yaml")  # every export format validated and timed
    best = detector.evolve(evolve=16, data="coco128.yaml", epochs=3)  # train.py --evolve 16: the best trial

Further names join by adding one line to ``_EXPORTS``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # public name -> module that defines it
    "ablate": "detector.ablation",
    "benchmarks": "detector.export.benchmarks",
    "load_model": "detector.models.loading",
    "DetectionModel": "detector.models.yolo",
    "Detector": "detector.engine.predictor",
    "evolve": "detector.evolve",
    "export": "detector.export",
    "train": "detector.engine.trainer",
    "val": "detector.engine.validator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "__version__":  # lazy too: importlib.metadata costs tens of milliseconds
        from importlib import metadata

        try:
            return metadata.version("detector")
        except metadata.PackageNotFoundError:  # a source tree that was never installed
            return "0.0.0"
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detector' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
