"""The loader's fast paths against what they replace: MosaicWarp (mosaic + random perspective in one resampling)
against the two-step path, the ImageStore methods it reads pictures through, and the workers' malloc setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from detector.config import Hyperparameters
from detector.data.augment import (
    Compose,
    Mosaic,
    MosaicWarp,
    PictureLayout,
    PictureSource,
    RandomPerspective,
    Sample,
    build_train_transforms,
)
from detector.data.dataset import YOLODataset, long_side_shape
from detector.data.media import ImageRegion, read_image, read_size

SIZE = 64  # training size of the fake sources: pictures have a long side of 64


def textured_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like picture: smooth colour gradients, blurred noise and a few solid rectangles."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([120 + 100 * np.sin(3 * x + c) * np.cos(2 * y - c) for c in (0.0, 1.0, 2.0)], axis=2)
    noise = cv2.GaussianBlur(rng.normal(0, 40, (height, width, 3)), (0, 0), 2.0)
    image = np.clip(base + noise, 0, 255).astype(np.uint8)
    for _ in range(3):
        x1, y1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        image[y1 : y1 + height // 3, x1 : x1 + width // 3] = rng.integers(0, 256, 3)
    return image


class FakePictureSource:
    """A PictureSource of textured pictures (long side 64) with boxes; its unresized pixels are the picture at
    1.5x (``scale``) the size, so the fused path must map between two resolutions. Records which pictures are read.
    """

    def __init__(self, count: int = 7, seed: int = 0, scale: float = 1.5) -> None:
        rng = np.random.default_rng(seed)
        self.originals, self.samples = [], []
        for index in range(count):
            height, width = [(64, 48), (40, 64), (64, 64), (50, 64), (64, 30), (64, 57), (33, 64)][index % 7]
            original = textured_image(rng, round(height * scale), round(width * scale))
            corners = rng.uniform(0, 1, (3, 4)) * [width, height, width, height]
            boxes = np.concatenate(
                [np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])], 1
            )
            image = cv2.resize(original, (width, height), interpolation=cv2.INTER_LINEAR)
            self.originals.append(original)
            self.samples.append(Sample.create(image, boxes, rng.integers(0, 5, len(boxes))))
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.samples)

    def load_sample(self, index: int) -> Sample:
        return self.samples[index]

    def load_polygons(self, index: int) -> list[np.ndarray | None]:
        return [None] * len(self.samples[index].classes)

    def load_layout(self, index: int) -> PictureLayout:
        sample = self.samples[index]
        return PictureLayout(sample.image.shape[:2], sample.boxes_xyxy, sample.classes)

    def load_unresized(self, index: int, min_side: int, region=None) -> ImageRegion:
        self.read.append(index)
        original = self.originals[index]
        return ImageRegion(original, (0, 0), (original.shape[1], original.shape[0]))


def two_step(fused: MosaicWarp) -> Compose:
    """The unfused path: the same Mosaic and RandomPerspective, one after the other."""
    return Compose([fused.mosaic, fused.perspective])


def assert_same_output(fused: Sample, reference: Sample, *, max_mean_difference: float) -> None:
    assert fused.image.shape == reference.image.shape and fused.image.dtype == np.uint8
    np.testing.assert_array_equal(fused.classes, reference.classes)
    np.testing.assert_allclose(fused.boxes_xyxy, reference.boxes_xyxy, atol=1e-3, rtol=0)
    difference = np.abs(fused.image.astype(np.int16) - reference.image.astype(np.int16))
    assert difference.mean() <= max_mean_difference, difference.mean()


def test_fake_source_is_a_picture_source() -> None:
    assert isinstance(FakePictureSource(), PictureSource)


def test_fused_mosaic_matches_the_two_step_path() -> None:
    """Same draws: equal boxes and classes; pixels equal up to interpolation (one resampling instead of two).
    The sample's own picture comes at its stored size, the others unresized (1.5x): both mappings are checked."""
    source = FakePictureSource()
    perspective = RandomPerspective((SIZE, SIZE), translate=0.1, scale=0.5)
    fused = MosaicWarp(Mosaic(source, SIZE, probability=1.0), perspective)
    compared = 0
    for seed in range(16):
        sample = source.samples[seed % len(source)]
        out = fused(sample, np.random.default_rng(seed))
        reference = two_step(fused)(sample, np.random.default_rng(seed))
        assert_same_output(out, reference, max_mean_difference=4.0)
        compared += len(reference.classes)
    assert compared >= 30  # the box comparison is not vacuous


