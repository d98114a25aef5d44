"""What the two ``--int8`` quantizers share: the calibration images and the split of the graph into the convolution
trunk (quantized) and the Detect decode (kept in float).

ONNX (:func:`detector.export.onnx.quantize_onnx`, ONNX Runtime's static quantization) and OpenVINO
(:func:`detector.export.openvino.quantize_openvino`, NNCF) both calibrate on up to
:data:`INT8_CALIBRATION_IMAGES` validation images of ``--data`` letterboxed to the export size as val.py does,
and both leave the decode (:func:`split_graph`) out of the quantization. The decode turns the head's logits into
``(B, N, 5 + nc)`` predictions - sigmoid, grid offsets and anchor sizes in input pixels - and its tensors hold
coordinates up to the input size: with 256 levels a 640-pixel range is 2.5 pixels a step, which moves every box.

The input's quantizer is pinned to the image's own levels (:data:`IMAGE_LEVELS`): an input is 8-bit pixels divided
by 255, so 256 levels of 1/255 from 0 hold it exactly. Calibrated from the images instead, its range came out at
[0, 0.9989] (a mean of per-image maxima), whose steps fall between the pixel values and round every one of them;
that was what quantizing the stem (the convolution reading the image) cost OpenVINO (0.358 against 0.361
mAP50-95 with the stem left in float, 0.361 with it quantized on the pinned input).

:func:`gptq_round` chooses int8 weights that keep each layer's output on the calibration images close to the float
one's, weighed by :func:`conv_input_moments` (used by the ONNX quantizer; NNCF corrects OpenVINO's its own way).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from detector.data.builtin import BUILTIN_CLASSES
from detector.export.base import ExportContext, validation_images

LOGGER = logging.getLogger(__name__)

INT8_CALIBRATION_IMAGES = 300  # at most this many validation images calibrate --int8
IMAGE_LEVELS = 256  # an input is uint8 pixels / 255: quantized with scale 1 / 255 and zero point 0, exactly
GPTQ_IMAGES = 32  # calibration images whose convolution inputs weigh the GPTQ rounding of the weights
GPTQ_DAMPING = 0.01  # added to the second moments' diagonal, as a fraction of its mean (Frantar et al.'s default)
GPTQ_BLOCK = 128  # columns rounded together before the rest of the matrix is updated (the same result, faster)


def calibration_images(ctx: ExportContext) -> list[np.ndarray]:
    """Up to :data:`INT8_CALIBRATION_IMAGES` BGR validation images of ``--data`` (the built-in dataset's without it)."""
    return validation_images(ctx.config.data, INT8_CALIBRATION_IMAGES)


def warn_if_calibrated_on_builtin(names: Sequence[str], data: str) -> None:
    """One warning when ``--int8`` without ``--data`` is to calibrate a model that does not predict the built-in
    dataset's classes: its int8 ranges would come from synthetic shapes, not from pictures like the ones it sees."""
    if not data and tuple(names) != BUILTIN_CLASSES:
        LOGGER.warning(
            "WARNING: --int8 without --data calibrates a model of %d classes (%s, ...) on the built-in dataset's "
            "synthetic shapes; pass --data with images like the model's (e.g. --data coco128.yaml for a COCO model)",
            len(names),
            ", ".join(names[:3]),
        )


def calibration_inputs(ctx: ExportContext, images: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """Each image as a (1, 3, H, W) float32 network input at the export size, letterboxed when it is needed (so
    300 images at 640 never sit in memory as float32 at once)."""
    for image in images:
        yield ctx.letterboxed(image, ctx.imgsz)[None]


class GraphSplit(NamedTuple):
    """A detection graph's nodes by role in int8 export."""

    head: set[str]  # the Detect head's convolutions: those no other convolution depends on
    decode: set[str]  # everything downstream of them or feeding only the decode (grids): kept in float


def split_graph(inputs_of: Mapping[str, Sequence[str]], convolutions: Collection[str]) -> GraphSplit:
    """The head convolutions and the decode of a graph, which int8 export leaves in float.

    ``inputs_of`` maps every node of the graph to the nodes whose outputs it reads; ``convolutions`` names its
    convolutions. The trunk is the head convolutions and everything upstream of them; all else is the decode: the
    arithmetic after the head convolutions, the grid computation feeding it, and an NMS block when there is one.
    """
    convolutions = set(convolutions)
    head = convolutions - _upstream(inputs_of, convolutions)
    trunk = _upstream(inputs_of, head) | head
    return GraphSplit(head, set(inputs_of) - trunk)


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


def conv_input_moments(
    x: Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    max_elements: int = 1 << 23,
) -> Tensor:
    """``U @ U.T`` over the patches ``U`` (``C * kh * kw`` rows, one column per output position and image) that a
    convolution with these parameters reads from ``x`` (N, C, H, W): the second moments of its inputs, which weigh
    the rounding error of its weights. Computed in stripes of output rows, so no more than about ``max_elements``
    patch values exist at once however large the map; float32 products, summed in float64."""
    x = F.pad(x.float(), (padding[1], padding[1], padding[0], padding[0]))
    rows = 1 + (x.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0]
    columns = 1 + (x.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1]
    patch = x.shape[1] * kernel[0] * kernel[1]
    step = max(1, max_elements // max(1, patch * columns * x.shape[0]))
    moments = torch.zeros(patch, patch, dtype=torch.float64)
    for first in range(0, rows, step):
        last = min(rows, first + step)  # output rows first .. last - 1
        stripe = x[:, :, first * stride[0] : (last - 1) * stride[0] + dilation[0] * (kernel[0] - 1) + 1]
        patches = F.unfold(stripe, kernel, dilation=dilation, stride=stride)  # (N, patch, positions)
        patches = patches.transpose(0, 1).reshape(patch, -1)
        moments += (patches @ patches.T).double()
    return moments


def gptq_round(weight: Tensor, moments: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Integer weights in ``[-qmax, qmax]`` for ``weight`` (out, in) with per-row ``scale`` (symmetric, zero point
    0), chosen by GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers"): the columns are rounded one at a time and each one's rounding error is spread over the columns
    not yet rounded, through the inverse of the inputs' second moments ``moments`` (in, in), so that the rounded
    layer's output on those inputs stays close to the float one's - rather than each weight rounded to its nearest
    step on its own. Columns whose input was always zero (a zero diagonal) keep round-to-nearest.

    With uncorrelated inputs (a diagonal ``moments``) the errors have nowhere to go and this is round-to-nearest.
    """
    weight = weight.double().clone()
    scale = scale.double().reshape(-1, 1)
    moments = moments.double().clone()
    dead = torch.diag(moments) == 0
    moments[dead, dead] = 1  # uncorrelated with the rest: such a column's error stays where it is
    moments += GPTQ_DAMPING * torch.diag(moments).mean() * torch.eye(len(moments), dtype=torch.float64)
    # the upper Cholesky factor of the inverse: row i holds how column i's error is to move the columns after it
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(moments)), upper=True)
    rounded = torch.zeros_like(weight)
    for start in range(0, weight.shape[1], GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, weight.shape[1])
        block, block_inverse = weight[:, start:end].clone(), inverse[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = block[:, i : i + 1]
            levels = torch.clamp(torch.round(column / scale), -qmax, qmax)
            error = (column - levels * scale) / block_inverse[i, i]
            block[:, i + 1 :] -= error @ block_inverse[i : i + 1, i + 1 :]
            rounded[:, start + i : start + i + 1], errors[:, i : i + 1] = levels, error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return rounded
