"""detector.data.builtin: deterministic synthetic shapes dataset, labels that match the drawn pixels, atomic caching."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from detector.data import builtin
from detector.data.builtin import (
    BUILTIN_CLASSES,
    MIN_VISIBLE_FRACTION,
    builtin_dataset_dir,
    ensure_builtin_dataset,
    paint,
    render_image,
    shape_mask,
    texture,
)
from detector.data.dataset_config import load_dataset_config
from detector.errors import DataError


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def read_labels(path: Path) -> np.ndarray:
    return np.loadtxt(path, ndmin=2).reshape(-1, 5)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 train + 3 val images, generated once for the tests below."""
    return ensure_builtin_dataset(tmp_path_factory.mktemp("builtin") / "ds", num_train=6, num_val=3, progress=False)


def test_classes_are_distinct() -> None:
    assert len(BUILTIN_CLASSES) >= 6 and len(set(BUILTIN_CLASSES)) == len(BUILTIN_CLASSES)


def test_same_seed_gives_byte_identical_files(small_dataset: Path, tmp_path: Path) -> None:
    again = ensure_builtin_dataset(tmp_path / "again", num_train=6, num_val=3, progress=False)
    first, second = tree_digest(small_dataset.parent), tree_digest(again.parent)
    assert len(first) == 6 * 2 + 3 * 2 + 2  # images + labels + shapes.yaml + COCO JSON
    assert first == second
    other_seed = ensure_builtin_dataset(tmp_path / "other", num_train=1, num_val=1, seed=1, progress=False)
    assert tree_digest(other_seed.parent)["images/train/000000.jpg"] != first["images/train/000000.jpg"]


def test_thread_count_does_not_change_the_output(tmp_path: Path) -> None:
    one = builtin.generate_builtin_dataset(tmp_path / "one", num_train=3, num_val=1, progress=False, workers=1)
    two = builtin.generate_builtin_dataset(tmp_path / "two", num_train=3, num_val=1, progress=False, workers=3)
    assert tree_digest(one.parent) == tree_digest(two.parent)


def test_yaml_loads_as_a_dataset(small_dataset: Path) -> None:
    config = load_dataset_config(small_dataset)
    assert config.names == BUILTIN_CLASSES and not config.is_coco
    assert config.train == (small_dataset.parent.resolve() / "images" / "train",)
    assert len(list(config.val[0].glob("*.jpg"))) == 3
    assert config.coco_annotations is not None and config.coco_annotations.is_file()


def test_labels_are_valid_yolo_rows(small_dataset: Path) -> None:
    root = small_dataset.parent
    total = 0
    for image_file in sorted((root / "images").rglob("*.jpg")):
        image = cv2.imread(str(image_file))
        height, width = image.shape[:2]
        assert 240 <= height <= 480 and 240 <= width <= 480
        labels = read_labels(root / "labels" / image_file.parent.name / f"{image_file.stem}.txt")
        total += len(labels)
        classes, xc, yc, w, h = labels.T
        assert np.all(classes == classes.round()) and np.all((classes >= 0) & (classes < len(BUILTIN_CLASSES)))
        assert np.all((w > 0) & (h > 0))
        assert np.all(xc - w / 2 >= -1e-6) and np.all(xc + w / 2 <= 1 + 1e-6)
        assert np.all(yc - h / 2 >= -1e-6) and np.all(yc + h / 2 <= 1 + 1e-6)
        assert np.all(np.maximum(w * width, h * height) >= builtin.MIN_OBJECT_SIZE - 1)
    assert total >= 9  # at least one object per image


