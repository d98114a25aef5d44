"""Model YAMLs small enough for tests (built in milliseconds), shared by the test modules.

Each function returns a fresh dict, so a test may change its copy freely.
"""

from __future__ import annotations

import copy
from typing import Any

ANCHORS_P3_P5 = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]

_STRIDED_CONVS = {
    "depth_multiple": 1.0,
    "width_multiple": 1.0,
    "anchors": ANCHORS_P3_P5,
    "backbone": [
        [-1, 1, "Conv", [8, 3, 2]],
        [-1, 1, "Conv", [8, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],
    ],
    "head": [[[2, 3, 4], 1, "Detect", ["nc", "anchors"]]],
}

_YOLOV5_BLOCKS = {
    "nc": 3,
    "depth_multiple": 0.33,
    "width_multiple": 0.125,
    "anchors": ANCHORS_P3_P5[:2],
    "backbone": [
        [-1, 1, "Conv", [64, 6, 2, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 3, "C3", [128]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 1, "SPPF", [256, 5]],
    ],
    "head": [
        [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
        [[-1, 2], 1, "Concat", [1]],
        [-1, 1, "C3", [128, False]],
        [[7, 4], 1, "Detect", ["nc", "anchors"]],
    ],
}


def strided_convs_yaml(nc: int) -> dict[str, Any]:
    """Five stride-2 Convs and a Detect on strides 8/16/32 (~8k parameters): for inference and export plumbing."""
    return {"nc": nc, **copy.deepcopy(_STRIDED_CONVS)}


def yolov5_blocks_yaml(**changes: Any) -> dict[str, Any]:
    """YOLOv5's blocks (Conv, C3, SPPF, Upsample, Concat) at 1/8 width, Detect on strides 8/16; ``changes``
    replace top-level keys."""
    config = copy.deepcopy(_YOLOV5_BLOCKS)
    config.update(changes)
    return config


def export_onnx(model: Any, path: Any, example: Any, metadata: dict | None, dynamic: bool) -> Any:
    """``model`` traced to ONNX at ``path`` (input "images", output "output0"; batch, height and width free with
    ``dynamic``), with ``metadata`` as JSON-valued ``metadata_props`` (strings as they are); returns ``path``."""
    import json

    import onnx
    import torch

    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    torch.onnx.export(
        model,
        example,
        str(path),
        input_names=["images"],
        output_names=["output0"],
        opset_version=17,
        dynamic_axes=axes if dynamic else None,
        dynamo=False,
    )
    if metadata is not None:
        proto = onnx.load(str(path))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.save(proto, str(path))
    return path