def test_fused_mosaic_is_close_on_smooth_pictures() -> None:
    """Away from texture the two resamplings agree to rounding: the mean difference is under 1.5 levels."""
    source = FakePictureSource(seed=3)
    for index, original in enumerate(source.originals):
        smooth = cv2.GaussianBlur(original, (0, 0), 3)
        source.originals[index] = smooth
        source.samples[index] = Sample(
            cv2.resize(smooth, source.samples[index].image.shape[1::-1]),
            source.samples[index].boxes_xyxy,
            source.samples[index].classes,
        )
    fused = MosaicWarp(Mosaic(source, SIZE, 1.0), RandomPerspective((SIZE, SIZE), translate=0.1, scale=0.5))
    for seed in range(8):
        out = fused(source.samples[seed % 7], np.random.default_rng(seed))
        assert_same_output(
            out, two_step(fused)(source.samples[seed % 7], np.random.default_rng(seed)), max_mean_difference=1.5
        )


def test_pictures_outside_the_output_are_not_read() -> None:
    """Over 30 draws some pictures land entirely outside the output (zoomed in, or the mosaic centre near an edge):
    they are never read, and the output still matches the two-step path."""
    source = FakePictureSource()
    perspective = RandomPerspective((SIZE, SIZE), translate=0.1, scale=0.5)
    fused = MosaicWarp(Mosaic(source, SIZE, probability=1.0), perspective)
    skipped = 0
    for seed in range(30):
        source.read.clear()
        extra = Mosaic(source, SIZE, 1.0).draw_images(np.random.default_rng(seed))
        out = fused.apply_to_index(source, 0, np.random.default_rng(seed))
        reference = two_step(fused)(source.samples[0], np.random.default_rng(seed))
        assert_same_output(out, reference, max_mean_difference=4.0)
        assert set(source.read) <= {0, *extra}
        skipped += 4 - len(source.read)
    assert skipped > 0


@pytest.mark.parametrize("hyp_changes", [{"degrees": 10.0}, {"shear": 2.0}, {"perspective": 0.0005}, {"mosaic9": 1.0}])
def test_rotations_and_nine_image_mosaics_take_the_two_step_path_exactly(hyp_changes: dict) -> None:
    source = FakePictureSource()
    hyp = Hyperparameters(**{"mosaic": 1.0, "translate": 0.1, "scale": 0.5, **hyp_changes})
    pipeline = build_train_transforms(hyp, SIZE, source)
    fused = pipeline.steps[0].steps[0]
    assert isinstance(fused, MosaicWarp)
    for seed in range(4):
        out = fused(source.samples[1], np.random.default_rng(seed))
        reference = two_step(fused)(source.samples[1], np.random.default_rng(seed))
        np.testing.assert_array_equal(out.image, reference.image)
        np.testing.assert_array_equal(out.boxes_xyxy, reference.boxes_xyxy)


def test_samples_without_a_mosaic_are_only_warped() -> None:
    source = FakePictureSource()
    fused = MosaicWarp(Mosaic(source, SIZE, 0.5), RandomPerspective((SIZE, SIZE), translate=0.1, scale=0.5))
    alone = 0
    for seed in range(8):
        if fused.mosaic.draw_images(np.random.default_rng(seed)) is not None:
            continue
        alone += 1
        out = fused(source.samples[3], np.random.default_rng(seed))
        reference = two_step(fused)(source.samples[3], np.random.default_rng(seed))
        assert out.image.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(out.image, reference.image)
        np.testing.assert_array_equal(out.boxes_xyxy, reference.boxes_xyxy)
    assert alone > 0


