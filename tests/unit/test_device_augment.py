"""--augment-on-device (detector.data.device_augment): the CPU path's colours for the same gains, flips of pixels and
boxes as hand-computed and as augment.flip does them, both backends alike, reproducible draws with RandomHSV's and
RandomFlip's distributions, the loader leaving exactly those steps out, and the trainer feeding augmented batches."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from tiny_runs import make_tiny, tiny_config

from detector.cli.train import build_parser, resolve_train_config
from detector.config import Hyperparameters, TrainConfig, check_train_config
from detector.data.augment import RandomFlip, RandomHSV, Sample, build_train_transforms, flip
from detector.data.device_augment import BatchParameters, DeviceAugment, hsv_jitter
from detector.engine.trainer import Trainer
from detector.errors import ConfigError
from detector.ops.boxes import xywhn2xyxy, xyxy2xywhn

COLOUR_AND_FLIPS = Hyperparameters(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, fliplr=0.5, flipud=0.5)


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 with colour regions and gradients (a blurred random picture): photo-like statistics."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)


def as_batch(*images_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([image.transpose(2, 0, 1) for image in images_hwc])).contiguous()


def parameters(count: int, hsv=(1.0, 1.0, 1.0), fliplr=(), flipud=()) -> BatchParameters:
    mask = lambda chosen: np.isin(np.arange(count), chosen)  # noqa: E731
    return BatchParameters(np.array([hsv] * count, np.float64), mask(fliplr), mask(flipud))


def test_hsv_matches_the_cpu_random_hsv_for_the_same_gains():
    image_bgr = smooth_image(64, 128, seed=2)
    hsv = RandomHSV(0.015, 0.7, 0.4)
    outputs, gains = [], []
    for seed in range(4):
        gains.append(np.random.default_rng(seed).uniform(-1, 1, 3) * [0.015, 0.7, 0.4] + 1)  # RandomHSV's draw
        outputs.append(hsv(Sample.create(image_bgr), np.random.default_rng(seed)).image[..., ::-1])  # as RGB
    expected = np.stack(outputs).astype(np.float32)
    rgb = as_batch(*[np.ascontiguousarray(image_bgr[..., ::-1])] * 4)
    by_torch = hsv_jitter(rgb, torch.tensor(np.array(gains), dtype=torch.float32)).numpy().transpose(0, 2, 3, 1)
    by_opencv, _ = DeviceAugment(COLOUR_AND_FLIPS, backend="opencv").apply(
        rgb, torch.zeros((0, 6)), BatchParameters(np.array(gains), np.zeros(4, bool), np.zeros(4, bool))
    )
    # OpenCV converts HSV -> RGB in blocks of 16-64 pixels (truncating) and rounds the pixels left over at a row's
    # end; 128 px rows leave none over, so the two agree but for float32-vs-float64 ties in the look-up tables.
    difference = np.abs(by_torch - expected)
    assert difference.max() <= 1 and (difference == 0).mean() > 0.999
    np.testing.assert_array_equal(by_opencv.numpy().transpose(0, 2, 3, 1), expected)  # the same OpenCV calls


@pytest.mark.parametrize("backend", ["torch", "opencv"])
def test_flips_mirror_pixels_and_boxes_as_hand_computed_and_as_the_cpu_flip(backend):
    image = smooth_image(40, 50, seed=1)
    box = np.array([[10.0, 20.0, 30.0, 36.0]], np.float32)
    row = xyxy2xywhn(box, 50, 40)[0]
    targets = torch.tensor([[image, 1, *row] for image in range(4)], dtype=torch.float32)
    augment = DeviceAugment(Hyperparameters(), backend=backend)
    out, moved = augment.apply(as_batch(*[image] * 4), targets, parameters(4, fliplr=(1, 3), flipud=(2, 3)))
    out = out.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out[0], image)
    np.testing.assert_array_equal(out[1], image[:, ::-1])
    np.testing.assert_array_equal(out[2], image[::-1])
    np.testing.assert_array_equal(out[3], image[::-1, ::-1])
    boxes = xywhn2xyxy(moved[:, 2:].numpy(), 50, 40)
    hand = [[10, 20, 30, 36], [20, 20, 40, 36], [10, 4, 30, 20], [20, 4, 40, 20]]  # x -> 50 - x, y -> 40 - y
    np.testing.assert_allclose(boxes, hand, atol=1e-4)
    sample = Sample.create(image, box, np.array([1]))
    both = flip(flip(sample, "vertical"), "horizontal")
    np.testing.assert_allclose(boxes[3:], both.boxes_xyxy, atol=1e-4)  # as the CPU path's flip
    assert moved[:, :2].tolist() == targets[:, :2].tolist()  # every row kept, image and class unchanged


def test_backends_agree_on_a_drawn_batch():
    batch = as_batch(*(smooth_image(48, 64, seed=seed) for seed in range(6)))
    targets = torch.tensor([[i, 0, 0.3, 0.6, 0.2, 0.2] for i in range(6)])
    augment = DeviceAugment(COLOUR_AND_FLIPS)
    drawn = augment.draw(6, torch.Generator().manual_seed(4))
    by_torch = DeviceAugment(COLOUR_AND_FLIPS, backend="torch").apply(batch, targets, drawn)
    by_opencv = DeviceAugment(COLOUR_AND_FLIPS, backend="opencv").apply(batch, targets, drawn)
    difference = (by_torch[0].int() - by_opencv[0].int()).abs()
    assert difference.max() <= 1 and (difference == 0).float().mean() > 0.99  # 64 px rows: OpenCV's rounding tail
    assert torch.equal(by_torch[1], by_opencv[1])


def test_draws_are_reproducible_and_follow_random_hsv_and_random_flip():
    augment = DeviceAugment(COLOUR_AND_FLIPS)
    batch = as_batch(*[smooth_image(16, 16)] * 4)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.4]])
    first, second, other = (augment(batch, targets, seed) for seed in ((0, 1, 2, 0), (0, 1, 2, 0), (0, 1, 3, 0)))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    drawn = augment.draw(20000, torch.Generator().manual_seed(0))
    limits = np.array([0.015, 0.7, 0.4])
    assert (np.abs(drawn.hsv_gains - 1) <= limits).all()
    np.testing.assert_allclose(np.abs(drawn.hsv_gains - 1).mean(0), limits / 2, rtol=0.03)  # uniform in [1-g, 1+g]
    assert drawn.fliplr.mean() == pytest.approx(0.5, abs=0.02) and drawn.flipud.mean() == pytest.approx(0.5, abs=0.02)
    never = DeviceAugment(Hyperparameters(fliplr=0.0, flipud=0.0)).draw(100, torch.Generator().manual_seed(0))
    assert not never.fliplr.any() and not never.flipud.any()


def test_the_loader_leaves_out_exactly_the_colour_and_flip_steps():
    hyp = Hyperparameters()
    on_cpu = build_train_transforms(hyp, 32)
    on_device = build_train_transforms(hyp, 32, on_device=True)
    names = [repr(step) for step in on_cpu.steps]
    kinds = (RandomHSV, RandomFlip)
    assert [repr(step) for step in on_device.steps] == [
        n for n, s in zip(names, on_cpu.steps, strict=True) if not isinstance(s, kinds)
    ]
    assert sum(isinstance(step, kinds) for step in on_cpu.steps) == 3


def test_training_with_augment_on_device_feeds_augmented_batches_reproducibly(tmp_path):
    tiny = make_tiny(tmp_path / "tiny", num_train=8, num_val=2)
    hyp = dataclasses.replace(COLOUR_AND_FLIPS, warmup_epochs=0.0)
    batches = []
    for run, on_device in enumerate((True, True, False)):
        config = tiny_config(tiny, tmp_path / str(run), epochs=1, hyp=hyp, augment_on_device=on_device, seed=3)
        trainer = Trainer(config, callbacks=())
        trainer.num_batches = 1
        trainer.train_one_epoch()
        batches.append(trainer.last_batch)
    (images, targets, _), (again, again_targets, _), (on_cpu, cpu_targets, _) = batches
    assert images.shape == on_cpu.shape == (8, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images, again) and torch.equal(targets, again_targets)
    # Same pictures and boxes before the last steps, so the same number of rows; other draws, so other pixels.
    assert len(targets) == len(cpu_targets) and not torch.equal(images, on_cpu)


def test_the_flag_parses_and_is_refused_with_quad():
    flags = vars(build_parser().parse_args(["--augment-on-device"]))
    assert resolve_train_config(flags).augment_on_device is True
    with pytest.raises(ConfigError, match=r"--augment-on-device.*--quad"):
        check_train_config(TrainConfig(augment_on_device=True, quad=True))
