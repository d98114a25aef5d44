"""Model ensembles (``--weights a.pt b.onnx``): the members' raw predictions joined before one NMS.

Checked against torch.cat of the members' own outputs and torchvision's batched NMS over them (two different tiny
models, one as a checkpoint and one as ONNX), and on real data: YOLOv5n ensembled with itself finds exactly what
YOLOv5n finds, in detect.py's Python API and in val.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from tiny_models import export_onnx, strided_convs_yaml

import detector
from detector.cli.detect import build_detect_config
from detector.cli.val import build_val_config
from detector.data.dataset_config import load_dataset_config
from detector.engine.backends import EnsembleBackend, PyTorchBackend, detections_from_output, load_backend
from detector.engine.predictor import Detector
from detector.errors import CheckpointError, ConfigError
from detector.models.loading import checkpoint_model_entries
from detector.models.yolo import DetectionModel
from detector.ops.boxes import xywh2xyxy
from detector.utils.checkpoint import save_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = ["cat", "dog", "bird"]


def _tiny_model(seed: int, nc: int = 3) -> DetectionModel:
    """A ~8k-parameter model whose raised objectness and class biases leave many boxes above the thresholds."""
    torch.manual_seed(seed)
    model = DetectionModel(strided_convs_yaml(nc=nc)).eval()
    model.names = NAMES[:nc] if nc <= 3 else [f"c{i}" for i in range(nc)]
    with torch.no_grad():
        for conv in model.detect.m:
            conv.bias.view(3, -1)[:, 4] += 6.0
    return model


def _checkpoint(model: DetectionModel, path: Path) -> Path:
    save_checkpoint({**checkpoint_model_entries(model), "epoch": 0}, path)
    return path


def _onnx(model: DetectionModel, path: Path, example: torch.Tensor, imgsz: tuple[int, int] | None) -> Path:
    """The model as ONNX with our metadata: fixed to ``imgsz``, or dynamic when it is None."""
    metadata = {"names": model.names, "stride": 32, "strides": [8, 16, 32], "dynamic": imgsz is None}
    if imgsz is not None:
        metadata["imgsz"] = list(imgsz)
    return export_onnx(model, path, example, metadata, dynamic=imgsz is None)


def _torchvision_nms(predictions: torch.Tensor, conf_thres: float, iou_thres: float) -> torch.Tensor:
    """Reference detections for one image's raw (N, 5 + nc) predictions: best class, score = objectness x class
    probability, torchvision's batched NMS per class; rows [x1, y1, x2, y2, score, class] by falling score."""
    scores, classes = (predictions[:, 5:] * predictions[:, 4:5]).max(1)
    keep = (predictions[:, 4] > conf_thres) & (scores > conf_thres)
    boxes, scores, classes = xywh2xyxy(predictions[keep, :4]), scores[keep], classes[keep]
    kept = torchvision.ops.batched_nms(boxes, scores, classes, iou_thres)
    return torch.cat([boxes[kept], scores[kept, None], classes[kept, None].float()], 1)


def test_an_ensemble_joins_its_members_predictions_before_one_nms(tmp_path: Path) -> None:
    first, second = _tiny_model(seed=0), _tiny_model(seed=1)
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    paths = [_checkpoint(first, tmp_path / "a.pt"), _onnx(second, tmp_path / "b.onnx", images[:1], imgsz=None)]

    ensemble = load_backend(paths, "cpu")
    assert isinstance(ensemble, EnsembleBackend)
    assert [m.format_name for m in ensemble.members] == ["PyTorch", "ONNX"]
    assert (ensemble.names, ensemble.stride, ensemble.input_shape) == (NAMES, 32, (None, 3, None, None))
    with torch.no_grad():
        joined = torch.cat([first(images), second(images)], 1)
    output = ensemble(images)
    assert output.shape == (2, 2 * first(images).shape[1], 8)
    torch.testing.assert_close(output, joined, atol=1e-4, rtol=1e-4)

    conf_thres, iou_thres = 0.15, 0.45
    detections = detections_from_output(output, False, conf_thres, iou_thres, max_det=1000)
    for image, found in zip(joined, detections, strict=True):
        reference = _torchvision_nms(image, conf_thres, iou_thres)
        assert len(found) == len(reference) > 10
        order = lambda rows: rows[torch.argsort(rows[:, 4], descending=True, stable=True)]  # noqa: E731
        torch.testing.assert_close(order(found), order(reference), atol=1e-3, rtol=1e-4)
    # both members contribute: the first one's boxes alone are not what the ensemble keeps
    alone = detections_from_output(first(images).detach(), False, conf_thres, iou_thres, max_det=1000)
    assert any(len(a) != len(b) or not torch.allclose(a, b) for a, b in zip(alone, detections, strict=True))