def test_coco_json_agrees_with_the_yolo_labels(small_dataset: Path) -> None:
    """pycocotools reads the val JSON; its boxes must equal the YOLO labels converted to pixels."""
    root = small_dataset.parent
    coco = COCO(str(root / "annotations" / "instances_val.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(BUILTIN_CLASSES)
    for image_info in coco.loadImgs(coco.getImgIds()):
        assert int(Path(image_info["file_name"]).stem) == image_info["id"]  # numeric stems are the image ids
        width, height = image_info["width"], image_info["height"]
        labels = read_labels(root / "labels" / "val" / image_info["file_name"].replace(".jpg", ".txt"))
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"]))
        boxes = np.asarray([a["bbox"] for a in annotations]).reshape(-1, 4)
        expected = np.stack(
            [(labels[:, 1] - labels[:, 3] / 2) * width, (labels[:, 2] - labels[:, 4] / 2) * height,
             labels[:, 3] * width, labels[:, 4] * height], 1
        )  # fmt: skip
        np.testing.assert_allclose(boxes, expected, atol=0.01)
        assert [a["category_id"] for a in annotations] == labels[:, 0].astype(int).tolist()


@pytest.mark.parametrize("class_id", range(len(BUILTIN_CLASSES)))
def test_box_equals_the_drawn_pixels(class_id: int) -> None:
    """One object alone on a flat background: its box is exactly the bounding box of the changed pixels."""
    rng = np.random.default_rng(class_id)
    for size in (10, 37, 120):
        mask = shape_mask(class_id, size, rng)
        h, w = mask.shape
        assert max(h, w) in (size - 1, size, size + 1)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()  # tight
        canvas = np.full((200, 200, 3), 128, np.uint8)
        x, y = 30, 40
        paint(canvas, mask, x, y, texture(rng, h, w, np.array([250.0, 20, 20]), np.array([20.0, 250, 20])))
        ys, xs = np.nonzero((canvas != 128).any(2))
        drawn = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert np.abs(np.subtract(drawn, (x, y, x + w, y + h))).max() <= 1, (BUILTIN_CLASSES[class_id], size)


def test_ring_has_a_hole_and_star_is_not_convex() -> None:
    """Shapes differ by outline, the only cue the generator leaves: check two defining properties."""
    rng = np.random.default_rng(0)
    ring = shape_mask(BUILTIN_CLASSES.index("ring"), 80, rng)
    assert not ring[ring.shape[0] // 2, ring.shape[1] // 2]
    star = shape_mask(BUILTIN_CLASSES.index("star"), 80, rng)
    hull = cv2.convexHull(np.argwhere(star)[:, ::-1].astype(np.int32))
    assert star.sum() < 0.8 * cv2.contourArea(hull)
    ellipse = shape_mask(BUILTIN_CLASSES.index("ellipse"), 80, rng)
    hull = cv2.convexHull(np.argwhere(ellipse)[:, ::-1].astype(np.int32))
    assert ellipse.sum() > 0.95 * cv2.contourArea(hull)


def test_rendered_objects_are_at_most_70_percent_hidden() -> None:
    """The placement rule: a new object may not leave an earlier one less than 30 % visible."""
    owner = np.full((20, 20), -1, np.int32)
    owner[:10, :10] = 0  # an earlier object of area 100 in the top-left corner
    full_cover = np.ones((20, 20), bool)
    assert builtin._place(full_cover, owner, [100], np.random.default_rng(0)) is None
    small = np.ones((5, 5), bool)  # hides at most 25 % of the earlier object wherever it goes
    assert builtin._place(small, owner, [100], np.random.default_rng(0)) is not None
    assert MIN_VISIBLE_FRACTION == 0.3


def test_render_image_is_a_real_detection_problem() -> None:
    """Across images: several objects per image, every class, sizes from ~10 px to about half the image."""
    sizes, classes, counts = [], [], []
    for index in range(12):
        rng = np.random.default_rng((0, 0, index))
        image, boxes, image_classes, areas = render_image(rng, 320, 400)
        assert image.shape == (320, 400, 3) and image.dtype == np.uint8
        assert boxes.dtype == np.float32 and image_classes.dtype == np.int64 and len(areas) == len(boxes)
        assert np.all(areas <= (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        sizes += np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).tolist()
        classes += image_classes.tolist()
        counts.append(len(boxes))
    assert np.mean(counts) >= 3
    assert set(classes) == set(range(len(BUILTIN_CLASSES)))
    assert min(sizes) < 20 and max(sizes) > 100


def test_interrupted_generation_leaves_nothing_that_looks_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(out_dir: Path, **kwargs: object) -> Path:
        (Path(out_dir) / "images").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "generate_builtin_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_builtin_dataset(tmp_path / "ds", num_train=2, num_val=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the dataset folder nor the partial one remains
    monkeypatch.undo()
    yaml_path = ensure_builtin_dataset(tmp_path / "ds", num_train=2, num_val=1, progress=False)
    assert yaml_path.is_file()


def test_finished_dataset_is_reused_and_a_foreign_folder_refused(
    small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builtin, "generate_builtin_dataset", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_builtin_dataset(small_dataset.parent, num_train=6, num_val=3) == small_dataset
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match=r"mine: exists but holds no shapes\.yaml"):
        ensure_builtin_dataset(tmp_path / "mine")


def test_empty_spec_means_the_builtin_dataset_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_CACHE", str(tmp_path))
    small = builtin.ensure_builtin_dataset
    monkeypatch.setattr(builtin, "ensure_builtin_dataset", lambda: small(num_train=2, num_val=1, progress=False))
    config = load_dataset_config("")
    assert config.yaml_path == (tmp_path / "datasets" / "shapes-v1-n2-1-seed0" / "shapes.yaml").resolve()
    assert load_dataset_config("builtin").names == BUILTIN_CLASSES
    assert builtin_dataset_dir() == tmp_path / "datasets" / builtin.BUILTIN_VERSION
