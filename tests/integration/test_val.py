"""val.py end to end on real COCO images with the official YOLOv5n weights, checked against pycocotools.

A subset of coco128 (images without crowd annotations, so that COCO's ground truth and the YOLO labels hold the
same boxes) keeps each run to a few seconds; the full acceptance run on all 128 images is marked slow.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_runs
import torch
from page_faults import faults_of_a_48mb_block

from detector.config import Hyperparameters, ValConfig
from detector.data.dataset_config import COCO80_TO_COCO91, load_dataset_config
from detector.data.loader import same_shape_batches
from detector.engine.coco_eval import evaluate_coco
from detector.engine.trainer import Trainer
from detector.engine.validator import Validator, create_val_dataloader, run_validation
from detector.models.loading import checkpoint_model_entries, load_model
from detector.models.loss import DetectionLoss
from detector.utils.checkpoint import load_checkpoint, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBSET_IDS = (9, 25, 30, 34, 36, 42, 49, 61)  # coco128 images without crowd annotations, 14 classes between them
COCO_LINE = re.compile(
    r"pycocotools mAP50 ([\d.]+) mAP50-95 ([\d.]+) \(detector's own matcher on the YOLO labels: "
    r"([\d.]+) ([\d.]+)\)"
)


@pytest.fixture(scope="module")
def subset_yaml(tmp_path_factory: pytest.TempPathFactory, coco128_dir: Path) -> Path:
    """A dataset YAML over 8 coco128 images (a .txt list), with coco128's COCO annotations."""
    root = tmp_path_factory.mktemp("coco128_subset")
    images = [coco128_dir / "images" / "train2017" / f"{i:012d}.jpg" for i in SUBSET_IDS]
    (root / "val.txt").write_text("".join(f"{p}\n" for p in images))
    names = load_dataset_config(coco128_dir / "coco128.yaml").names
    lines = [
        f"path: {root}",
        "train: val.txt",
        "val: val.txt",
        f"annotations: {coco128_dir / 'annotations' / 'instances_train2017.json'}",
        "names:",
    ]
    lines += [f"  {i}: {name}" for i, name in enumerate(names)]
    yaml_path = root / "subset.yaml"
    yaml_path.write_text("\n".join(lines) + "\n")
    return yaml_path


@pytest.fixture(scope="module")
def yolov5n_model(yolov5n_weights: Path) -> torch.nn.Module:
    return load_model(yolov5n_weights)


@pytest.fixture(scope="module")
def yolov5n_ours(tmp_path_factory: pytest.TempPathFactory, yolov5n_model: torch.nn.Module) -> Path:
    """The official weights re-saved as one of our checkpoints (loads in milliseconds with weights_only=True)."""
    path = tmp_path_factory.mktemp("weights") / "yolov5n.pt"
    save_checkpoint(checkpoint_model_entries(yolov5n_model), path)
    return path


def _run_val(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "val.py"), *flags], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600
    )