def test_pixels_that_do_not_fit_their_layout_fall_back_to_the_two_step_path() -> None:
    """A source whose pixels come out transposed (an orientation it predicted wrongly) gives the two-step result."""
    source = FakePictureSource()
    source.originals = [np.ascontiguousarray(original.transpose(1, 0, 2)) for original in source.originals]
    source.originals[2] = source.originals[2][:, :40]  # the square one: make its aspect wrong too
    fused = MosaicWarp(Mosaic(source, SIZE, 1.0), RandomPerspective((SIZE, SIZE), translate=0.1, scale=0.5))
    for seed in range(6):
        out = fused(source.samples[seed], np.random.default_rng(seed))
        reference = two_step(fused)(source.samples[seed], np.random.default_rng(seed))
        np.testing.assert_array_equal(out.image, reference.image)
        np.testing.assert_array_equal(out.boxes_xyxy, reference.boxes_xyxy)


def test_only_picture_sources_are_fused() -> None:
    hyp = Hyperparameters()
    names = lambda pipeline: [type(step).__name__ for step in pipeline.steps[0].steps]  # noqa: E731
    assert names(build_train_transforms(hyp, SIZE, FakePictureSource())) == ["MosaicWarp"]
    assert names(build_train_transforms(Hyperparameters(copy_paste=0.5), SIZE, FakePictureSource())) == [
        "Mosaic",
        "CopyPaste",
        "RandomPerspective",
    ]

    class PlainSource(FakePictureSource):  # a SampleSource that cannot read pictures lazily
        load_layout = None

    assert names(build_train_transforms(hyp, SIZE, PlainSource())) == ["Mosaic", "RandomPerspective"]
    with pytest.raises(TypeError, match="PictureSource"):
        MosaicWarp(Mosaic(PlainSource(), SIZE, 1.0), RandomPerspective((SIZE, SIZE)))


# --------------------------------------------------------------------------------------------------------------------
# ImageStore as a PictureSource, on real files


