"""Test-time augmentation (detector.models.yolo.augmented_forward, the one TTA behind model and backends).

The content is checked against independent references: each pass equals the model run directly on the flipped
or scaled image (made here with torch ops, not with the TTA's own helpers) with its boxes mapped back by hand,
and a detector that finds a white square returns that square's box from every pass, in original-image pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tiny_models import strided_convs_yaml

from detector.models.yolo import DetectionModel, augmented_forward

STRIDES = (8, 16, 32)
GREY = 0.447  # YOLOv5's padding value for scaled TTA images


def _scaled(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize by ``scale`` and pad right/bottom with grey up to multiples of 32 of (side x scale)."""
    height, width = images.shape[-2:]
    resized = F.interpolate(images, size=(int(height * scale), int(width * scale)), mode="bilinear")
    padded = [math.ceil(side * scale / 32) * 32 for side in (height, width)]
    return F.pad(resized, (0, padded[1] - resized.shape[-1], 0, padded[0] - resized.shape[-2]), value=GREY)


def _rows(height: int, width: int, levels: tuple[int, ...], anchors: int = 3) -> int:
    return sum(anchors * (height // s) * (width // s) for s in levels)


def test_each_pass_is_the_model_on_the_flipped_or_scaled_image() -> None:
    torch.manual_seed(0)
    model = DetectionModel(strided_convs_yaml(nc=3)).eval()
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        augmented = model(images, augment=True)
        plain = model(images)
        flipped = model(_scaled(images.flip(-1), 0.83))  # 53x79 -> padded to 64x96
        small = model(_scaled(images, 0.67))  # 42x64 -> padded to 64x96 (42.9 and 64.3 round up)

    # scale 1 without its stride-32 level; 0.83 flipped, all levels; 0.67 without its stride-8 level
    first = _rows(64, 96, STRIDES[:2])
    second = first + _rows(64, 96, STRIDES)
    assert augmented.shape == (2, second + _rows(64, 96, STRIDES[1:]), 8)
    torch.testing.assert_close(augmented[:, :first], plain[:, :first])

    expected_flipped = flipped.clone()
    expected_flipped[..., :4] /= 0.83
    expected_flipped[..., 0] = 96 - expected_flipped[..., 0]  # x centre mirrored back; y, w, h unchanged
    torch.testing.assert_close(augmented[:, first:second], expected_flipped, atol=1e-4, rtol=1e-5)

    expected_small = small[:, _rows(64, 96, STRIDES[:1]) :].clone()
    expected_small[..., :4] /= 0.67
    torch.testing.assert_close(augmented[:, second:], expected_small, atol=1e-4, rtol=1e-5)


def test_every_pass_maps_a_found_object_back_to_its_original_box() -> None:
    """A 'detector' that reports the box of the white pixels: after de-augmentation, every row of every pass
    (scaled, flipped, padded with grey) gives the white square's box in the original image."""
    x1, y1, x2, y2 = 20, 12, 52, 36  # the square, pixels [x1, x2) x [y1, y2) of a 64x96 image
    images = torch.zeros(1, 3, 64, 96)
    images[..., y1:y2, x1:x2] = 1.0

    def white_box(batch: torch.Tensor) -> torch.Tensor:
        rows = []
        for image in batch:
            ys, xs = (image.mean(0) > 0.75).nonzero(as_tuple=True)  # grey padding (0.447) and edges stay out
            left, right, top, bottom = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            box = torch.stack([(left + right) / 2, (top + bottom) / 2, right - left, bottom - top]).float()
            rows.append(torch.cat([box, torch.ones(2)]))  # objectness 1, one class at 1
        per_image = torch.stack(rows)[:, None]
        return per_image.expand(-1, _rows(*batch.shape[-2:], STRIDES, anchors=1), -1)

    augmented = augmented_forward(white_box, images, STRIDES)
    assert augmented.shape[1] == _rows(64, 96, STRIDES[:2], 1) + _rows(64, 96, STRIDES, 1) + _rows(
        64, 96, STRIDES[1:], 1
    )
    centre_x, centre_y, width, height = augmented[0, :, :4].unbind(-1)
    boxes = torch.stack([centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2], -1)
    # Edges land on whole pixels of each scaled image: one pixel of the 0.67 image is 1.5 px here, plus the
    # resize's blur. Unflipping or unscaling wrongly would be off by 9 px (x2 / 0.83 - x2) or more.
    torch.testing.assert_close(boxes, torch.tensor([[x1, y1, x2, y2]]).float().expand_as(boxes), atol=2.0, rtol=0)