def test_val_py_save_json_agrees_with_pycocotools(
    tmp_path: Path, subset_yaml: Path, yolov5n_ours: Path, coco128_dir: Path
) -> None:
    result = _run_val(
        "--weights",
        str(yolov5n_ours),
        "--data",
        str(subset_yaml),
        "--img",
        "320",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--save-json",
        "--save-txt",
        "--save-conf",
        "--project",
        str(tmp_path),
        "--name",
        "v",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "v"
    for name in (
        "val.log",
        "confusion_matrix.png",
        "PR_curve.png",
        "F1_curve.png",
        "P_curve.png",
        "R_curve.png",
        "val_batch0_labels.jpg",
        "val_batch0_pred.jpg",
        "yolov5n_predictions.json",
    ):
        assert (run / name).is_file(), name
    coco_map50, coco_map, our_map50, our_map = (float(v) for v in COCO_LINE.search(result.stdout).groups())

    # pycocotools run here, independently, on the JSON val.py wrote, against COCO's own annotations.
    detections = json.loads((run / "yolov5n_predictions.json").read_text())
    reference = evaluate_coco(coco128_dir / "annotations" / "instances_train2017.json", detections, list(SUBSET_IDS))
    assert (coco_map50, coco_map) == pytest.approx((reference.map50, reference.map), abs=5e-4)
    assert reference.map50 > 0.5  # real detections, mapped to COCO's image and category ids
    assert {d["image_id"] for d in detections} <= set(SUBSET_IDS)
    assert {d["category_id"] for d in detections} <= set(COCO80_TO_COCO91)
    # Our matcher on the YOLO labels gives pycocotools' figures for the same detections (no crowds here).
    assert (our_map50, our_map) == pytest.approx((coco_map50, coco_map), abs=0.002)

    # --save-txt --save-conf holds the same detections as the JSON: count and confidences per image.
    for image_id in SUBSET_IDS:
        rows = np.loadtxt(run / "labels" / f"{image_id:012d}.txt", ndmin=2)
        scores = sorted(d["score"] for d in detections if d["image_id"] == image_id)
        assert sorted(rows[:, 5].tolist()) == pytest.approx(scores, abs=1e-5)


def test_val_loader_shapes_do_not_depend_on_batch_size(subset_yaml: Path) -> None:
    """YOLOv5's rule by hand at 320 for one shape group (the 8 images are fewer than RECT_SHAPE_GROUP = 16):
    sorted by height / width (ids 34, 25, 30, 42 landscape 0.664-0.747, then 9, 61, 49, 36), the group mixes
    orientations, so every image is letterboxed to ceil(10 + 0.5) * 32 = 352 square. In YOLOv5 the group is the
    batch: at batch 4 the first four would get ceil(0.7469 * 10 + 0.5) * 32 = 256 x 352 instead."""
    data = load_dataset_config(subset_yaml)
    for batch_size, expected_sizes in ((4, [4, 4]), (3, [3, 3, 2]), (32, [8])):
        loader, _ = create_val_dataloader(data, imgsz=320, batch_size=batch_size, workers=0)
        batches = [(tuple(images.shape[1:]), [int(Path(p).stem) for p in paths]) for images, _, paths, _ in loader]
        assert [len(ids) for _, ids in batches] == expected_sizes
        assert {shape for shape, _ in batches} == {(3, 352, 352)}
        assert [i for _, ids in batches for i in ids] == [34, 25, 30, 42, 9, 61, 49, 36]


def test_same_shape_batches_split_at_shape_changes() -> None:
    group_index = np.array([0, 0, 0, 1, 1, 2, 2, 2])  # groups 0 and 1 share a shape, group 2 differs
    group_shapes = np.array([[256, 320], [256, 320], [320, 320]])
    assert same_shape_batches(group_index, group_shapes, 4, 8) == [[0, 1, 2, 3], [4], [5, 6, 7]]
    assert same_shape_batches(group_index, group_shapes, 2, 8) == [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert same_shape_batches(np.zeros(5, np.int64), np.zeros((0, 2)), 2, 5) == [[0, 1], [2, 3], [4]]


def test_training_with_val_imgsz_validates_as_val_py_at_that_size(
    tmp_path: Path, subset_yaml: Path, yolov5n_ours: Path
) -> None:
    """--imgsz 160 --val-imgsz 320: training batches at 160, validation batches as val.py's at 320, and the run's
    final figures are val.py's on best.pt at 320, not at 160."""
    dataset = {"data": str(subset_yaml), "cfg": ""}  # the architecture comes with --weights
    config = tiny_runs.tiny_config(dataset, tmp_path, weights=str(yolov5n_ours), imgsz=160, val_imgsz=320, epochs=1)
    trainer = Trainer(config)
    data = load_dataset_config(subset_yaml)
    shapes = {
        size: next(iter(create_val_dataloader(data, imgsz=size, batch_size=16, workers=0)[0]))[0].shape[-2:]
        for size in (160, 320)
    }
    assert next(iter(trainer.val_loader))[0].shape[-2:] == shapes[320] != shapes[160]
    assert next(iter(trainer.train_loader))[0].shape[-2:] == (160, 160)
    metrics = trainer.fit()
    best = trainer.save_dir / "weights" / "best.pt"
    common = {"weights": str(best), "data": str(subset_yaml), "batch_size": 4, "workers": 0, "project": str(tmp_path)}
    at_320, at_160 = (run_validation(ValConfig(imgsz=size, name=f"v{size}", **common)) for size in (320, 160))
    figures = {size: [m.precision, m.recall, m.map50, m.map] for size, m in ((320, at_320), (160, at_160))}
    assert [metrics.precision, metrics.recall, metrics.map50, metrics.map] == pytest.approx(figures[320], abs=1e-3)
    assert figures[320] != pytest.approx(figures[160], abs=1e-2) and at_320.map > 0.2
    assert load_checkpoint(best)["train_config"]["val_imgsz"] == 320  # --resume keeps it


def test_trainer_path_gives_val_py_figures_and_losses(
    tmp_path: Path, subset_yaml: Path, yolov5n_model: torch.nn.Module, yolov5n_ours: Path
) -> None:
    """Validator.run on an in-memory model (what the trainer does each epoch) gives val.py's figures on the saved
    weights, even at another batch size (the padding does not depend on it, unlike YOLOv5's)."""
    data = load_dataset_config(subset_yaml)
    loader, _ = create_val_dataloader(data, imgsz=320, batch_size=3, workers=0)
    loss_fn = DetectionLoss(yolov5n_model, Hyperparameters())
    config = ValConfig(imgsz=320, batch_size=3, save_hybrid=True, save_conf=True)
    yolov5n_model.train()
    validator = Validator(config, data.names, tmp_path / "hybrid", training=True, progress=False)
    in_memory = validator.run(yolov5n_model, loader, loss_fn)
    assert yolov5n_model.training  # the trainer's mode is given back

    # --save-hybrid: every label is in its file with confidence 1, beside predictions; the metrics ignore it.
    for image_file, labels in zip(loader.dataset.im_files, loader.dataset.labels, strict=True):
        rows = np.loadtxt(tmp_path / "hybrid" / "labels" / f"{Path(image_file).stem}.txt", ndmin=2)
        from_labels = rows[rows[:, 5] == 1.0, :5]
        expected = labels.astype(float)
        np.testing.assert_allclose(from_labels[np.lexsort(from_labels.T)], expected[np.lexsort(expected.T)], atol=1e-5)
        assert len(rows) > len(labels)

    standalone = run_validation(
        ValConfig(
            weights=str(yolov5n_ours),
            data=str(subset_yaml),
            imgsz=320,
            batch_size=4,
            workers=0,
            project=str(tmp_path),
            name="v",
        )
    )
    # val.py fuses Conv+BN: the same figures up to float rounding.
    assert in_memory.map == pytest.approx(standalone.map, abs=1e-3)
    assert in_memory.map50 == pytest.approx(standalone.map50, abs=1e-3)
    assert in_memory.map > 0.3

    # The losses come from the same pass as the predictions: recompute them batch by batch.
    yolov5n_model.eval()
    items = []
    with torch.no_grad():
        for images, targets, _, _ in loader:
            terms = loss_fn(yolov5n_model.forward_raw(images.float() / 255), targets)
            items.append(torch.stack([terms[k] for k in ("box", "obj", "cls")]))
    expected = torch.stack(items).mean(0).tolist()
    assert [in_memory.loss[k] for k in ("box", "obj", "cls")] == pytest.approx(expected, rel=1e-4)


def test_study_and_speed_tasks(tmp_path: Path, subset_yaml: Path, yolov5n_ours: Path) -> None:
    common = dict(weights=str(yolov5n_ours), data=str(subset_yaml), batch_size=4, workers=0, project=str(tmp_path))
    run_validation(ValConfig(task="study", imgsz=320, name="study", **common))
    rows = (tmp_path / "study" / "study.csv").read_text().splitlines()
    assert rows[0].startswith("imgsz,precision,recall,mAP50,mAP50-95")
    assert [int(r.split(",")[0]) for r in rows[1:]] == [256, 320]
    assert (tmp_path / "study" / "study.png").is_file()
    speed = run_validation(ValConfig(task="speed", imgsz=320, name="speed", **common))
    assert speed.speed.inference > 0 and not list((tmp_path / "speed").glob("*.json"))
    assert not (tmp_path / "speed" / "confusion_matrix.png").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--weights", "missing.pt"], "missing.pt: weights not found"),
        (["--weights", "x.pt", "--conf-thres", "1.5"], "--conf-thres must be between 0 and 1, got 1.5"),
        (["--weights", "x.pt", "--img", "-5"], "--imgsz: expected a positive number, got -5"),
        (["--weights", "x.pt", "--batch-size", "0"], "--batch-size: expected a positive number of images, got 0"),
        (["--weights", "x.pt", "--workers", "-2"], "--workers: expected 0 or more, got -2"),
    ],
)
def test_bad_input_is_one_line_error(flags: list[str], message: str) -> None:
    result = _run_val(*flags)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


