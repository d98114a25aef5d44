"""Training augmentation on the training device (``--augment-on-device``): the HSV colour jitter and the flips.

Of :func:`detector.data.augment.build_train_transforms`'s steps, the colour jitter (``hsv_h``, ``hsv_s``, ``hsv_v``)
and the flips (``fliplr``, ``flipud``) leave the loader workers and run on the whole uint8 batch once it is on the
training device, so that a GPU is less starved by the CPU's per-image OpenCV work:

    loader workers (CPU): decode -> mosaic + affine warp (fused) -> copy-paste, auto-augment, mixup, CutMix, cutout,
                          GridMask, albumentations
    DeviceAugment (training device): HSV -> flips

They are the pipeline's last steps, so the order and therefore the distribution of the augmented images are exactly
the CPU path's. The affine warp stays in the workers on purpose: the loader fuses it with the mosaic (only the
pictures shown are read, each resampled once, :class:`~detector.data.augment.MosaicWarp`), and shipping the
unwarped 2x mosaic canvas to the device instead cost the workers more than the warp itself (measured, decoding
JPEGs: 150 vs 138 CPU-ms per batch of 16 at 320, 259 vs 186 at 640).

The colour jitter repeats :class:`~detector.data.augment.RandomHSV`'s arithmetic exactly (OpenCV's 8-bit RGB -> HSV
in its own fixed point, RandomHSV's look-up tables, OpenCV's vectorised HSV -> RGB), so both paths give the same
colours for the same gains; a flip mirrors the pixels and the boxes' centres (``x -> 1 - x``), so no box is lost.
Random values are drawn per image from a CPU ``torch.Generator`` seeded by (seed, epoch, batch index, rank): a run is
reproducible, and the draws do not depend on the device. The few per-image values reach a GPU through pinned memory
and no result is read back, so the step never waits for the GPU.

Two pixel backends apply the same values: ``torch`` (vectorised over the batch; CUDA and other accelerators) and
``opencv`` (image by image with ``cv2.cvtColor``, ``cv2.LUT`` and ``cv2.flip``), which ``auto`` picks for a CPU
device, where OpenCV's kernels are 40-60x faster than torch's chain of elementwise ops (measured).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from detector.config import Hyperparameters

BACKENDS = ("auto", "torch", "opencv")


@dataclass(frozen=True)
class BatchParameters:
    """The random part of one batch's augmentation: small NumPy arrays, kept on the CPU.

    hsv_gains: (B, 3) float64 hue, saturation, value multipliers (1 = unchanged), as RandomHSV draws them.
    fliplr, flipud: (B,) bool, whether each image is mirrored left-right / up-down.
    """

    hsv_gains: np.ndarray
    fliplr: np.ndarray
    flipud: np.ndarray


class DeviceAugment:
    """The HSV jitter and flips of a training batch, applied on the batch's own device.

    ``hyp`` gives the ranges and probabilities (``hsv_h``, ``hsv_s``, ``hsv_v``, ``fliplr``, ``flipud``), as for the
    CPU transforms. ``backend`` is ``torch``, ``opencv`` (CPU tensors only) or ``auto`` (opencv on a CPU device, else
    torch).
    """

    def __init__(self, hyp: Hyperparameters, *, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"DeviceAugment backend {backend!r}: expected one of {BACKENDS}")
        self.hyp = hyp
        self.backend = backend

    def __call__(self, images: Tensor, targets: Tensor, seed: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Augment ``images`` (B, 3, H, W) uint8 RGB and their ``targets`` (N, 6) ``[image, class, x, y, w, h]``
        (normalised), each on its own device; ``seed`` (e.g. seed, epoch, batch index, rank) fixes the draw.
        Returns the new images (same shape, uint8) and targets (same rows)."""
        state = np.random.SeedSequence([int(value) for value in seed]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        return self.apply(images, targets, self.draw(len(images), generator))

    def draw(self, batch_size: int, generator: torch.Generator) -> BatchParameters:
        """Per-image random values with RandomHSV's and RandomFlip's distributions."""
        hyp = self.hyp
        uniform = torch.rand(batch_size, 5, generator=generator, dtype=torch.float64).numpy()
        gains = (2 * uniform[:, :3] - 1) * np.array([hyp.hsv_h, hyp.hsv_s, hyp.hsv_v]) + 1
        return BatchParameters(gains, uniform[:, 3] < hyp.fliplr, uniform[:, 4] < hyp.flipud)

    def apply(self, images: Tensor, targets: Tensor, parameters: BatchParameters) -> tuple[Tensor, Tensor]:
        """Deterministic part: HSV with ``parameters.hsv_gains``, then the flips, on images and targets."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"DeviceAugment expects a (B, 3, H, W) uint8 batch, got {images.dtype} {tuple(images.shape)}"
            )
        hsv_gains = parameters.hsv_gains if (parameters.hsv_gains != 1).any() else None
        backend = self.backend
        if backend == "auto":
            backend = "opencv" if images.device.type == "cpu" else "torch"
        if backend == "opencv":
            if images.device.type != "cpu":
                raise ValueError(f"DeviceAugment backend 'opencv' needs CPU tensors, got {images.device}")
            images = augment_opencv(images, hsv_gains, parameters.fliplr, parameters.flipud)
        else:
            if hsv_gains is not None:
                gains = to_device(torch.from_numpy(hsv_gains).float(), images.device)
                images = hsv_jitter(images, gains).to(torch.uint8)
            images = flip_images(images, parameters.fliplr, parameters.flipud)
        return images, flip_targets(targets, parameters.fliplr, parameters.flipud)

    def __repr__(self) -> str:
        return f"DeviceAugment(backend={self.backend!r})"


# --------------------------------------------------------------------------------------------------------------------
# Flips


def flip_targets(targets: Tensor, fliplr: np.ndarray, flipud: np.ndarray) -> Tensor:
    """Targets (N, 6) ``[image, class, x, y, w, h]`` (normalised) of a batch whose images ``fliplr`` / ``flipud``
    (B,) bool were mirrored: those images' box centres move to ``1 - x`` / ``1 - y``; sizes and rows are kept."""
    if len(targets) == 0 or not (fliplr.any() or flipud.any()):
        return targets
    image_index = targets[:, 0].long()
    targets = targets.clone()
    for column, flipped in ((2, fliplr), (3, flipud)):
        mask = to_device(torch.from_numpy(flipped), targets.device)[image_index]
        targets[:, column] = torch.where(mask, 1 - targets[:, column], targets[:, column])
    return targets


def flip_images(images: Tensor, fliplr: np.ndarray, flipud: np.ndarray) -> Tensor:
    """(B, 3, H, W) images with image i mirrored left-right where ``fliplr[i]`` and up-down where ``flipud[i]``."""
    for dimension, flipped in ((3, fliplr), (2, flipud)):
        if flipped.any():
            mask = to_device(torch.from_numpy(flipped), images.device).view(-1, 1, 1, 1)
            images = torch.where(mask, images.flip(dimension), images)
    return images


# --------------------------------------------------------------------------------------------------------------------
# Colour: torch backend


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on ``device`` without blocking the host: through pinned memory to a CUDA device (a copy
    from ordinary memory would wait for the kernels already queued, a host sync every training step)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@functools.lru_cache(maxsize=8)
def _hsv_tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Constants of the HSV arithmetic, made once per device: OpenCV's sdiv_table and hdiv_table180 (int32,
    ``round((255 << 12) / v)`` and ``round((180 << 12) / (6 * diff))``, 0 at 0), and which of HSV -> RGB's four
    candidate values each of red, green, blue takes in each 60-degree sector (int64 (3, 6))."""
    levels = torch.arange(256, dtype=torch.float64)
    saturation = torch.where(levels > 0, ((255 << 12) / levels).round(), 0).to(torch.int32)
    hue = torch.where(levels > 0, ((180 << 12) / (6 * levels)).round(), 0).to(torch.int32)
    picks = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])
    return saturation.to(device), hue.to(device), picks.to(device)


def hsv_jitter(images: Tensor, gains: Tensor) -> Tensor:
    """RandomHSV's colour change on (B, 3, H, W) RGB holding whole numbers 0-255, per image ``gains`` (B, 3):
    OpenCV's 8-bit RGB -> HSV (:func:`opencv_hsv`), RandomHSV's look-up tables (hue times its gain modulo 180,
    saturation and value times theirs clipped to 255, truncated), OpenCV's 8-bit HSV -> RGB (:func:`opencv_rgb`).
    Returns float32 RGB holding whole numbers."""
    hue, saturation, value = (channel.float() for channel in opencv_hsv(images))
    gains = gains.view(-1, 3, 1, 1).float()
    hue = torch.remainder(hue * gains[:, 0], 180).floor_()
    saturation = (saturation * gains[:, 1]).clamp_(0, 255).floor_()
    value = (value * gains[:, 2]).clamp_(0, 255).floor_()
    return opencv_rgb(hue, saturation, value)


def opencv_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(hue 0-179, saturation 0-255, value 0-255) int32 (B, H, W) of (B, 3, H, W) RGB holding whole numbers 0-255,
    computed as ``cv2.cvtColor(..., COLOR_RGB2HSV)`` computes them: 12-bit fixed point with its rounded tables."""
    shift = 12
    saturation_table, hue_table, _ = _hsv_tables(images.device)
    red, green, blue = images.to(torch.int32).unbind(1)
    value = torch.maximum(torch.maximum(red, green), blue)
    difference = value - torch.minimum(torch.minimum(red, green), blue)
    half = 1 << (shift - 1)
    saturation = (difference * saturation_table[value] + half) >> shift
    numerator = torch.where(
        value == red,
        green - blue,
        torch.where(value == green, blue - red + 2 * difference, red - green + 4 * difference),
    )
    hue = (numerator * hue_table[difference] + half) >> shift  # an arithmetic shift: floor, as in OpenCV
    return torch.where(hue < 0, hue + 180, hue), saturation, value


