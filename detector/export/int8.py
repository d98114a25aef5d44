"""What the two ``--int8`` quantizers share: the calibration images and the split of the graph into the convolution
trunk (quantized) and the Detect decode (kept in float).

ONNX (:func:`detector.export.onnx.quantize_onnx`, ONNX Runtime's static quantization) and OpenVINO
(:func:`detector.export.openvino.quantize_openvino`, NNCF) both calibrate on up to
:data:`INT8_CALIBRATION_IMAGES` validation images of ``--data`` letterboxed to the export size as val.py does,
and both leave the decode (:func:`split_graph`) out of the quantization. The decode turns the head's logits into
``(B, N, 5 + nc)`` predictions - sigmoid, grid offsets and anchor sizes in input pixels - and its tensors hold
coordinates up to the input size: with 256 levels a 640-pixel range is 2.5 pixels a step, which moves every box.
OpenVINO also leaves the stem (the convolution reading the image) in float: with NNCF that wins back most of the
int8 loss; with ONNX Runtime it did not help, so its stem is quantized.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from detector.export.base import ExportContext, validation_images

INT8_CALIBRATION_IMAGES = 300  # at most this many validation images calibrate --int8


def calibration_images(ctx: ExportContext) -> list[np.ndarray]:
    """Up to :data:`INT8_CALIBRATION_IMAGES` BGR validation images of ``--data`` (the built-in dataset's without it)."""
    return validation_images(ctx.config.data, INT8_CALIBRATION_IMAGES)


def calibration_inputs(ctx: ExportContext, images: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """Each image as a (1, 3, H, W) float32 network input at the export size, letterboxed when it is needed (so
    300 images at 640 never sit in memory as float32 at once)."""
    for image in images:
        yield ctx.letterboxed(image, ctx.imgsz)[None]


class GraphSplit(NamedTuple):
    """A detection graph's nodes by role in int8 export."""

    head: set[str]  # the Detect head's convolutions: those no other convolution depends on
    decode: set[str]  # everything downstream of them or feeding only the decode (grids): kept in float
    stem: set[str]  # the convolutions that read the image: no other convolution is upstream of them


def split_graph(inputs_of: Mapping[str, Sequence[str]], convolutions: Collection[str]) -> GraphSplit:
    """The head convolutions and the decode of a graph, which int8 export leaves in float.

    ``inputs_of`` maps every node of the graph to the nodes whose outputs it reads; ``convolutions`` names its
    convolutions. The trunk is the head convolutions and everything upstream of them; all else is the decode: the
    arithmetic after the head convolutions, the grid computation feeding it, and an NMS block when there is one.
    The stem is the convolutions with no convolution upstream (YOLOv5's first 6x6 one).
    """
    convolutions = set(convolutions)
    head = convolutions - _upstream(inputs_of, convolutions)
    trunk = _upstream(inputs_of, head) | head
    stem = {conv for conv in convolutions if not _upstream(inputs_of, [conv]) & convolutions}
    return GraphSplit(head, set(inputs_of) - trunk, stem)


def _upstream(inputs_of: Mapping[str, Sequence[str]], nodes: Collection[str]) -> set[str]:
    """Every node that ``nodes`` read from, directly or not (``nodes`` themselves only when on such a path)."""
    seen: set[str] = set()
    stack = list(nodes)
    while stack:
        for producer in inputs_of.get(stack.pop(), ()):
            if producer not in seen:
                seen.add(producer)
                stack.append(producer)
    return seen