@pytest.mark.slow
def test_acceptance_coco128_official_weights(tmp_path: Path, coco128_dir: Path, yolov5n_weights: Path) -> None:
    """The README's acceptance command on all 128 images at 640, with the official YOLOv5 checkpoint.

    REFERENCE.md's figures are YOLOv5's val.py at --batch-size 16, where its rectangular shape groups are the
    batches: its own metric there is exactly REFERENCE.md's P 0.586, R 0.508, mAP50 0.568, mAP50-95 0.365, and
    pycocotools scores its predictions 0.576 / 0.370. Our shape groups are 16 images whatever the batch size, so the
    default batch size 32 gives those figures too (YOLOv5 at 32: pycocotools 0.567 / 0.365).
    """
    result = _run_val(
        "--weights",
        str(yolov5n_weights),
        "--data",
        str(coco128_dir / "coco128.yaml"),
        "--img",
        "640",
        "--save-json",
        "--project",
        str(tmp_path),
        "--name",
        "v",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    coco_map50, coco_map, our_map50, our_map = (float(v) for v in COCO_LINE.search(result.stdout).groups())
    # pycocotools on YOLOv5's predictions (REFERENCE.md): 0.576 / 0.370. Ours measured 0.575 / 0.370.
    assert (coco_map50, coco_map) == pytest.approx((0.576, 0.370), abs=0.003)
    assert (our_map50, our_map) == pytest.approx((coco_map50, coco_map), abs=0.001)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.fresh_process  # the malloc policy is the process's (tests/conftest.py)
def test_val_py_keeps_the_memory_it_frees(tmp_path: Path, subset_yaml: Path, yolov5n_ours: Path) -> None:
    """val.py's batches reuse the memory the last forward freed (a 48 MB block: refaulted every time before)."""
    default = faults_of_a_48mb_block()
    run_validation(
        ValConfig(weights=str(yolov5n_ours), data=str(subset_yaml), imgsz=160, workers=0, project=str(tmp_path))
    )
    kept = faults_of_a_48mb_block()
    assert default > 5 * 12_000 * 0.9, default  # 48 MB = 12,288 pages, every time
    assert kept < 12_288 + 500, kept  # reused: at most once more (where the heap had to move), not 5 times