def opencv_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """(B, 3, H, W) float32 RGB of whole-number float (B, H, W) hue 0-179, saturation and value 0-255, computed as
    OpenCV's vectorised ``cv2.cvtColor(..., COLOR_HSV2RGB)`` computes them (float32 steps, truncated to 8 bits)."""
    hue = hue * torch.tensor(6 / 180, dtype=torch.float32)  # hue in sextants, 0-6
    saturation = saturation * torch.tensor(1 / 255, dtype=torch.float32)
    value = value * torch.tensor(1 / 255, dtype=torch.float32)
    sector = hue.trunc()
    fraction = hue - sector
    candidates = torch.stack(
        [
            value,
            value * (1 - saturation),
            value * (1 - saturation * fraction),
            value * (1 - saturation * (1 - fraction)),
        ],
        1,
    )
    picks = _hsv_tables(hue.device)[2][:, sector.long()].transpose(0, 1)  # (B, 3, H, W)
    return torch.gather(candidates, 1, picks).mul_(255).trunc_()


# --------------------------------------------------------------------------------------------------------------------
# OpenCV backend (CPU tensors)


def augment_opencv(images: Tensor, hsv_gains: np.ndarray | None, fliplr: np.ndarray, flipud: np.ndarray) -> Tensor:
    """The torch backend's HSV and flips with OpenCV, image by image, on CPU tensors (B, 3, H, W) uint8 RGB: what
    RandomHSV and RandomFlip do, on planes merged into OpenCV's interleaved layout and split back."""
    output = torch.empty_like(images)
    tables = None if hsv_gains is None else hsv_tables(hsv_gains)
    for index, planes in enumerate(images.numpy()):
        image = cv2.merge(list(planes))
        if tables is not None:
            hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
            # One LUT per plane, as RandomHSV does: OpenCV does not vectorise a 3-channel table.
            hsv_planes = cv2.split(hsv)
            for plane, table in zip(hsv_planes, tables[index], strict=True):
                cv2.LUT(plane, table, dst=plane)
            cv2.cvtColor(cv2.merge(hsv_planes, dst=hsv), cv2.COLOR_HSV2RGB, dst=image)
        if fliplr[index] or flipud[index]:
            image = cv2.flip(image, -1 if fliplr[index] and flipud[index] else int(fliplr[index]))
        cv2.split(image, list(output[index].numpy()))
    return output


def hsv_tables(gains: np.ndarray) -> np.ndarray:
    """RandomHSV's look-up tables for per-image ``gains`` (B, 3) float64: (B, 3, 256) uint8, hue, saturation,
    value."""
    levels = np.arange(256, dtype=np.float64)[None]
    hue = (levels * gains[:, 0:1]) % 180
    saturation = np.clip(levels * gains[:, 1:2], 0, 255)
    value = np.clip(levels * gains[:, 2:3], 0, 255)
    return np.stack([hue, saturation, value], 1).astype(np.uint8)


__all__ = [
    "BatchParameters",
    "DeviceAugment",
    "augment_opencv",
    "flip_images",
    "flip_targets",
    "hsv_jitter",
    "hsv_tables",
    "opencv_hsv",
    "opencv_rgb",
    "to_device",
]
