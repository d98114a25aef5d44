"""Pseudo-labels (--unlabeled): the per-target loss weights against the unweighted loss and hand-combined terms, the
marks and their undoing, the pseudo-label file, labelling with a real model against YOLOv5's own detections, and the
sampler and dataset machinery that keeps unlabelled images out until they are labelled."""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch
import torchvision
from tiny_models import strided_convs_yaml

from detector.config import Hyperparameters, TrainConfig, check_train_config, load_hyp
from detector.data.augment import Mosaic
from detector.data.builtin import ensure_builtin_dataset
from detector.data.dataset import YOLODataset
from detector.data.loader import DetectionSampler
from detector.data.media import read_image
from detector.engine.pseudo import PseudoLabels, predict_labels, read_pseudo_labels, unmark_pseudo_targets
from detector.errors import ConfigError
from detector.models.loading import load_model
from detector.models.loss import DetectionLoss, assign_targets
from detector.models.yolo import DetectionModel
from detector.ops.boxes import xywh2xyxy

NC = 3
IMGSZ = 64


@pytest.fixture(scope="module")
def model() -> DetectionModel:
    return DetectionModel(strided_convs_yaml(nc=NC))  # Detect on strides 8/16/32, YOLOv5's P5 anchors


def raw_maps(model: DetectionModel, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    head = model.detect
    return [
        torch.randn(batch, head.na, IMGSZ // int(s), IMGSZ // int(s), 5 + NC, generator=generator) for s in head.stride
    ]


# Two 0.2 x 0.2 boxes (12.8 px): only the stride-8 level takes them (1.6 cells; the coarser levels' anchors are more
# than 4x larger). Both centres sit 0.3 into their cell, so each gets the same 9 assignments (3 anchors x its cell,
# the left and the upper neighbour), and they share no cell.
FIRST = [0.0, 1.0, 2.3 / 8, 2.3 / 8, 0.2, 0.2]
SECOND = [0.0, 2.0, 5.3 / 8, 5.3 / 8, 0.2, 0.2]
MANY = torch.tensor(
    [FIRST, SECOND, [1.0, 0.0, 0.5, 0.5, 0.6, 0.4], [1.0, 1.0, 0.1, 0.8, 0.1, 0.15], [0.0, 2.0, 0.5, 0.5, 0.9, 0.9]]
)


@pytest.mark.parametrize(
    "hyp, options",
    [
        (Hyperparameters(), {}),
        (Hyperparameters(fl_gamma=1.5, cls_pw=2.0), {"label_smoothing": 0.1}),
        (Hyperparameters(), {"class_weights": torch.tensor([1.0, 2.0, 5.0])}),
    ],
    ids=["plain", "focal-smoothing", "class-weights"],
)
def test_weights_all_one_give_exactly_the_unweighted_loss(model, hyp, options):
    loss_fn = DetectionLoss(model, hyp, **options)
    maps = raw_maps(model)
    plain = loss_fn(maps, MANY)
    weighted = loss_fn(maps, MANY, torch.ones(len(MANY)))
    for name in ("box", "obj", "cls"):
        assert torch.equal(plain[name], weighted[name]), name


def test_box_and_class_terms_are_weighted_means_of_the_targets(model):
    """Each target's own terms (the unweighted loss with that target alone), combined by hand: with the same number
    of assignments per target, the weighted mean is (L1 + w L2) / (1 + w); weight 0 is the loss without the box."""
    loss_fn = DetectionLoss(model, Hyperparameters())
    maps = raw_maps(model)
    both = torch.tensor([FIRST, SECOND])
    counts = [len(assign_targets(both[i : i + 1], model.detect.anchors[0], (8, 8)).image) for i in (0, 1)]
    assert counts == [9, 9]
    alone = [loss_fn(maps, both[i : i + 1]) for i in (0, 1)]
    for weight in (0.0, 0.3, 1.0):
        terms = loss_fn(maps, both, torch.tensor([1.0, weight]))
        for name in ("box", "cls"):
            expected = (alone[0][name] + weight * alone[1][name]) / (1 + weight)
            assert terms[name].item() == pytest.approx(expected.item(), rel=1e-6), (name, weight)


def test_objectness_of_a_zero_weight_box_cells_is_left_out(model):
    """Weight 0: the cells the box is assigned to count neither as object nor as background, so their objectness
    logits no longer change the objectness term; with weight 1 they do."""
    loss_fn = DetectionLoss(model, Hyperparameters())
    both = torch.tensor([FIRST, SECOND])
    level = assign_targets(both[1:], model.detect.anchors[0], (8, 8))
    maps = raw_maps(model)
    moved = [m.clone() for m in maps]
    moved[0][level.image, level.anchor, level.grid_y, level.grid_x, 4] += 3.0
    for weight, changes in ((0.0, False), (1.0, True)):
        weights = torch.tensor([1.0, weight])
        before, after = loss_fn(maps, both, weights)["obj"], loss_fn(moved, both, weights)["obj"]
        assert (before.item() != pytest.approx(after.item(), rel=1e-6)) == changes


def test_weights_must_be_one_per_target(model):
    with pytest.raises(ValueError, match="one per target"):
        DetectionLoss(model, Hyperparameters())(raw_maps(model), MANY, torch.ones(2))


def test_unmarking_restores_classes_and_weighs_the_pseudo_rows():
    marked = torch.tensor(
        [[0.0, 2.0, 0.5, 0.5, 0.1, 0.1], [0.0, 3.0 + 1, 0.2, 0.2, 0.1, 0.1], [1.0, 3.0, 0.3, 0.3, 0.1, 0.1]]
    )
    targets, weights = unmark_pseudo_targets(marked, num_classes=3, weight=0.25)
    assert targets[:, 1].tolist() == [2.0, 1.0, 0.0]
    assert torch.equal(targets[:, [0, 2, 3, 4, 5]], marked[:, [0, 2, 3, 4, 5]])
    assert weights.tolist() == [1.0, 0.25, 0.25]
    assert marked[1, 1] == 4.0  # the batch's own tensor is left as it was


def test_pseudo_label_file_round_trip(tmp_path):
    labels = PseudoLabels(
        generation=3,
        epoch=10,
        source="EMA model of epoch 9",
        files=("/a/1.jpg", "/a/2.jpg", "/b/3.jpg"),
        labels=(np.array([[1, 0.5, 0.5, 0.2, 0.2]], np.float32), np.zeros((0, 5), np.float32), np.ones((2, 5))),
        confidences=(np.array([0.9], np.float32), np.zeros(0, np.float32), np.array([0.6, 0.7], np.float32)),
    )
    labels.save(tmp_path / "p.npz")
    loaded = PseudoLabels.load(tmp_path / "p.npz")
    assert (loaded.generation, loaded.epoch, loaded.source, loaded.files) == (3, 10, labels.source, labels.files)
    for ours, theirs in zip(loaded.labels + loaded.confidences, labels.labels + labels.confidences, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert loaded.num_boxes == 3
    generation, by_file = read_pseudo_labels(tmp_path / "p.npz")
    assert generation == 3 and by_file["/b/3.jpg"].shape == (2, 5)


def test_a_release_model_labels_bus_as_yolov5_detect_does(yolov5n_weights, shared_images, reference_detections):
    """yolov5n.pt as a teacher on bus.jpg at 640, conf 0.5: the boxes YOLOv5's detect.py found (conf 0.25) above
    0.55 are all there, and every box kept is one of detect.py's (same class, IoU > 0.9). Padding differs (square
    here, minimal there), so confidences near the threshold may fall either side."""
    teacher = load_model(yolov5n_weights)
    image = read_image(shared_images / "bus.jpg")
    [(rows, confidences)] = predict_labels(teacher, [image], size=640, conf_thres=0.5)
    assert (confidences > 0.5).all() and rows.shape[1] == 5
    reference = np.loadtxt(reference_detections / "bus.txt", ndmin=2)
    ours_xyxy, ref_xyxy = xywh2xyxy(torch.from_numpy(rows[:, 1:])), xywh2xyxy(torch.from_numpy(reference[:, 1:5]))
    iou = torchvision.ops.box_iou(ours_xyxy.double(), ref_xyxy)
    same_class = torch.from_numpy(rows[:, :1]).double() == torch.from_numpy(reference[:, 0]).unsqueeze(0)
    matches = (iou > 0.9) & same_class
    assert matches.any(dim=1).all()  # every pseudo-label is one of detect.py's boxes
    assert matches[:, torch.from_numpy(reference[:, 5] > 0.55)].any(dim=0).all()  # and the confident ones are kept
    assert (rows[:, 0] == 0).sum() >= 3  # the persons


def test_sampler_holds_back_undrawable_images_and_items_carry_the_generation():
    sampler = DetectionSampler(10, seed=1)
    drawable = np.arange(10) < 3
    sampler.set_drawable(drawable)
    items = list(sampler)
    assert len(items) == 10 and len(sampler) == 10  # the epoch keeps its length
    indices = [index for index, _ in items]
    assert set(indices) == {0, 1, 2} and sorted(map(indices.count, range(3))) == [3, 3, 4]
    assert sorted(indices[:3]) == [0, 1, 2] and sorted(indices[3:6]) == [0, 1, 2]  # whole passes, fresh orders
    sampler.set_drawable(None)
    sampler.set_generation(2)
    items = list(sampler)
    assert sorted(index for index, *_ in items) == list(range(10))
    assert {(len(item), item[2], item[3]) for item in items} == {(4, False, 2)}
    sampler.set_closed(True)
    assert {item[2:] for item in sampler} == {(True, 2)}


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> dict:
    """The built-in dataset's 8 train images: a .txt list of 4 labelled ones and one of the 4 others, whose label
    files exist but must never be read."""
    root = tmp_path_factory.mktemp("pseudo")
    data = ensure_builtin_dataset(root / "data", num_train=8, num_val=1, progress=False)
    images = sorted((data.parent / "images" / "train").glob("*.jpg"))
    (root / "labelled.txt").write_text("".join(f"{p}\n" for p in images[:4]))
    (root / "unlabeled.txt").write_text("".join(f"{p}\n" for p in images[4:]))
    return {"root": root, "labelled": root / "labelled.txt", "unlabeled": root / "unlabeled.txt", "images": images}


def test_unlabelled_images_join_the_dataset_marked_and_reach_a_worker_copy_by_generation(split, tmp_path):
    hyp = dataclasses.replace(load_hyp("hyp.no-augmentation.yaml"), mosaic=1.0)
    dataset = YOLODataset(
        split["labelled"], imgsz=IMGSZ, augment=True, hyp=hyp, num_classes=8, unlabeled=split["unlabeled"], workers=1
    )
    assert dataset.im_files == [str(p) for p in split["images"]]
    assert dataset.unlabeled.tolist() == [False] * 4 + [True] * 4
    assert all(len(labels) == 0 for labels in dataset.labels[4:])  # their label files are not read
    geometry = [getattr(step, "mosaic", step) for step in dataset.transforms.steps[0].steps]  # MosaicWarp's Mosaic
    mosaic = next(step for step in geometry if isinstance(step, Mosaic))
    assert mosaic.source is dataset.donors and len(dataset.donors) == 4  # no unlabelled tiles before labelling
    worker_copy = copy.deepcopy(dataset)  # a persistent worker's copy, made before the labelling

    rows = {dataset.im_files[5]: np.array([[2, 0.5, 0.5, 0.4, 0.4], [7, 0.3, 0.6, 0.2, 0.3]], np.float32)}
    PseudoLabels(1, 1, "test", tuple(rows), tuple(rows.values()), (np.ones(2, np.float32),)).save(tmp_path / "p.npz")
    dataset.set_pseudo_labels(1, rows)
    assert dataset.store.load_sample(5).classes.tolist() == [10, 15]  # class + nc: the mark
    assert len(dataset.donors) == 8
    np.testing.assert_array_equal(dataset.labels[5], rows[dataset.im_files[5]])  # the real classes

    worker_copy.pseudo_source = functools.partial(read_pseudo_labels, tmp_path / "p.npz")
    labels = worker_copy[(5, 123, False, 1)][1]  # mosaic with labelled tiles: class >= 8 are image 5's own rows
    assert worker_copy.pseudo_generation == 1 and len(worker_copy.donors) == 8
    assert set(labels[labels[:, 1] >= 8, 1].tolist()) <= {10.0, 15.0}
    assert torch.equal(worker_copy[(5, 7, True, 1)][1][:, 1].sort().values, torch.tensor([10.0, 15.0]))  # no mosaic
    assert torch.equal(worker_copy[(5, 7, True)][1], worker_copy[(5, 7, True, 1)][1])  # no generation: the held one


@pytest.mark.parametrize(
    "options, message",
    [
        ({"teacher": "t.pt"}, "--teacher labels the --unlabeled images"),
        (
            {"unlabeled": "imgs", "pseudo_every": 0},
            "--pseudo-every 0 labels .* once at the start, which needs --teacher",
        ),
        ({"unlabeled": "imgs", "pseudo_conf": 1.5}, "--pseudo-conf in \\[0, 1\\]"),
        ({"unlabeled": "imgs", "pseudo_weight": -1.0}, "--pseudo-weight 0 or more"),
        ({"unlabeled": "imgs", "teacher": "/no/such.pt"}, "--teacher /no/such.pt: weights file not found"),
        ({"unlabeled": "imgs", "rect": True}, "--unlabeled cannot be combined with --rect"),
        ({"unlabeled": "imgs", "image_weights": True}, "--unlabeled cannot be combined with --image-weights"),
        ({"unlabeled": "imgs", "class_balanced": 0.1}, "--unlabeled cannot be combined with --class-balanced"),
    ],
)
def test_refused_pseudo_label_options_name_the_flag(options, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(TrainConfig(**options))
