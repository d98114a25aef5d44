"""Training recipes I: CutMix, GridMask, cutout's dropped boxes, and mixing augmentations under rect batches."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from detector.config import Hyperparameters
from detector.data.augment import (
    PAD_VALUE,
    Compose,
    CopyPaste,
    CutMix,
    Cutout,
    GridMask,
    MixUp,
    RandomPerspective,
    Sample,
    build_train_transforms,
    cutmix,
    grid_erase_mask,
    gridmask,
    letterbox_sample,
    polygon_mask,
)


def solid(height: int, width: int, value: int, boxes: list[tuple[float, ...]] | None = None) -> Sample:
    """A one-colour image with the given xyxy boxes, class i for box i."""
    boxes = boxes or []
    return Sample.create(
        np.full((height, width, 3), value, np.uint8), np.array(boxes, np.float32), np.arange(len(boxes))
    )


class ListSource:
    """An in-memory SampleSource: fixed samples (long side 64, like the store at --img 64) and optional outlines."""

    def __init__(self, samples: list[Sample], polygons: list[list[np.ndarray | None]] | None = None) -> None:
        self.samples = samples
        self.polygons = polygons or [[None] * len(s.classes) for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_sample(self, index: int) -> Sample:
        return self.samples[index]

    def load_polygons(self, index: int) -> list[np.ndarray | None]:
        return self.polygons[index]


def varied_source() -> ListSource:
    """Images of several aspect ratios (long side 64), each with a solid-colour object on black."""
    samples = []
    for height, width, box in [(64, 48, (5, 5, 30, 40)), (40, 64, (10, 8, 50, 30)), (64, 64, (20, 20, 60, 60))]:
        image = np.zeros((height, width, 3), np.uint8)
        image[box[1] : box[3], box[0] : box[2]] = (0, 200, 0)
        samples.append(Sample.create(image, np.array([box], np.float32), np.array([len(samples)])))
    return ListSource(samples)


def identity() -> Compose:
    """A geometry step that changes nothing and draws nothing from the rng (keeps draws easy to replay)."""
    return Compose([])


# --------------------------------------------------------------------------------------------------------------------
# CutMix: the deterministic function


def test_cutmix_hand_computed_boxes_and_pixels() -> None:
    own = [
        (0, 0, 40, 20),  # right half under the region: clipped to its visible left half
        (10, 0, 60, 10),  # 80% under the region: dropped
        (50, 40, 90, 90),  # corner under the region (5%): the visible part is L-shaped, box unchanged
        (10, 30, 70, 40),  # middle band hidden, both ends visible (1/3): box unchanged
        (25, 40, 55, 80),  # top quarter hidden: clipped to the visible lower part
        (70, 70, 90, 90),  # away from the region: unchanged
    ]
    donor_boxes = [
        (10, 10, 30, 30),  # half inside the region: clipped to it
        (50, 45, 80, 80),  # 50 of 1050 px inside: dropped
        (30, 10, 50, 40),  # wholly inside: kept as is
        (0, 60, 10, 70),  # outside: dropped
    ]
    sample, donor = solid(100, 100, 10, own), solid(100, 100, 200, donor_boxes)
    donor.classes[:] += 10
    out = cutmix(sample, donor, (20, 0, 60, 50), min_visibility=0.3)
    expected = [(0, 0, 20, 20), (50, 40, 90, 90), (10, 30, 70, 40), (25, 50, 55, 80), (70, 70, 90, 90)]
    expected += [(20, 10, 30, 30), (30, 10, 50, 40)]
    np.testing.assert_array_equal(out.boxes_xyxy, np.array(expected, np.float32))
    np.testing.assert_array_equal(out.classes, [0, 2, 3, 4, 5, 10, 12])
    assert out.boxes_xyxy.dtype == np.float32 and out.classes.dtype == np.int64
    inside = np.zeros((100, 100), bool)
    inside[0:50, 20:60] = True
    assert (out.image[inside] == 200).all() and (out.image[~inside] == 10).all()
    assert (sample.image == 10).all() and (donor.image == 200).all()  # inputs untouched


@pytest.mark.parametrize(
    ("region", "kept_box"),
    [
        ((0, 0, 17, 100), (17, 0, 20, 10)),  # left cut: exactly 0.3 visible is kept, clipped to x >= 17
        ((0, 0, 18, 100), None),  # 0.2 visible: dropped
        ((13, 0, 40, 100), (10, 0, 13, 10)),  # right cut, exactly 0.3 visible
        ((0, 7, 100, 100), (10, 0, 20, 7)),  # bottom cut, 0.7 visible
        ((0, 0, 100, 5), (10, 5, 20, 10)),  # top cut, 0.5 visible
        ((0, 0, 100, 100), None),  # wholly hidden
    ],
)
def test_cutmix_side_cuts_and_inclusive_threshold(region: tuple, kept_box: tuple | None) -> None:
    sample, donor = solid(100, 100, 0, [(10, 0, 20, 10)]), solid(100, 100, 255)
    out = cutmix(sample, donor, region, min_visibility=0.3)
    if kept_box is None:
        assert out.boxes_xyxy.shape == (0, 4) and out.classes.shape == (0,)
    else:
        np.testing.assert_array_equal(out.boxes_xyxy, [kept_box])


def test_cutmix_donor_threshold_and_background_samples() -> None:
    donor = solid(50, 50, 255, [(0, 0, 10, 10), (0, 20, 10, 30)])
    # Region (7, 0, 50, 50): the first donor box keeps 3 of 10 columns (0.3, kept), region (8, ...) keeps 0.2.
    out = cutmix(solid(50, 50, 0), donor, (7, 0, 50, 50), min_visibility=0.3)
    np.testing.assert_array_equal(out.boxes_xyxy, [[7, 0, 10, 10], [7, 20, 10, 30]])
    out = cutmix(solid(50, 50, 0), donor, (8, 0, 50, 50), min_visibility=0.3)
    assert out.boxes_xyxy.shape == (0, 4)
    out = cutmix(solid(50, 50, 0), solid(50, 50, 255), (0, 0, 5, 5), min_visibility=0.3)  # no boxes anywhere
    assert out.boxes_xyxy.shape == (0, 4) and out.classes.dtype == np.int64 and (out.image[:5, :5] == 255).all()


def test_cutmix_rejects_bad_inputs_and_skips_empty_regions() -> None:
    sample = solid(40, 60, 0, [(1, 1, 9, 9)])
    with pytest.raises(ValueError, match="shape"):
        cutmix(sample, solid(60, 40, 0), (0, 0, 5, 5))
    with pytest.raises(ValueError, match="region"):
        cutmix(sample, solid(40, 60, 0), (0, 0, 61, 5))
    assert cutmix(sample, solid(40, 60, 9), (5, 5, 5, 30)) is sample


def test_cutmix_random_region_stays_inside_with_the_image_aspect() -> None:
    rng = np.random.default_rng(0)
    regions = np.array([CutMix.random_region((100, 200), rng) for _ in range(500)])
    assert (regions[:, [0, 2]] >= 0).all() and (regions[:, [0, 2]] <= 200).all()
    assert (regions[:, [1, 3]] >= 0).all() and (regions[:, [1, 3]] <= 100).all()
    assert (regions[:, 2:] >= regions[:, :2]).all()
    widths, heights = regions[:, 2] - regions[:, 0], regions[:, 3] - regions[:, 1]
    unclipped = (regions[:, 0] > 0) & (regions[:, 2] < 200) & (regions[:, 1] > 0) & (regions[:, 3] < 100)
    unclipped &= heights >= 10
    assert unclipped.sum() > 20
    np.testing.assert_allclose(widths[unclipped] / heights[unclipped], 2.0, atol=0.25)  # the image's 2:1


# --------------------------------------------------------------------------------------------------------------------
# CutMix: the random step


def test_cutmix_step_is_the_pure_function_on_its_draws_and_keeps_the_rect_shape() -> None:
    source = varied_source()
    sample = solid(32, 64, 30, [(40, 4, 60, 28)])
    step = CutMix(source, identity(), probability=1.0, min_visibility=0.3, rect=True)
    for seed in range(6):
        out = step(sample, np.random.default_rng(seed))
        draws = np.random.default_rng(seed)
        draws.random()  # apply or not
        index = int(draws.integers(0, len(source)))
        region = CutMix.random_region((32, 64), draws)
        donor = letterbox_sample(source.samples[index], (32, 64), scaleup=True)[0]
        expected = cutmix(sample, donor, region, 0.3)
        assert out.image.shape == (32, 64, 3)
        np.testing.assert_array_equal(out.image, expected.image)
        np.testing.assert_array_equal(out.boxes_xyxy, expected.boxes_xyxy)
        np.testing.assert_array_equal(out.classes, expected.classes)
    assert CutMix(source, identity(), probability=0.0)(sample, np.random.default_rng(0)) is sample


def test_square_cutmix_donor_goes_through_geometry() -> None:
    source = varied_source()
    geometry = RandomPerspective((64, 64))
    sample = geometry(source.samples[2], np.random.default_rng(0))
    out = CutMix(source, geometry, probability=1.0)(sample, np.random.default_rng(4))
    assert out.image.shape == (64, 64, 3)
    again = CutMix(source, geometry, probability=1.0)(sample, np.random.default_rng(4))
    np.testing.assert_array_equal(out.image, again.image)
    np.testing.assert_array_equal(out.boxes_xyxy, again.boxes_xyxy)


# --------------------------------------------------------------------------------------------------------------------
# GridMask


def test_grid_erase_mask_hand_computed() -> None:
    mask = grid_erase_mask((6, 8), unit=4, erase_size=2, offset=(1, 0))
    columns = [0, 1, 1, 0, 0, 1, 1, 0]  # (x - 1) mod 4 < 2
    rows = [1, 1, 0, 0, 1, 1]  # y mod 4 < 2
    np.testing.assert_array_equal(mask, np.outer(rows, columns).astype(bool))
    with pytest.raises(ValueError, match="erase_size"):
        grid_erase_mask((6, 8), unit=4, erase_size=5)


def test_gridmask_counts_erased_pixels_per_box() -> None:
    mask = grid_erase_mask((6, 8), unit=4, erase_size=2, offset=(1, 0))
    boxes = [
        (1, 0, 3, 2),  # 4 px, all erased: dropped
        (0, 0, 4, 4),  # 16 px, 4 erased: 0.75 visible
        (1, 0, 3, 6),  # 12 px, 8 erased: 1/3 visible
        (1, 0, 3, 5),  # 10 px, 6 erased: 0.4 visible
        (0.5, 0.5, 2.5, 1.5),  # touches x 0-2, y 0-1: 6 px, 4 erased: 1/3 visible
    ]
    sample = Sample.create(np.zeros((6, 8, 3), np.uint8), np.array(boxes, np.float32), np.arange(5))
    out = gridmask(sample, mask, min_visibility=0.3)
    np.testing.assert_array_equal(out.classes, [1, 2, 3, 4])
    np.testing.assert_array_equal(out.boxes_xyxy, np.array(boxes[1:], np.float32))
    assert (out.image[mask] == PAD_VALUE).all() and (out.image[~mask] == 0).all()
    assert (sample.image == 0).all()  # input untouched
    np.testing.assert_array_equal(gridmask(sample, mask, min_visibility=0.4).classes, [1, 3])  # 0.4 is kept
    with pytest.raises(ValueError, match="mask"):
        gridmask(sample, mask.T, 0.3)


def test_gridmask_step_erases_the_paper_fraction() -> None:
    # unit 16 on a 64 px image: each axis has 4 whole units with round(0.4 * 16) = 6 erased px, whatever the offset.
    step = GridMask(1.0, unit_range=(0.25, 0.25), ratio=0.6)
    sample = solid(64, 64, 0, [(0, 0, 64, 64)])
    for seed in range(4):
        out = step(sample, np.random.default_rng(seed))
        assert int((out.image[..., 0] == PAD_VALUE).sum()) == (4 * 6) ** 2
        assert len(out.classes) == 1  # 1 - 576 / 4096 visible
    first, again = step(sample, np.random.default_rng(9)), step(sample, np.random.default_rng(9))
    np.testing.assert_array_equal(first.image, again.image)
    assert GridMask(0.0)(sample, np.random.default_rng(0)) is sample
    with pytest.raises(ValueError, match="ratio"):
        GridMask(0.5, ratio=1.0)


def test_gridmask_step_keeps_boxes_only_when_visible_enough() -> None:
    boxes = [(x, y, x + 6, y + 6) for x in range(0, 60, 8) for y in range(0, 60, 8)]
    sample = Sample.create(np.zeros((64, 64, 3), np.uint8), np.array(boxes, np.float32), np.zeros(len(boxes)))
    for seed in range(5):
        out = GridMask(1.0, min_visibility=0.5)(sample, np.random.default_rng(seed))
        erased = out.image[..., 0] == PAD_VALUE
        assert erased.any()
        kept = {tuple(box) for box in out.boxes_xyxy.astype(int).tolist()}
        for x1, y1, x2, y2 in boxes:
            assert ((x1, y1, x2, y2) in kept) == (erased[y1:y2, x1:x2].mean() <= 0.5)


# --------------------------------------------------------------------------------------------------------------------
# Cutout (random erasing)


def test_cutout_drops_a_box_hidden_under_its_first_patch() -> None:
    draws = np.random.default_rng(2)
    draws.random()  # apply or not; then the first (half-size) patch:
    patch_h, patch_w = int(draws.integers(1, 50 + 2)), int(draws.integers(1, 50 + 2))
    x1, y1 = int(draws.integers(0, 100)), int(draws.integers(0, 100))
    x2, y2 = min(100, x1 + patch_w), min(100, y1 + patch_h)
    assert x2 > x1 and y2 > y1
    sample = Sample.create(np.zeros((100, 100, 3), np.uint8), np.array([[x1, y1, x2, y2]], np.float32), [0])
    out = Cutout(1.0)(sample, np.random.default_rng(2))
    assert out.boxes_xyxy.shape == (0, 4)
    assert (out.image[y1:y2, x1:x2] > 0).all()  # painted over


# --------------------------------------------------------------------------------------------------------------------
# Mixing under rectangular training


def test_rect_mixup_letterboxes_the_other_image_to_the_sample_shape() -> None:
    # The 64x48 (h x w) donor into a 32x64 batch shape: scale 0.5 to 32x24, 20 px padding left and right.
    source = ListSource([varied_source().samples[0]])
    sample = solid(32, 64, 30, [(40, 4, 60, 28)])
    out = MixUp(source, RandomPerspective(None), 1.0, rect=True)(sample, np.random.default_rng(0))
    assert out.image.shape == (32, 64, 3)
    np.testing.assert_allclose(out.boxes_xyxy, [[40, 4, 60, 28], [22.5, 2.5, 35, 20]])
    np.testing.assert_array_equal(out.classes, [0, 0])
    assert out.image[16, 4].tolist() != [30, 30, 30]  # blended with the donor's grey padding


def test_mixup_refuses_a_donor_of_another_shape() -> None:
    source = ListSource([solid(64, 48, 0)])
    step = MixUp(source, RandomPerspective(None), 1.0)  # rect=False: donors are not letterboxed
    with pytest.raises(ValueError, match="rect=True"):
        step(solid(32, 64, 0), np.random.default_rng(0))


def test_rect_copy_paste_letterboxes_the_donor_and_its_outline() -> None:
    donor = np.zeros((64, 64, 3), np.uint8)
    triangle = np.array([[16, 16], [48, 16], [16, 48]], np.float32)
    donor[polygon_mask(triangle, (64, 64))] = (0, 0, 255)
    source = ListSource([Sample.create(donor, np.array([[16, 16, 48, 48]], np.float32), [2])], [[triangle / 64]])
    sample = solid(32, 64, 50)
    out = CopyPaste(source, 1.0, rect=True)(sample, np.random.default_rng(1))
    # Letterboxed to 32x64: scale 0.5 and 16 px left padding, so the box becomes (24, 8, 40, 24), a 16x16 patch
    # whose outline is the triangle (0, 0), (16, 0), (0, 16).
    draws = np.random.default_rng(1)
    draws.random()
    draws.integers(0, 1)
    x, y = int(draws.integers(0, 64 - 16 + 1)), int(draws.integers(0, 32 - 16 + 1))
    assert out.image.shape == (32, 64, 3)
    np.testing.assert_array_equal(out.boxes_xyxy, [[x, y, x + 16, y + 16]])
    np.testing.assert_array_equal(out.classes, [2])
    expected = np.zeros((32, 64), bool)
    expected[y : y + 16, x : x + 16] = polygon_mask(np.array([[0, 0], [16, 0], [0, 16]]), (16, 16))
    np.testing.assert_array_equal((out.image != 50).any(axis=2), expected)


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (64, 64), (48, 64)])
def test_rect_pipeline_with_every_mixing_step_keeps_the_batch_shape(shape: tuple[int, int]) -> None:
    source = varied_source()
    hyp = Hyperparameters(mixup=0.9, cutmix=0.9, copy_paste=0.9, cutout=0.5, gridmask=0.5, degrees=3, translate=0.1)
    pipeline = build_train_transforms(hyp, 64, source, rect=True)
    for index in range(len(source)):
        sample = letterbox_sample(source.samples[index], shape, scaleup=True)[0]
        out = pipeline(sample, np.random.default_rng(index))
        assert out.image.shape == (*shape, 3) and out.image.dtype == np.uint8
        boxes = out.boxes_xyxy
        assert boxes.dtype == np.float32 and out.classes.dtype == np.int64 and len(boxes) == len(out.classes)
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= shape[1]).all() and (boxes[:, [1, 3]] <= shape[0]).all()
        again = pipeline(sample, np.random.default_rng(index))
        np.testing.assert_array_equal(out.image, again.image)
        np.testing.assert_array_equal(out.boxes_xyxy, again.boxes_xyxy)


def test_square_pipeline_with_cutmix_and_gridmask_is_deterministic() -> None:
    source = varied_source()
    hyp = Hyperparameters(cutmix=0.9, gridmask=0.9, mixup=0.3)
    pipeline = build_train_transforms(hyp, 64, source)
    outputs = [pipeline(source.samples[1], np.random.default_rng(seed)) for seed in (5, 5, 6)]
    assert all(out.image.shape == (64, 64, 3) for out in outputs)
    np.testing.assert_array_equal(outputs[0].image, outputs[1].image)
    np.testing.assert_array_equal(outputs[0].boxes_xyxy, outputs[1].boxes_xyxy)
    assert not np.array_equal(outputs[0].image, outputs[2].image)


# --------------------------------------------------------------------------------------------------------------------
# Wiring


def test_build_order_with_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakePolicy:
        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
            return sample

    policies = types.ModuleType("detector.data.policies")
    policies.build_auto_augment = FakePolicy  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "detector.data.policies", policies)
    hyp = Hyperparameters(mixup=0.1, cutmix=0.1, copy_paste=0.1, cutout=0.1, gridmask=0.1, albumentations=0.1)
    source = varied_source()
    pipeline = build_train_transforms(hyp, 64, source, auto_augment="trivial")
    names = [type(step).__name__ for step in pipeline.steps]
    assert names == [
        "Compose",
        "FakePolicy",
        "MixUp",
        "CutMix",
        "Cutout",
        "GridMask",
        "Albumentations",
        "RandomHSV",
        "RandomFlip",
        "RandomFlip",
    ]
    assert pipeline.steps[1].name == "trivial"
    assert [type(step).__name__ for step in pipeline.steps[0].steps] == ["Mosaic", "CopyPaste", "RandomPerspective"]

    rect = build_train_transforms(hyp, 64, source, rect=True)
    assert [type(step).__name__ for step in rect.steps[0].steps] == ["CopyPaste", "RandomPerspective"]
    assert [type(step).__name__ for step in rect.steps[1:4]] == ["MixUp", "CutMix", "Cutout"]
    assert all(getattr(step, "rect", True) for step in [*rect.steps, *rect.steps[0].steps])
    assert rect.steps[0].steps[-1].output_shape is None  # every step keeps the batch shape

    no_source = build_train_transforms(hyp, 64, None, rect=True)
    names = [type(step).__name__ for step in no_source.steps]
    assert "MixUp" not in names and "CutMix" not in names and "GridMask" in names
    plain = build_train_transforms(Hyperparameters(), 64, source)
    assert [type(step).__name__ for step in plain.steps] == ["Compose", "RandomHSV", "RandomFlip", "RandomFlip"]
