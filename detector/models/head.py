"""The YOLOv5 detection head: per-level 1x1 convs producing raw maps, and the decoding of raw maps into boxes.

Contract (docs/architecture.md): ``Detect.forward(features)`` returns the raw per-level maps, level i shaped
(B, na, H_i, W_i, 5 + nc) with channels [tx, ty, tw, th, objectness, class logits...] before any sigmoid;
``Detect.decode(raw)`` turns them into (B, N, 5 + nc) rows [x_center, y_center, width, height (pixels of the
network input), objectness, class scores] after sigmoids, N = sum_i na * H_i * W_i ordered level, anchor, row,
column (YOLOv5's order). Decoding follows YOLOv5: xy = (2 * sigmoid - 0.5 + grid) * stride and
wh = (2 * sigmoid)^2 * anchor_pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detector.models.registry import register

LOGGER = logging.getLogger(__name__)


def _anchor_tensor(anchors: Sequence[Sequence[float]] | int, num_levels: int) -> Tensor:
    """Anchors from YAML as a (nl, na, 2) float tensor of pixel (w, h) pairs.

    An int ``na`` instead of a list means "na anchors per level, to be fitted by AutoAnchor": placeholder sizes
    are used until then (YOLOv5 does the same).
    """
    if isinstance(anchors, int) and not isinstance(anchors, bool):
        if anchors < 1:
            raise ValueError(f"anchors: expected a positive count per level, got {anchors}")
        anchors = [list(range(1, 2 * anchors + 1))] * num_levels
    if not isinstance(anchors, Sequence) or len(anchors) != num_levels:
        count = len(anchors) if isinstance(anchors, Sequence) else anchors
        raise ValueError(f"anchors: expected {num_levels} lists (one per detection level), got {count!r}")
    lengths = {len(level) for level in anchors}
    if len(lengths) != 1 or (length := lengths.pop()) % 2 or length == 0:
        raise ValueError(f"anchors: every level needs the same, even number of values (w, h pairs), got {anchors}")
    flat = [value for level in anchors for value in level]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in flat):
        raise ValueError(f"anchors: sizes must be positive numbers of pixels, got {anchors}")
    return torch.tensor(flat, dtype=torch.float32).view(num_levels, -1, 2)


def _decode_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype raw maps decode in: their own, but fp32 for bf16 (CPU autocast), whose 8 bits would put boxes at
    640 px off by up to 2 px."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


@register
class Detect(nn.Module):
    """YOLOv5 head over ``nl`` feature maps with ``na`` anchors per level.

    Buffers (saved in the state dict): ``anchors`` (nl, na, 2) in grid units (pixels / stride) once the strides
    are set by :meth:`set_strides`, and ``stride`` (nl,) in pixels.

    Set ``export = True`` before tracing or exporting: grids are then computed from the input shape inside the
    graph instead of taken from the Python-side cache, so dynamic-shape exports stay correct.
    """

    takes_input_channels = True

    def __init__(self, num_classes: int, anchors: Sequence[Sequence[float]] | int, in_channels: Sequence[int]) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"nc: expected a positive number of classes, got {num_classes!r}")
        anchor_pixels = _anchor_tensor(anchors, len(in_channels))
        self.nc = num_classes
        self.no = num_classes + 5  # outputs per anchor
        self.nl = len(in_channels)
        self.na = anchor_pixels.shape[1]
        # Pixels until set_strides() divides them: the stride is only known after a dry forward pass of the model.
        self.register_buffer("anchors", anchor_pixels)
        self.register_buffer("stride", torch.zeros(self.nl))
        self.m = nn.ModuleList(nn.Conv2d(channels, self.no * self.na, 1) for channels in in_channels)
        self.dropout: nn.Module = nn.Identity()  # on the features, while training (detector.models.regularization)
        self.export = False
        # The decode's form in traced graphs: "slices" (xy and wh from column slices, concatenated back with the
        # scores) or "affine" (one multiply-add over whole rows: no split, no concatenation). The same numbers;
        # ONNX Runtime runs the first faster, OpenVINO's CPU plugin the second (int8 yolov5n at 640: 3-4% less
        # latency; it runs a split and a concatenation of 85-value rows in reference kernels).
        self.traced_decode = "slices"
        self._grid_cache: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Raw maps: level i (B, C_i, H_i, W_i) -> (B, na, H_i, W_i, 5 + nc), no activation applied."""
        raw = []
        for conv, feature in zip(self.m, features, strict=True):
            y = conv(self.dropout(feature))
            batch, _, height, width = y.shape
            if y.is_contiguous(memory_format=torch.channels_last):
                # NHWC maps (CPU inference, OpenVINO exports): channels last is a view, then one copy of whole
                # rows of ``no`` values. OpenVINO's int8 yolov5n at 640 lost a 1 ms reorder and half a transpose
                # (16.1 against 20.7 ms); NCHW maps keep the other order, which needs one copy instead of two.
                y = y.permute(0, 2, 3, 1).reshape(batch, height, width, self.na, self.no).permute(0, 3, 1, 2, 4)
            else:
                y = y.view(batch, self.na, self.no, height, width).permute(0, 1, 3, 4, 2)
            raw.append(y.contiguous())
        return raw

    def decode(self, raw: list[Tensor]) -> Tensor:
        """Raw maps -> (B, N, 5 + nc): xywh in input pixels, objectness and class scores in [0, 1].

        bf16 maps (CPU autocast) decode in fp32 (:func:`_decode_dtype`). Run eagerly without gradients (inference,
        validation), the sigmoid of every level is written straight into the one output tensor and xy, wh are
        finished in place on its columns: 1.9 against 10.1 ms for yolov5n at 640 (batch 1, 2 cores; concatenating
        the rows of 85 values back together cost most of it). Traced for an export, or with gradients, it is the
        same arithmetic as a graph of its own (:attr:`traced_decode`).
        """
        exporting = self.export or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if exporting or (torch.is_grad_enabled() and any(p.requires_grad for p in raw)):
            return torch.cat([self._decode_level(level, p) for level, p in enumerate(raw)], 1)
        return self._decode_in_place(raw)

    def _decode_in_place(self, raw: list[Tensor]) -> Tensor:
        batch = raw[0].shape[0]
        dtype = _decode_dtype(raw[0].dtype)
        counts = [p.shape[1] * p.shape[2] * p.shape[3] for p in raw]
        output = torch.empty(batch, sum(counts), self.no, dtype=dtype, device=raw[0].device)
        for level, (prediction, rows) in enumerate(zip(raw, output.split(counts, 1), strict=True)):
            _, _, height, width, _ = prediction.shape
            y = rows.view(batch, self.na, height, width, self.no)
            torch.sigmoid(prediction.to(dtype), out=y)
            stride = self.stride[level]
            y[..., :2].mul_(stride * 2).add_(self._grid(height, width, dtype, y.device) * stride)
            y[..., 2:4].square_().mul_(self._anchor_pixels_x4(level, dtype))
        return output

    def _decode_level(self, level: int, prediction: Tensor) -> Tensor:
        """One level's (B, na * H * W, no) rows as graph operations, in the form :attr:`traced_decode` names."""
        batch, _, height, width, _ = prediction.shape
        prediction = prediction.to(_decode_dtype(prediction.dtype))
        dtype, device = prediction.dtype, prediction.device
        stride = self.stride[level].to(dtype)
        grid_pixels = self._grid(height, width, dtype, device) * stride  # (1, 1, H, W, 2)
        y = prediction.sigmoid()
        if self.traced_decode == "slices":
            xy = y[..., :2] * (stride * 2) + grid_pixels  # == (2 * sigmoid - 0.5 + grid) * stride
            wh = y[..., 2:4].square() * self._anchor_pixels_x4(level, dtype)
            decoded = torch.cat((xy, wh, y[..., 4:]), -1)
        elif self.traced_decode == "affine":  # y * (gain + y * square_gain) + offset, per-column constants
            columns = torch.arange(self.no, device=device)
            is_x, is_y = (columns == 0).to(dtype), (columns == 1).to(dtype)
            gain = torch.where(columns < 2, stride * 2, (columns >= 4).to(dtype))  # (no,): 2 stride, 0, 1
            square_gain = torch.cat(
                (
                    torch.zeros(1, self.na, 1, 1, 2, dtype=dtype, device=device),
                    self._anchor_pixels_x4(level, dtype),
                    torch.zeros(1, self.na, 1, 1, self.no - 4, dtype=dtype, device=device),
                ),
                -1,
            )
            offset = grid_pixels[..., :1] * is_x + grid_pixels[..., 1:] * is_y
            decoded = y * (gain + y * square_gain) + offset
        else:
            raise ValueError(f"Detect.traced_decode: expected 'slices' or 'affine', got {self.traced_decode!r}")
        return decoded.view(batch, -1, self.no)

    def _anchor_pixels_x4(self, level: int, dtype: torch.dtype) -> Tensor:
        """(1, na, 1, 1, 2) anchor sizes in pixels times 4: wh = (2 * sigmoid)^2 * anchor = sigmoid^2 * this."""
        return (self.anchors[level] * (self.stride[level] * 4)).view(1, self.na, 1, 1, 2).to(dtype)

    def _grid(self, height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(1, 1, H, W, 2) cell offsets (x - 0.5, y - 0.5) in grid units, cached per shape outside of exports."""
        exporting = self.export or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        key = (height, width, dtype, device)
        if not exporting and key in self._grid_cache:
            return self._grid_cache[key]
        # arange in float32, then cast: ONNX's Range has no float16 version (fp16 --dynamic exports need this)
        rows = torch.arange(height, device=device, dtype=torch.float32)
        columns = torch.arange(width, device=device, dtype=torch.float32)
        grid_y, grid_x = torch.meshgrid(rows, columns, indexing="ij")
        grid = (torch.stack((grid_x, grid_y), -1) - 0.5).view(1, 1, height, width, 2).to(dtype)
        if not exporting:
            self._grid_cache[key] = grid
        return grid

    def _apply(self, *args, **kwargs):
        # .to()/.half() would leave cached grids on the old device or dtype; they are cheap to rebuild.
        self._grid_cache.clear()
        return super()._apply(*args, **kwargs)

    @torch.no_grad()
    def set_strides(self, strides: Tensor) -> None:
        """Record the level strides (pixels) and convert the pixel anchors to grid units (called once, at build)."""
        self.stride.copy_(strides.to(self.stride))
        self.anchors.div_(self.stride.view(-1, 1, 1))
        self.check_anchor_order()

    @torch.no_grad()
    def check_anchor_order(self) -> None:
        """Flip the anchor levels when their sizes run opposite to the strides (large anchors belong to P5)."""
        if self.anchors.is_meta:  # built on the meta device (to count parameters/FLOPs): no values to compare
            return
        mean_area = (self.anchors * self.stride.view(-1, 1, 1)).prod(-1).mean(-1)  # pixels², per level
        area_change = mean_area[-1] - mean_area[0]
        stride_change = self.stride[-1] - self.stride[0]
        if area_change != 0 and torch.sign(area_change) != torch.sign(stride_change):
            LOGGER.info("Reversing anchor order to match the strides (largest anchors on the largest stride)")
            self.anchors.copy_(self.anchors.flip(0) * (self.stride.flip(0) / self.stride).view(-1, 1, 1))

    @torch.no_grad()
    def initialize_biases(self, class_frequencies: Tensor | None = None) -> None:
        """YOLOv5's bias priors (paper arXiv:1708.02002 section 3.3): about 8 objects per 640x640 image for the
        objectness, and a 0.6 total class probability spread evenly (or by ``class_frequencies`` (nc,) counts)."""
        if self.stride.is_meta:  # built on the meta device: there are no values to initialise
            return
        for conv, stride in zip(self.m, self.stride.tolist(), strict=True):
            bias = conv.bias.view(self.na, -1)
            bias[:, 4] += math.log(8 / (640 / stride) ** 2)
            if class_frequencies is None:
                bias[:, 5 : 5 + self.nc] += math.log(0.6 / (self.nc - 0.99))
            else:
                frequencies = class_frequencies.to(bias).clamp(min=1e-9)
                bias[:, 5 : 5 + self.nc] += torch.log(frequencies / frequencies.sum())