def write_photo(path: Path, width: int, height: int, rng: np.random.Generator, orientation: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(textured_image(rng, height, width)[..., ::-1])
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=92)


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    """JPEGs of odd sizes (one with an EXIF rotation, one 2.5x the training size), a PNG, with labels."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for name, (width, height), orientation in [
        ("a.jpg", (97, 61), 1),
        ("b.jpg", (161, 121), 6),  # stored 161x121, shown 121x161
        ("c.jpg", (250, 173), 1),
        ("d.png", (75, 99), 1),
    ]:
        write_photo(root / "images" / name, width, height, rng, orientation)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / Path(name).with_suffix(".txt").name).write_text("0 0.5 0.5 0.4 0.3\n2 0.2 0.7 0.1 0.2\n")
    return root


@pytest.mark.parametrize("cache", ["", "ram"])
def test_store_layout_is_load_sample_without_decoding(photos: Path, cache: str) -> None:
    dataset = YOLODataset(photos / "images", imgsz=64, augment=True, num_classes=3, cache=cache)
    store = dataset.store
    assert isinstance(store, PictureSource)
    for index in range(len(store)):
        layout, sample = store.load_layout(index), store.load_sample(index)
        assert layout.shape == sample.image.shape[:2]
        np.testing.assert_array_equal(layout.boxes_xyxy, sample.boxes_xyxy)
        np.testing.assert_array_equal(layout.classes, sample.classes)
        # Unresized pixels have the layout's aspect ratio, and a small min_side reads a JPEG at a reduced size.
        pixels = store.load_unresized(index, 64).pixels
        height, width = layout.shape
        assert abs(pixels.shape[1] * height - pixels.shape[0] * width) <= sum(pixels.shape[:2]) + height + width
        small = store.load_unresized(index, 20).pixels
        if not cache and store.im_files[index].endswith("c.jpg"):
            assert max(small.shape[:2]) < max(pixels.shape[:2]) and max(small.shape[:2]) >= 20


def test_read_size_matches_read_image(photos: Path) -> None:
    for path in sorted((photos / "images").iterdir()):
        with Image.open(path) as image:
            size = image.size[::-1] if path.name == "b.jpg" else image.size  # b.jpg is shown rotated
        for reduce in (1, 2, 4):
            decoded = read_image(path, reduce=reduce)
            assert read_size(path, size, reduce=reduce) == (decoded.shape[1], decoded.shape[0]), (path.name, reduce)


def test_long_side_shape_hand_computed() -> None:
    assert long_side_shape((61, 97), 64) == (40, 64)  # 61 * 64 / 97 = 40.2
    assert long_side_shape((173, 250), 640) == (443, 640)  # 442.88
    assert long_side_shape((64, 30), 64) == (64, 30)


@pytest.mark.parametrize("imgsz", [64, 48])
def test_training_items_match_the_two_step_path(photos: Path, imgsz: int) -> None:
    """Dataset items (which read their own image only if it is shown) against the unfused pipeline on the same
    seeds: labels equal within 1e-3 px, pixels within interpolation differences."""
    dataset = YOLODataset(photos / "images", imgsz=imgsz, augment=True, num_classes=3)
    fused = dataset.transforms.steps[0].steps[0]
    assert isinstance(fused, MosaicWarp)
    unfused = Compose([two_step(fused), *dataset.transforms.steps[1:]])
    for seed in range(10):
        image, labels, _, _ = dataset[(seed % 4, seed)]
        reference = unfused(dataset.store.load_sample(seed % 4), np.random.default_rng(seed))
        expected_image, expected_labels = dataset._to_tensors(reference)
        np.testing.assert_allclose(labels.numpy() * imgsz, expected_labels.numpy() * imgsz, atol=1e-3, rtol=0)
        # Typically 2 levels: these small photos carry noise at the pixel scale (where one resampling and two
        # differ most), shown at 1/2 to 1/8 of their size, some read at a reduced JPEG size, then HSV-jittered.
        difference = np.abs(image.numpy().astype(np.int16) - expected_image.numpy().astype(np.int16))
        assert difference.mean() <= 5.0, difference.mean()


def test_ram_cached_store_gives_the_same_items(photos: Path) -> None:
    plain = YOLODataset(photos / "images", imgsz=64, augment=True, num_classes=3)
    cached = YOLODataset(photos / "images", imgsz=64, augment=True, num_classes=3, cache="ram")
    for seed in range(6):
        first, second = plain[(seed % 4, seed)], cached[(seed % 4, seed)]
        np.testing.assert_allclose(first[1].numpy(), second[1].numpy(), atol=1e-5)
        assert np.abs(first[0].numpy().astype(int) - second[0].numpy().astype(int)).mean() <= 4.0


# --------------------------------------------------------------------------------------------------------------------
# Workers' malloc


# Run in a fresh interpreter: glibc raises its mmap threshold as a process frees large blocks, so a long-lived
# process (a pytest worker after many tests) may already keep its memory and would show no difference.
_MEASURE = """
import resource, numpy as np
from detector.utils.memory import keep_freed_memory

def item():  # the arrays of one 640 px item: picture, output, HSV copy and planes, flip, the CHW tensor returned
    picture, out = np.ones((480, 640, 3), np.uint8), np.ones((640, 640, 3), np.uint8)
    del picture
    hsv = out + 1
    planes = [np.ones((640, 640), np.uint8) for _ in range(3)]
    del hsv, planes
    flipped = out[:, ::-1].copy()
    del out, flipped
    return np.ones((3, 640, 640), np.uint8)

def faults_per_10_batches():
    for _ in range(2):  # warm up
        np.stack([item() for _ in range(4)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        np.stack([item() for _ in range(4)])
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults_per_10_batches() if keep_freed_memory() else -1)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_workers_malloc_keeps_freed_memory() -> None:
    """After keep_freed_memory() glibc reuses freed image-sized blocks, so items after the first fault no new pages
    in (the kernel's count of minor page faults shows it). Without it the count depends on glibc's dynamic mmap
    threshold (hundreds of faults per batch until the process has freed a block that large), so only the kept case
    is asserted. Measured in a fresh interpreter, so this process's malloc stays as it is."""
    result = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kept = int(result.stdout.split()[0])
    assert kept != -1, "mallopt unavailable"
    assert kept < 100, kept
