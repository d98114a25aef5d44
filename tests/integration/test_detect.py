"""detect.py and the Python API end to end: YOLOv5n on the real images against YOLOv5's own output, videos,
mixed image formats, label files against the drawn boxes, and bad sources through the real script."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny_models import strided_convs_yaml
from torchvision.ops import box_iou

from detector.config import DetectConfig
from detector.engine.predictor import Detector, run_detect
from detector.errors import ConfigError
from detector.models.loading import checkpoint_model_entries, load_model
from detector.models.yolo import DetectionModel
from detector.utils.checkpoint import save_checkpoint
from detector.utils.drawing import class_color
from detector.utils.torch_utils import cpu_has_native_bf16

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_detect_script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real detect.py, as a user runs it, without a display."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    command = [sys.executable, str(REPO_ROOT / "detect.py"), "--device", "cpu", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def read_labels(path: Path) -> np.ndarray:
    """A YOLO txt file as (n, 6) [class, x, y, w, h, conf], rows sorted by class then confidence."""
    table = np.loadtxt(path, ndmin=2)
    return table[np.lexsort((-table[:, 5], table[:, 0]))]


def xywhn_to_xyxy(rows: np.ndarray, width: int, height: int) -> np.ndarray:
    x, y, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our checkpoint of a ~8k-parameter model whose biases make it find boxes everywhere (for plumbing tests)."""
    torch.manual_seed(0)
    model = DetectionModel(strided_convs_yaml(nc=2))
    model.names = ["thing", "other"]
    with torch.no_grad():
        for conv in model.detect.m:
            conv.bias.view(3, -1)[:, 4:] += 4.0
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint({**checkpoint_model_entries(model), "epoch": 0}, path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# YOLOv5n on the real images: what YOLOv5's detect.py finds


def test_yolov5n_matches_yolov5_detect(
    tmp_path: Path, yolov5n_weights: Path, shared_images: Path, reference_detections: Path
) -> None:
    run = run_detect_script(
        "--weights", str(yolov5n_weights), "--source", str(shared_images), "--img", "640",
        "--conf-thres", "0.25", "--iou-thres", "0.45", "--save-txt", "--save-conf", "--save-crop", "--save-csv",
        "--project", str(tmp_path), "--name", "exp",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "bus.jpg: 640x480 4 persons, 1 bus, " in run.stdout
    assert "zidane.jpg: 384x640 2 persons, 1 tie, " in run.stdout
    assert "ms pre-process, " in run.stdout and "ms NMS per image" in run.stdout
    labels = tmp_path / "exp" / "labels"

    compare = [sys.executable, str(reference_detections.parent / "compare_dets.py"), str(reference_detections), labels]
    checked = subprocess.run(compare, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout

    for stem, (width, height) in {"bus": (810, 1080), "zidane": (1280, 720)}.items():
        ours, reference = read_labels(labels / f"{stem}.txt"), read_labels(reference_detections / f"{stem}.txt")
        np.testing.assert_array_equal(ours[:, 0], reference[:, 0])
        np.testing.assert_allclose(ours[:, 5], reference[:, 5], atol=0.01)
        np.testing.assert_allclose(
            xywhn_to_xyxy(ours, width, height), xywhn_to_xyxy(reference, width, height), atol=2.0
        )
        annotated = cv2.imread(str(tmp_path / "exp" / f"{stem}.jpg"))
        assert annotated.shape == (height, width, 3)
        _assert_boxes_drawn(annotated, ours, width, height)
    # --save-csv: the same detections as YOLOv5's label files, in pixels, a row each
    with open(tmp_path / "exp" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "frame", "class", "class_id", "confidence", "x1", "y1", "x2", "y2"]
    for stem, (width, height) in {"bus": (810, 1080), "zidane": (1280, 720)}.items():
        mine = [r for r in rows if Path(r["image"]).name == f"{stem}.jpg"]
        table = np.array([[r["class_id"], r["x1"], r["y1"], r["x2"], r["y2"], r["confidence"]] for r in mine], float)
        table = table[np.lexsort((-table[:, 5], table[:, 0]))]
        reference = read_labels(reference_detections / f"{stem}.txt")
        np.testing.assert_array_equal(table[:, 0], reference[:, 0])
        np.testing.assert_allclose(table[:, 5], reference[:, 5], atol=0.01)
        np.testing.assert_allclose(table[:, 1:5], xywhn_to_xyxy(reference, width, height), atol=2.0)
        assert {r["class"] for r in mine} == ({"person", "bus"} if stem == "bus" else {"person", "tie"})
        assert {r["frame"] for r in mine} == {"0"}
    assert len(list((tmp_path / "exp" / "crops" / "person").glob("*.jpg"))) == 6
    bus_crops = [p.name for p in (tmp_path / "exp" / "crops" / "bus").glob("*.jpg")]
    assert bus_crops == ["bus_4.jpg"]  # the bus is the 5th (least confident) detection of bus.jpg


@pytest.mark.slow
def test_dnn_runs_the_yolov5n_onnx_with_opencv_and_matches_yolov5_detect(
    tmp_path: Path, yolov5n_weights: Path, shared_images: Path, reference_detections: Path
) -> None:
    """detect.py --dnn: yolov5n's --dynamic ONNX export through OpenCV's DNN module finds YOLOv5's boxes."""
    from detector.config import ExportConfig
    from detector.export import Exporter

    config = ExportConfig(weights=str(yolov5n_weights), include=("onnx",), dynamic=True, project=str(tmp_path / "x"))
    (exported,) = Exporter(config).run()
    run = run_detect_script(
        "--weights", str(exported.path), "--dnn", "--source", str(shared_images), "--img", "640",
        "--save-txt", "--save-conf", "--nosave", "--project", str(tmp_path), "--name", "dnn",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "OpenCVDnnBackend(" in run.stdout + run.stderr  # the model ran in OpenCV, not ONNX Runtime
    assert "bus.jpg: 640x480 4 persons, 1 bus, " in run.stdout
    compare = [sys.executable, str(reference_detections.parent / "compare_dets.py"), str(reference_detections)]
    checked = subprocess.run([*compare, str(tmp_path / "dnn" / "labels")], capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.startswith("8/8 "), checked.stdout


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 --half on the CPU needs native bfloat16 (AVX512-BF16/AMX)")
def test_half_on_a_bf16_cpu_finds_the_fp32_detections(yolov5n_weights: Path, shared_images: Path) -> None:
    """--half on a CPU with native bf16: bf16 autocast, Detect decoding in fp32; the same objects as fp32."""
    from detector import Detector as PublicDetector

    fp32 = PublicDetector(yolov5n_weights, device="cpu", imgsz=640)
    bf16 = PublicDetector(yolov5n_weights, device="cpu", imgsz=640, half=True)
    assert bf16.backend.autocast_dtype == torch.bfloat16 and not bf16.backend.fp16
    images = [str(shared_images / "bus.jpg"), str(shared_images / "zidane.jpg")]
    for exact, half in zip(fp32(images), bf16(images), strict=True):
        keep = exact.confidences > 0.4  # bf16 may move a score near the 0.25 threshold across it: compare clear ones
        matched = box_iou(torch.as_tensor(exact.boxes[keep]), torch.as_tensor(half.boxes)).max(1)
        assert (matched.values > 0.9).all(), (exact.boxes[keep], half.boxes)
        np.testing.assert_array_equal(exact.class_ids[keep], half.class_ids[matched.indices.numpy()])
        np.testing.assert_allclose(exact.confidences[keep], half.confidences[matched.indices.numpy()], atol=0.05)


def _assert_boxes_drawn(annotated: np.ndarray, rows: np.ndarray, width: int, height: int) -> None:
    """--save-txt round trip: every label's box is drawn in its class colour where the file says it is."""
    for row, box in zip(rows, xywhn_to_xyxy(rows, width, height), strict=True):
        x1, _, x2, y2 = np.clip(np.round(box), 0, [width - 1, height - 1, width - 1, height - 1]).astype(int)
        color = np.array(class_color(int(row[0])), dtype=float)
        bottom_edge = annotated[y2, x1 + (x2 - x1) // 4 : x2 - (x2 - x1) // 4].astype(float)  # labels sit on top
        distance = np.linalg.norm(bottom_edge - color, axis=1)
        assert np.median(distance) < 40, f"class {int(row[0])} box {box.round()} is not drawn where its label says"


def test_python_api_mixed_image_formats(tmp_path: Path, yolov5n_weights: Path, shared_images: Path) -> None:
    from detector import Detector as PublicDetector

    bus = cv2.imread(str(shared_images / "bus.jpg"))
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), bus)
    cv2.imwrite(str(folder / "b.webp"), bus, [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless WebP
    cv2.imwrite(str(folder / "c.bmp"), bus)
    detector = PublicDetector(yolov5n_weights, device="cpu", imgsz=320)  # 320: a quarter of the work of 640
    results = detector(folder)
    assert [Path(r.path).name for r in results] == ["a.png", "b.webp", "c.bmp"]
    from_array = detector(bus)[0]
    assert from_array.path == "image0" and len(from_array) >= 3
    for result in results:  # the same pixels in every format: the same detections as the decoded array
        assert result.orig_shape == (1080, 810) and result.summary() == from_array.summary()
        np.testing.assert_allclose(result.boxes, from_array.boxes, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# Videos, streams and the Python API, with a tiny model


def _write_video(path: Path, frames: int, fps: float = 12.0, size: tuple[int, int] = (96, 64)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()


def test_video_is_reencoded_with_every_frame(tmp_path: Path, tiny_weights: Path) -> None:
    video = tmp_path / "clip.mp4"
    _write_video(video, frames=7)
    run = run_detect_script(
        "--weights", str(tiny_weights), "--source", str(video), "--img", "64", "96", "--save-txt", "--save-csv",
        "--view-img", "--project", str(tmp_path / "runs"),
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "--view-img: no display" in run.stdout + run.stderr  # headless: a warning, not a crash
    assert "video 1/1 (frame 7/7) " in run.stdout
    output = cv2.VideoCapture(str(tmp_path / "runs" / "exp" / "clip.mp4"))
    assert int(output.get(cv2.CAP_PROP_FRAME_COUNT)) == 7
    assert (output.get(cv2.CAP_PROP_FRAME_WIDTH), output.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (96, 64)
    assert output.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
    frames = 0
    while output.read()[0]:
        frames += 1
    assert frames == 7
    label_files = sorted(p.name for p in (tmp_path / "runs" / "exp" / "labels").glob("*.txt"))
    assert label_files == sorted(f"clip_{i}.txt" for i in range(1, 8))
    with open(tmp_path / "runs" / "exp" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i in range(1, 8):  # each frame's rows are its label file's boxes
        labels = np.loadtxt(tmp_path / "runs" / "exp" / "labels" / f"clip_{i}.txt", ndmin=2)
        mine = [r for r in rows if r["frame"] == str(i)]
        assert len(mine) == len(labels) > 0 and {r["image"] for r in mine} == {str(video)}


def test_detect_run_folder_increments_and_nosave(tmp_path: Path, tiny_weights: Path) -> None:
    image = tmp_path / "im.jpg"
    cv2.imwrite(str(image), np.full((64, 64, 3), 127, np.uint8))
    config = DetectConfig(weights=str(tiny_weights), source=str(image), imgsz=(64,), project=str(tmp_path / "runs"))
    first = run_detect(config)
    second = run_detect(config)
    assert (first.name, second.name) == ("exp", "exp2")
    assert (first / "im.jpg").is_file()
    quiet = run_detect(dataclasses.replace(config, nosave=True, save_txt=True, name="q"))
    assert [p.relative_to(quiet).as_posix() for p in sorted(quiet.rglob("*.*"))] == ["labels/im.txt"]
    corners = run_detect(dataclasses.replace(config, nosave=True, save_txt=True, save_format=1, name="voc"))
    yolo, voc = (np.loadtxt(run / "labels" / "im.txt", ndmin=2) for run in (quiet, corners))
    assert len(yolo) > 0
    np.testing.assert_allclose(voc[:, 1:], xywhn_to_xyxy(yolo, 1, 1), atol=1e-5)  # --save-format 1: x1 y1 x2 y2


def test_visualize_saves_every_layers_output_per_image(tmp_path: Path, tiny_weights: Path) -> None:
    """--visualize: per image a folder with each layer's output (.npy, checked against torch's own layers applied
    one after another) and a PNG grid of its channels; 1-pixel maps skipped; only one .pt model can do it."""
    image = tmp_path / "street.jpg"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (128, 96, 3), dtype=np.uint8))
    config = DetectConfig(
        weights=str(tiny_weights), source=str(image), imgsz=(32,), visualize=True, project=str(tmp_path / "runs")
    )
    folder = run_detect(config) / "street"
    # 32 x 24, padded to the stride (32 x 32), through five stride-2 convs: 16, 8, 4, 2, then 1 (not drawn, as YOLOv5)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"stage{i}_Conv_features.{suffix}" for i in range(4) for suffix in ("npy", "png")
    )
    maps = [np.load(folder / f"stage{i}_Conv_features.npy") for i in range(4)]
    assert [m.shape for m in maps] == [(8, 16, 16), (8, 8, 8), (16, 4, 4), (16, 2, 2)]
    model = load_model(tiny_weights, fuse=True).eval()
    with torch.no_grad():
        for i in range(3):
            following = model.model[i + 1](torch.from_numpy(maps[i])[None])[0].numpy()
            np.testing.assert_allclose(maps[i + 1], following, atol=1e-5)
    grid = cv2.imread(str(folder / "stage0_Conv_features.png"))
    zoom = 160 // 16  # maps are enlarged to at least 160 px, 8 a row with 4-px gaps
    assert grid.shape == (16 * zoom, 8 * 16 * zoom + 7 * 4, 3)
    top = np.unravel_index(maps[0][0].argmax(), maps[0][0].shape)
    viridis_top = cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_VIRIDIS)[0, 0]
    np.testing.assert_array_equal(grid[top[0] * zoom, top[1] * zoom], viridis_top)  # channel 0's maximum: yellow

    with pytest.raises(ConfigError, match=r"--visualize needs one \.pt model .*not an Ensemble model"):
        run_detect(dataclasses.replace(config, weights=(str(tiny_weights), str(tiny_weights)), name="ensemble"))
    assert not (tmp_path / "runs" / "ensemble").exists()


def test_python_api_arrays_lists_videos_and_streams(tmp_path: Path, tiny_weights: Path) -> None:
    detector = Detector(tiny_weights, device="cpu", imgsz=64)
    backend = detector.backend
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(2)]
    results = detector(arrays)
    assert [r.path for r in results] == ["image0", "image1"] and all(r.orig_shape == (48, 80) for r in results)
    assert detector.backend is backend  # one model load, many calls
    single = detector(arrays[1])[0]
    np.testing.assert_array_equal(single.boxes, results[1].boxes)
    assert single.boxes.dtype == np.float32 and single.confidences.dtype == np.float32
    assert ((single.boxes >= 0) & (single.boxes <= [80, 48, 80, 48])).all()

    video = tmp_path / "v.avi"
    _write_video(video, frames=5)
    per_frame = detector(video)
    assert [r.frame for r in per_frame] == [1, 2, 3, 4, 5]
    lazily = detector.stream(video, vid_stride=2)
    assert not isinstance(lazily, list) and [r.frame for r in lazily] == [1, 3, 5]
    with pytest.raises(ConfigError, match="never ends"):
        detector(_streams_file(tmp_path, video))

    everything = Detector(tiny_weights, device="cpu", imgsz=64, conf_thres=0.3)(arrays[0])[0]
    only_other = Detector(tiny_weights, device="cpu", imgsz=64, conf_thres=0.3, classes=[1])(arrays[0])[0]
    assert set(everything.class_ids.tolist()) == {0, 1}  # the biased tiny model finds both classes
    expected = everything.class_ids == 1
    np.testing.assert_allclose(only_other.boxes, everything.boxes[expected][: len(only_other)], atol=1e-4)
    assert len(only_other) == expected.sum() and {r["name"] for r in only_other.to_json()} == {"other"}


def _streams_file(tmp_path: Path, video: Path) -> Path:
    path = tmp_path / "one.streams"
    path.write_text(f"{video}\n")
    return path


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda d: d / "missing.jpg", "missing.jpg: source not found"),
        (lambda d: (d / "bad.mp4").write_bytes(b"\x00" * 64) and d / "bad.mp4", "bad.mp4: cannot read video"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "empty: folder has no images or videos"),
    ],
    ids=["missing-file", "unreadable-video", "empty-folder"],
)
def test_bad_sources_exit_nonzero_with_one_line(tmp_path: Path, tiny_weights: Path, make_source, message: str) -> None:
    run = run_detect_script("--weights", str(tiny_weights), "--source", str(make_source(tmp_path)), cwd=tmp_path)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert "Traceback" not in run.stderr


def test_a_project_folder_that_cannot_be_made_is_one_line(tmp_path: Path, tiny_weights: Path) -> None:
    """--project under a plain file: the path and the system's reason (run_cli), no traceback."""
    image = tmp_path / "im.jpg"
    cv2.imwrite(str(image), np.full((64, 64, 3), 127, np.uint8))
    (tmp_path / "file").write_text("not a folder")
    project = tmp_path / "file" / "runs"
    run = run_detect_script(
        "--weights", str(tiny_weights), "--source", str(image), "--img", "64", "--project", str(project), cwd=tmp_path
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == f"error: {project}: Not a directory", run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--classes", "0", "2", "7"], "--classes 2 7: the model has 2 classes, ids 0-1"),
        (["--classes", "-1"], "--classes -1: the model has 2 classes, ids 0-1"),
        (["--line-thickness", "-1"], "--line-thickness must be at least 1 pixel, got -1"),
        (["--line-thickness", "0"], "--line-thickness must be at least 1 pixel, got 0"),
    ],
    ids=["unknown-classes", "negative-class", "filled-boxes", "no-line"],
)
def test_bad_options_exit_nonzero_with_one_line_before_any_folder(
    tmp_path: Path, tiny_weights: Path, options: list[str], message: str
) -> None:
    """A class id the model lacks would silently keep nothing; OpenCV fills a box drawn with thickness -1."""
    image = tmp_path / "im.jpg"
    cv2.imwrite(str(image), np.full((64, 64, 3), 127, np.uint8))
    run = run_detect_script(
        "--weights", str(tiny_weights), "--source", str(image), "--img", "64", *options, cwd=tmp_path
    )
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "runs").exists()
