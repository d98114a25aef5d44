"""Automatic augmentation policies: each op against a hand-computed or independent reference, then the policies."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from detector.data import policies
from detector.data.augment import PAD_VALUE, Sample
from detector.data.policies import (
    AUTO_AUGMENT_POLICIES,
    DETECTION_POLICY_V0,
    OPS,
    RAND_AUGMENT_RANGES,
    TRIVIAL_AUGMENT_WIDE_RANGES,
    DetectionPolicyV0,
    RandAugment,
    TrivialAugmentWide,
    autocontrast,
    brightness,
    build_auto_augment,
    check_auto_augment,
    color,
    contrast,
    cutout,
    equalize,
    parse_auto_augment,
    posterize,
    rotate,
    sharpness,
    shear_matrix,
    shear_x,
    solarize,
    translate_x,
    translate_y,
    translate_y_only_boxes,
)
from detector.errors import ConfigError

COLOUR_OPS = ("Identity", "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast")


def random_sample(height: int = 48, width: int = 64, seed: int = 0) -> Sample:
    """Random pixels with two boxes well inside the image; read-only arrays, so any in-place write raises."""
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    sample = Sample.create(image, [[10, 8, 30, 28], [36, 20, 50, 40]], [3, 7])
    for array in (sample.image, sample.boxes_xyxy, sample.classes):
        array.flags.writeable = False
    return sample


# --------------------------------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize("pixels", [7, -5])
def test_translate_x_moves_boxes_and_pixels_by_exactly_that(pixels: int) -> None:
    sample = random_sample()
    out = translate_x(sample, pixels)
    np.testing.assert_array_equal(out.boxes_xyxy, sample.boxes_xyxy + np.array([pixels, 0, pixels, 0], np.float32))
    np.testing.assert_array_equal(out.classes, sample.classes)
    expected = np.full_like(sample.image, PAD_VALUE)
    if pixels > 0:
        expected[:, pixels:] = sample.image[:, :-pixels]
    else:
        expected[:, :pixels] = sample.image[:, -pixels:]
    np.testing.assert_array_equal(out.image, expected)


def test_translate_y_moves_boxes_and_pixels_by_exactly_that() -> None:
    sample = random_sample()
    out = translate_y(sample, 6)
    np.testing.assert_array_equal(out.boxes_xyxy, sample.boxes_xyxy + np.array([0, 6, 0, 6], np.float32))
    np.testing.assert_array_equal(out.image[6:], sample.image[:-6])
    assert (out.image[:6] == PAD_VALUE).all()


def test_translation_drops_a_box_pushed_out_and_clips_one_partly_out() -> None:
    sample = random_sample()  # boxes x 10..30 and 36..50 on a 64-wide image
    out = translate_x(sample, 30)
    np.testing.assert_array_equal(out.boxes_xyxy, [[40, 8, 60, 28]])  # the second box would start at x 66
    np.testing.assert_array_equal(out.classes, [3])
    clipped = translate_x(sample, 20)  # the second box: 56..70 -> 56..64, 57% of it still visible
    np.testing.assert_array_equal(clipped.boxes_xyxy[1], [56, 20, 64, 40])


@pytest.mark.parametrize(("degrees", "turns", "box"), [(90, 1, [4, 14, 12, 18]), (-90, -1, [8, 2, 16, 6])])
def test_rotate_quarter_turn_of_square_image(degrees: float, turns: int, box: list[float]) -> None:
    """Box (2, 4, 6, 12) on 20x20: counter-clockwise x' = y, y' = 20 - x; clockwise x' = 20 - y, y' = x."""
    image = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    out = rotate(Sample.create(image, [[2, 4, 6, 12]], [0]), degrees)
    np.testing.assert_array_equal(out.image, np.rot90(image, turns))
    np.testing.assert_allclose(out.boxes_xyxy, [box], atol=1e-4)


def test_shear_matrix_on_known_points() -> None:
    # x' = x + 0.5 * (y - H / 2) with H = 100: (10, 70) -> (20, 70); y' = y + 0.5 * (x - W / 2), W = 80.
    np.testing.assert_allclose(shear_matrix(0.5, (100, 80), "x") @ [10, 70, 1], [20, 70, 1])
    np.testing.assert_allclose(shear_matrix(0.5, (100, 80), "y") @ [60, 10, 1], [60, 20, 1])
    with pytest.raises(ValueError, match="'z'"):
        shear_matrix(0.5, (100, 80), "z")


def test_shear_x_moves_pixel_and_box() -> None:
    # Odd height: the centre row is 50 (centre y 50.5), so row 30 shifts by exactly 0.5 * -20 = -10 columns.
    image = np.zeros((101, 101, 3), np.uint8)
    image[30, 70] = 255
    out = shear_x(Sample.create(image, [[40, 40.5, 60, 60.5]], [1]), 0.5)
    assert np.argwhere(out.image[..., 0] == 255).tolist() == [[30, 60]]
    window = np.zeros((3, 3), np.uint8)
    window[1, 1] = 255
    np.testing.assert_array_equal(out.image[29:32, 59:62, 0], window)  # moved whole, not blurred by the warp
    np.testing.assert_allclose(out.boxes_xyxy, [[35, 40.5, 65, 60.5]], atol=1e-4)  # corners: y -10 / +10 from 50.5


def test_zero_magnitude_geometry_is_identity() -> None:
    sample = random_sample()
    for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert OPS[name](sample, 0.0) is sample


# --------------------------------------------------------------------------------------------------------------------
# Colour


@pytest.mark.parametrize("name", [*COLOUR_OPS, "Equalize"])
def test_colour_ops_keep_boxes_shape_and_dtype(name: str) -> None:
    sample = random_sample()
    argument = {"Posterize": 3, "Solarize": 100}.get(name, 1.6)
    out = OPS[name](sample, argument)
    np.testing.assert_array_equal(out.boxes_xyxy, sample.boxes_xyxy)
    np.testing.assert_array_equal(out.classes, sample.classes)
    assert out.image.shape == sample.image.shape and out.image.dtype == np.uint8


@pytest.mark.parametrize("bits", range(1, 9))
def test_posterize_matches_shift_formula(bits: int) -> None:
    sample = random_sample()
    expected = (sample.image >> (8 - bits)) << (8 - bits)
    np.testing.assert_array_equal(posterize(sample, bits).image, expected)


@pytest.mark.parametrize("threshold", [0, 1, 128, 255, 256])
def test_solarize_matches_formula(threshold: int) -> None:
    image = random_sample().image.astype(np.int64)
    expected = np.where(image >= threshold, 255 - image, image)
    np.testing.assert_array_equal(solarize(random_sample(), threshold).image, expected)


def low_spread_image() -> np.ndarray:
    """Channels with narrow and uneven histograms, one of them constant: where equalize and autocontrast matter."""
    rng = np.random.default_rng(2)
    image = np.empty((40, 50, 3), np.uint8)
    image[..., 0] = rng.integers(60, 110, (40, 50))
    image[..., 1] = np.clip(rng.normal(150, 10, (40, 50)), 0, 255)
    image[..., 2] = 77
    return image


def test_equalize_matches_pil() -> None:
    image_module = pytest.importorskip("PIL.Image")
    image_ops = pytest.importorskip("PIL.ImageOps")
    for image in (low_spread_image(), random_sample().image):
        expected = np.asarray(image_ops.equalize(image_module.fromarray(np.ascontiguousarray(image))))
        np.testing.assert_array_equal(equalize(Sample.create(image)).image, expected)


def test_autocontrast_stretches_each_channel_like_pil() -> None:
    image = low_spread_image()
    out = autocontrast(Sample.create(image)).image
    assert out[..., :2].min(axis=(0, 1)).tolist() == [0, 0] and out[..., :2].max(axis=(0, 1)).tolist() == [255, 255]
    assert (out[..., 2] == 77).all()  # a flat channel is left alone
    image_module = pytest.importorskip("PIL.Image")
    image_ops = pytest.importorskip("PIL.ImageOps")
    expected = np.asarray(image_ops.autocontrast(image_module.fromarray(image))).astype(int)
    assert np.abs(out.astype(int) - expected).max() <= 1  # PIL truncates a float product: at most 1 lower


def test_enhance_ops_against_their_degenerate_images() -> None:
    sample = random_sample()
    image = sample.image.astype(np.float64)
    np.testing.assert_array_equal(brightness(sample, 0.5).image, np.rint(image * 0.5))
    grey = cv2.cvtColor(sample.image, cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(color(sample, 0.0).image, np.repeat(grey[..., None], 3, axis=2))
    assert (contrast(sample, 0.0).image == round(grey.mean())).all()
    for op in (brightness, color, contrast, sharpness):
        np.testing.assert_array_equal(op(sample, 1.0).image, sample.image)
    flat = Sample.create(np.full((10, 10, 3), 90, np.uint8))
    np.testing.assert_array_equal(sharpness(flat, 1.9).image, flat.image)  # nothing to sharpen
    sharp = sharpness(sample, 1.5).image
    np.testing.assert_array_equal(sharp[0], sample.image[0])  # PIL keeps the border pixels
    assert (sharp[1:-1, 1:-1] != sample.image[1:-1, 1:-1]).any()


@pytest.mark.parametrize("name", ["Brightness", "Color", "Contrast", "Sharpness"])
def test_enhance_ops_match_pil_image_enhance(name: str) -> None:
    image_module = pytest.importorskip("PIL.Image")
    image_enhance = pytest.importorskip("PIL.ImageEnhance")
    sample = random_sample()
    rgb = image_module.fromarray(np.ascontiguousarray(sample.image[..., ::-1]))  # PIL's grey weights expect RGB
    for factor in (0.0, 0.3, 1.5, 1.9):
        expected = np.asarray(getattr(image_enhance, name)(rgb).enhance(factor))[..., ::-1].astype(int)
        # PIL truncates its blend where we round, and rounds its grey image: at most 2 levels apart
        assert np.abs(OPS[name](sample, factor).image.astype(int) - expected).max() <= 2


# --------------------------------------------------------------------------------------------------------------------
# Ops of the detection policy


@pytest.mark.parametrize("pixels", [3, -4])
def test_translate_y_only_boxes_shifts_content_inside_boxes_only(pixels: int) -> None:
    sample = random_sample()
    out = translate_y_only_boxes(sample, pixels, [0, 1])
    np.testing.assert_array_equal(out.boxes_xyxy, sample.boxes_xyxy)
    np.testing.assert_array_equal(out.classes, sample.classes)
    inside = np.zeros(sample.image.shape[:2], bool)
    for x1, y1, x2, y2 in sample.boxes_xyxy.astype(int):
        inside[y1:y2, x1:x2] = True
        crop = sample.image[y1:y2, x1:x2]
        expected = np.full_like(crop, PAD_VALUE)
        if pixels > 0:
            expected[pixels:] = crop[:-pixels]
        else:
            expected[:pixels] = crop[-pixels:]
        np.testing.assert_array_equal(out.image[y1:y2, x1:x2], expected)
    np.testing.assert_array_equal(out.image[~inside], sample.image[~inside])
    only_first = translate_y_only_boxes(sample, pixels, [0])
    np.testing.assert_array_equal(only_first.image[20:40, 36:50], sample.image[20:40, 36:50])


def test_cutout_fills_a_clipped_square() -> None:
    sample = random_sample()
    out = cutout(sample, 5, (2, 30))  # columns -3..7 -> 0..7, rows 25..35
    expected = sample.image.copy()
    expected[25:35, 0:7] = PAD_VALUE
    np.testing.assert_array_equal(out.image, expected)
    np.testing.assert_array_equal(out.boxes_xyxy, sample.boxes_xyxy)


def test_detection_policy_scales_pixel_constants_with_the_image() -> None:
    # Level 4 of 10 of 250 px at long side 640 -> 50 px at long side 320; then Equalize.
    image = np.random.default_rng(3).integers(0, 256, (200, 320, 3), dtype=np.uint8)
    sample = Sample.create(image, [[100, 50, 200, 150]], [2])
    policy = DetectionPolicyV0([[("TranslateX_BBox", 1.0, 4), ("Equalize", 1.0, 10)]])
    shifts = set()
    for seed in range(6):
        out = policy(sample, np.random.default_rng(seed))
        shift = float(out.boxes_xyxy[0, 0] - 100)
        assert abs(shift) == 50
        np.testing.assert_array_equal(out.boxes_xyxy, sample.boxes_xyxy + np.array([shift, 0, shift, 0], np.float32))
        np.testing.assert_array_equal(out.image, equalize(translate_x(sample, shift)).image)
        shifts.add(shift)
    assert shifts == {-50.0, 50.0}


def test_detection_policy_never_applies_zero_probability_or_zero_level_ops() -> None:
    sample = random_sample()
    policy = DetectionPolicyV0([DETECTION_POLICY_V0[2]])  # (Sharpness 0.0 8), (ShearX_BBox 0.4 0)
    for seed in range(5):
        out = policy(sample, np.random.default_rng(seed))
        np.testing.assert_array_equal(out.image, sample.image)
        np.testing.assert_array_equal(out.boxes_xyxy, sample.boxes_xyxy)


def test_detection_policy_v0_is_the_published_one() -> None:
    assert len(DETECTION_POLICY_V0) == 5
    assert DETECTION_POLICY_V0[0] == (("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10))
    assert DETECTION_POLICY_V0[3] == (("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6))
    with pytest.raises(ValueError, match="Flip"):
        DetectionPolicyV0([[("Flip", 0.5, 3)]])


# --------------------------------------------------------------------------------------------------------------------
# Policies


def record_ops(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """Replace every op by one that records (name, argument) and returns the sample unchanged."""
    calls: list[tuple[str, float]] = []
    for name in list(OPS):

        def recorder(sample: Sample, argument: float, name: str = name) -> Sample:
            calls.append((name, argument))
            return sample

        monkeypatch.setitem(policies.OPS, name, recorder)
    return calls


def test_trivial_augment_applies_exactly_one_op_within_its_wide_range(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_ops(monkeypatch)
    policy = TrivialAugmentWide()
    sample = random_sample()  # 48 x 64
    chosen = []
    for seed in range(200):
        before = len(calls)
        policy(sample, np.random.default_rng(seed))
        assert len(calls) == before + 1
        chosen.append(calls[-1])
    assert {name for name, _ in chosen} == set(TRIVIAL_AUGMENT_WIDE_RANGES)
    rotations = [argument for name, argument in chosen if name == "Rotate"]
    assert all(abs(a) <= 135 for a in rotations) and min(rotations) < 0 < max(rotations)
    assert all(abs(a) <= 64 / 7 + 1e-9 for name, a in chosen if name == "TranslateX")
    assert all(0.01 - 1e-9 <= a <= 1.99 + 1e-9 for name, a in chosen if name == "Brightness")
    assert {round(a) for name, a in chosen if name == "Posterize"} <= set(range(2, 9))


def test_randaugment_applies_n_ops_at_magnitude_m(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_ops(monkeypatch)
    policy = RandAugment(num_ops=3, magnitude=12)
    for seed in range(30):
        del calls[:]
        policy(random_sample(), np.random.default_rng(seed))
        assert len(calls) == 3
        for name, argument in calls:
            if name == "Rotate":
                assert abs(argument) == pytest.approx(12.0)  # bin 12 of 0..30 over 0-30 degrees
            if name == "Solarize":
                assert argument == pytest.approx(256 - 256 * 12 / 30)
            if name == "TranslateY":
                assert abs(argument) == pytest.approx(12 / 30 * 150 / 331 * 48)
    assert RAND_AUGMENT_RANGES["Rotate"].high == 30.0


@pytest.mark.parametrize("name", ["trivial", "randaugment", "randaugment-n4-m20", "detection-v0"])
def test_policies_are_reproducible_and_keep_shape_dtype_and_inputs(name: str) -> None:
    policy = build_auto_augment(name)
    sample = random_sample(64, 64)  # read-only: a write to the input would raise
    outputs = [policy(sample, np.random.default_rng(seed)) for seed in range(12)]
    again = [policy(sample, np.random.default_rng(seed)) for seed in range(12)]
    for out, repeat in zip(outputs, again, strict=True):
        np.testing.assert_array_equal(out.image, repeat.image)
        np.testing.assert_array_equal(out.boxes_xyxy, repeat.boxes_xyxy)
        np.testing.assert_array_equal(out.classes, repeat.classes)
        assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8
        assert out.boxes_xyxy.dtype == np.float32 and out.classes.dtype == np.int64
        assert len(out.boxes_xyxy) == len(out.classes)
        assert (out.boxes_xyxy >= 0).all() and (out.boxes_xyxy <= 64).all()
    assert any(not np.array_equal(out.image, outputs[0].image) for out in outputs[1:])
    empty = policy(Sample.create(sample.image), np.random.default_rng(0))
    assert empty.boxes_xyxy.shape == (0, 4) and empty.classes.shape == (0,)


# --------------------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("name", "policy", "kwargs"),
    [
        ("trivial", "trivial", {}),
        ("randaugment", "randaugment", {"num_ops": 2, "magnitude": 9}),
        ("randaugment-n3-m12", "randaugment", {"num_ops": 3, "magnitude": 12}),
        ("randaugment-n1-m0", "randaugment", {"num_ops": 1, "magnitude": 0}),
        ("randaugment-n2-m30", "randaugment", {"num_ops": 2, "magnitude": 30}),
        ("detection-v0", "detection-v0", {}),
    ],
)
def test_parse_accepts_the_valid_forms(name: str, policy: str, kwargs: dict) -> None:
    assert parse_auto_augment(name) == (policy, kwargs)
    assert policy in AUTO_AUGMENT_POLICIES
    check_auto_augment(name)


@pytest.mark.parametrize(
    "name",
    ["", "Trivial", "trivialaugment", "randaugment-n0-m9", "randaugment-n2-m31", "randaugment-n2", "detection-v1"],
)
def test_check_rejects_other_values_in_one_line(name: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_auto_augment(name)
    message = str(error.value)
    assert repr(name) in message and "randaugment-nN-mM" in message and "detection-v0" in message
    assert "\n" not in message


def test_build_returns_configured_instances_with_a_repr() -> None:
    randaugment = build_auto_augment("randaugment-n3-m12")
    assert isinstance(randaugment, RandAugment) and (randaugment.num_ops, randaugment.magnitude) == (3, 12)
    assert repr(randaugment) == "RandAugment(num_ops=3, magnitude=12/30)"
    assert repr(build_auto_augment("trivial")) == "TrivialAugmentWide(ops=14, bins=31)"
    assert repr(build_auto_augment("detection-v0")) == "DetectionPolicyV0(sub_policies=5)"
    with pytest.raises(ValueError, match="num_ops"):
        RandAugment(num_ops=0)