def test_ensemble_members_must_share_classes_and_input_sizes(tmp_path: Path) -> None:
    example = torch.rand(1, 3, 64, 96)
    three = _checkpoint(_tiny_model(seed=0), tmp_path / "three.pt")
    five = _checkpoint(_tiny_model(seed=0, nc=5), tmp_path / "five.pt")
    with pytest.raises(ConfigError, match=r"five\.pt: predicts 5 classes but .*three\.pt predicts 3") as error:
        load_backend([three, five], "cpu")
    assert "\n" not in str(error.value)

    wide = _onnx(_tiny_model(seed=0), tmp_path / "wide.onnx", example, imgsz=(64, 96))
    square = _onnx(_tiny_model(seed=1), tmp_path / "square.onnx", torch.rand(1, 3, 64, 64), imgsz=(64, 64))
    with pytest.raises(ConfigError, match=r"different fixed input widths \(.*wide\.onnx: 96, .*square\.onnx: 64\)"):
        load_backend([wide, square], "cpu")
    # a fixed member fixes the ensemble's input; a dynamic one accepts it
    mixed = load_backend([wide, three], "cpu")
    assert mixed.input_shape == (1, 3, 64, 96) and mixed.fixed_hw == (64, 96)

    with pytest.raises(CheckpointError, match=r"absent\.pt: weights not found"):
        load_backend([three, tmp_path / "absent.pt"], "cpu")
    assert isinstance(load_backend([three], "cpu"), PyTorchBackend)  # one file is no ensemble


def test_weights_flags_take_one_file_or_several() -> None:
    assert build_detect_config(["--weights", "a.pt"]).weights == "a.pt"
    assert build_detect_config(["--weights", "a.pt", "b.onnx"]).weights == ("a.pt", "b.onnx")
    assert build_val_config(["--weights", "a.pt", "b.pt", "c.pt"]).weights == ("a.pt", "b.pt", "c.pt")
    assert build_val_config(["--weights", "best.pt"]).weights == "best.pt"


def test_yolov5n_ensembled_with_itself_finds_what_yolov5n_finds(yolov5n_weights: Path, shared_images: Path) -> None:
    """Each box comes twice, once per member, and NMS keeps one of each pair: the same detections as one model."""
    images = sorted(str(p) for p in shared_images.glob("*.jpg"))
    single = Detector(yolov5n_weights, device="cpu")(images)
    pair = Detector([yolov5n_weights, yolov5n_weights], device="cpu")(images)
    assert [r.summary() for r in pair] == [r.summary() for r in single] == ["4 persons, 1 bus", "2 persons, 1 tie"]
    for a, b in zip(single, pair, strict=True):
        np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-3)
        np.testing.assert_allclose(b.confidences, a.confidences, atol=1e-6)


def test_val_py_ensemble_of_yolov5n_with_itself_scores_as_yolov5n(
    tmp_path: Path, yolov5n_weights: Path, coco128_dir: Path
) -> None:
    subset = tmp_path / "subset"
    subset.mkdir()
    images = sorted((coco128_dir / "images" / "train2017").glob("*.jpg"))[:8]
    (subset / "val.txt").write_text("".join(f"{p}\n" for p in images))
    names = load_dataset_config(coco128_dir / "coco128.yaml").names
    (subset / "data.yaml").write_text(f"path: {subset}\ntrain: val.txt\nval: val.txt\nnames: {json.dumps(names)}\n")

    def val(*weights: Path, name: str) -> tuple[float, ...]:
        command = [sys.executable, str(REPO_ROOT / "val.py"), "--weights", *map(str, weights), "--data"]
        command += [str(subset / "data.yaml"), "--img", "320", "--device", "cpu", "--save-json"]
        command += ["--project", str(tmp_path / "runs"), "--name", name]
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        row = next(line for line in run.stdout.splitlines() if line.split()[:1] == ["all"])
        return tuple(float(v) for v in row.split()[3:])

    single = val(yolov5n_weights, name="single")
    pair = val(yolov5n_weights, yolov5n_weights, name="pair")
    assert pair == single and single[2] > 0.3  # P, R, mAP50, mAP50-95
    assert (tmp_path / "runs" / "pair" / "yolov5n_predictions.json").is_file()  # named after the first member
    # the Python API gives val.py's figures, for an ensemble too
    metrics = detector.val([yolov5n_weights] * 2, data=str(subset / "data.yaml"), imgsz=320, project=str(tmp_path))
    assert (metrics.map50, metrics.map) == pytest.approx(pair[2:], abs=5e-4)
