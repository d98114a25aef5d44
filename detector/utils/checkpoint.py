"""Writing and reading our checkpoints: plain types and tensors only, written atomically.

A checkpoint is a dict of plain Python values (model YAML dict, class names, hyperparameters, epoch, ...) and
state dicts of tensors, so ``torch.load(..., weights_only=True)`` reads it without running any pickled code.
YOLOv5's own release files are pickled modules; they are read by ``detector.models.yolov5_import`` instead.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from detector.errors import CheckpointError
from detector.utils.files import atomic_write

CHECKPOINT_FORMAT = "detector-checkpoint-v1"


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Save atomically (temp file + fsync + rename): a run killed mid-save keeps the previous file."""
    checkpoint = {"format": CHECKPOINT_FORMAT, **checkpoint}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def is_detector_checkpoint(path: str | Path) -> bool:
    """Whether a file is one of ours (loads with weights_only=True and carries our format tag)."""
    try:
        return load_checkpoint(path).get("format") == CHECKPOINT_FORMAT
    except CheckpointError:
        return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one of our checkpoints with ``weights_only=True``; a one-line CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = f"not a detector checkpoint readable with weights_only=True ({first_line})"
        raise CheckpointError(f"{path}: {reason}") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(checkpoint).__name__}")
    return checkpoint
