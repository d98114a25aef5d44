"""torchvision's compiled NMS kernel, without ``import torchvision``.

Importing torchvision takes about 1.4 s on a 2-core CPU, most of it ``torch._dynamo``, which
``torchvision.ops.roi_align`` imports when the package loads. val.py and detect.py need one kernel of it - NMS -
and paid that second on every run (a sixth of val.py's 200-image run). :func:`nms` (and :func:`batched_nms`)
loads the compiled op library that ``torchvision.extension`` loads (``_C*.so`` in torchvision's package folder; a
few milliseconds) and calls ``torch.ops.torchvision.nms``, the op ``torchvision.ops.nms`` calls. Where the library
is not found there, or torchvision is imported already, it is ``torchvision.ops.nms`` itself.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes kept by greedy NMS, by decreasing score: ``torchvision.ops.nms``'s contract."""
    return _nms_kernel()(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group (e.g. class) only: ``torchvision.ops.batched_nms``'s contract and its coordinate
    trick - each group's boxes shifted by ``group x (largest coordinate + 1)`` so that no two groups overlap."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = groups.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


@functools.cache
def _nms_kernel() -> Callable[[Tensor, Tensor, float], Tensor]:
    if "torchvision" not in sys.modules and _load_torchvision_library():
        return torch.ops.torchvision.nms
    import torchvision

    return torchvision.ops.nms


def _load_torchvision_library() -> bool:
    """Load torchvision's compiled ops beside its ``__init__.py``: ``_C_stable`` (recent torchvision) or ``_C``
    (older), the one library ``torchvision.extension`` would load. False when neither is there or it fails to
    load (the caller then imports torchvision, whose own loader reports the problem)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = Path(next(iter(spec.submodule_search_locations)))
    for stem in ("_C_stable", "_C"):
        library = next((p for p in folder.glob(f"{stem}.*") if p.suffix in (".so", ".pyd", ".dylib")), None)
        if library is None:
            continue
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError):
            return False
        return hasattr(torch.ops.torchvision, "nms")
    return False
