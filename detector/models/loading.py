"""Checkpoints <-> models: the one loader for ``.pt`` files (ours and YOLOv5's) and the model part of our checkpoints.

Our checkpoints (schema in docs/architecture.md) hold the model as plain data: ``model_yaml`` (the architecture
dict), ``names`` and state dicts under ``model``/``ema``. They load with ``torch.load(weights_only=True)``; the
model is rebuilt from the YAML, never unpickled. YOLOv5's release files go through the restricted unpickler of
:mod:`detector.models.yolov5_import`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detector.errors import CheckpointError, ConfigError
from detector.models.blocks import Conv
from detector.models.release import resolve_release_weights
from detector.models.yolo import DetectionModel
from detector.utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from detector.utils.torch_utils import unwrap_model

LOGGER = logging.getLogger(__name__)


def _refuse_export(path: Path) -> None:
    """CheckpointError for a file (or OpenVINO folder) that export.py wrote, by the export formats' own registry: an
    inference file, not a checkpoint (no training state, BatchNorm folded). Checkpoints pass without importing the
    export package."""
    from detector.engine.backends import PYTORCH_SUFFIXES

    if path.suffix.lower() in PYTORCH_SUFFIXES or not path.exists():
        return
    from detector.export.base import format_for_path  # the package registers every format on import

    exported = format_for_path(path)
    if exported is not None:
        raise CheckpointError(
            f"{path}: {exported.title} export (val.py and detect.py run it); this needs the .pt checkpoint it was "
            "exported from"
        )


def load_model(path: str | Path, device: str | torch.device = "cpu", fuse: bool = False) -> DetectionModel:
    """A DetectionModel from a ``.pt`` file: ours (EMA weights when present) or a YOLOv5 release/training file.

    The model is float32, on ``device``, in eval mode. ``fuse`` prepares it for inference: BatchNorm folded into
    the convolutions and, on the CPU, weights in channels_last memory (oneDNN's NHWC convolutions measured 25-40%
    faster than NCHW for yolov5n/s here, scripts/benchmark.py --only 'model/*'; NCHW inputs still work).
    Raises CheckpointError (one line naming the file) for a missing, unreadable, inconsistent or refused file.
    """
    path = resolve_release_weights(path)  # a bare 'yolov5s.pt' not on disk: YOLOv5's release file, fetched once
    _refuse_export(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as ours_error:
        # Not loadable with weights_only=True: YOLOv5's pickled modules, or something else entirely.
        from detector.models.yolov5_import import load_yolov5_checkpoint

        LOGGER.debug("%s is not a weights-only checkpoint (%s); trying the YOLOv5 format", path, ours_error)
        model = load_yolov5_checkpoint(path)
    else:
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path}: not a detector checkpoint (no format tag {CHECKPOINT_FORMAT!r}) nor a YOLOv5 model file"
            )
        model = model_from_checkpoint(checkpoint, prefer_ema=True, source=str(path))
    model = model.float().to(device).eval()
    if fuse:
        model.fuse()
        if torch.device(device).type == "cpu":
            model.to(memory_format=torch.channels_last)
    return model


def model_from_checkpoint(
    checkpoint: dict[str, Any], prefer_ema: bool = True, source: str = "checkpoint"
) -> DetectionModel:
    """Rebuild the model of one of our checkpoint dicts: architecture from ``model_yaml``, weights from ``ema``
    (when ``prefer_ema`` and present) else ``model``, class names from ``names``. Returned in training mode."""
    model_yaml = checkpoint.get("model_yaml")
    if not isinstance(model_yaml, dict):
        raise CheckpointError(f"{source}: has no 'model_yaml' architecture dict")
    candidates = ("ema", "model") if prefer_ema else ("model", "ema")
    key = next((k for k in candidates if isinstance(checkpoint.get(k), dict)), None)
    if key is None:
        raise CheckpointError(f"{source}: has neither 'model' nor 'ema' weights")
    try:
        model = DetectionModel(model_yaml)
    except ConfigError as e:
        raise CheckpointError(f"{source}: cannot rebuild the model from its 'model_yaml': {e}") from e
    state_dict = checkpoint[key]
    result = model.load_state_dict(_as_float(state_dict, model, source), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: '{key}' weights do not match 'model_yaml' "
            f"(missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]})"
        )
    names = checkpoint.get("names")
    if names is not None:
        if len(names) != model.nc:
            raise CheckpointError(f"{source}: has {len(names)} class names for a model of {model.nc} classes")
        model.names = [str(n) for n in names]
    return model


def _as_float(state_dict: dict[str, Tensor], model: nn.Module, source: str) -> dict[str, Tensor]:
    """Half-precision entries (checkpoints stripped to fp16) as the model's dtype; shape errors named per key."""
    expected = model.state_dict()
    converted = {}
    for name, value in state_dict.items():
        if name in expected and value.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {list(value.shape)}, its 'model_yaml' needs {list(expected[name].shape)}"
            )
        converted[name] = value.to(expected[name].dtype) if name in expected and value.is_floating_point() else value
    return converted


def checkpoint_model_entries(model: nn.Module) -> dict[str, Any]:
    """The checkpoint entries describing ``model``: ``model_yaml``, ``names`` and ``model`` (its state dict, CPU
    copies). Unwraps DDP; refuses a fused model (its state dict no longer matches its YAML)."""
    model = unwrap_model(model)
    if not isinstance(model, DetectionModel):
        raise TypeError(f"expected a DetectionModel, got {type(model).__name__}")
    if any(isinstance(m, Conv) and not isinstance(m.bn, nn.BatchNorm2d) for m in model.modules()):
        raise ValueError("cannot checkpoint a fused model: its BatchNorm layers were folded into the convolutions")
    return {
        "model_yaml": copy.deepcopy(model.yaml),
        "names": [str(n) for n in model.names],
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
    }
