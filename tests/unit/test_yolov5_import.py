"""Import of YOLOv5's pickled checkpoints through the restricted unpickler: real weights, a built fixture, refusals."""

from __future__ import annotations

import builtins
import copy
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from tiny_models import yolov5_blocks_yaml
from torch import nn

from detector.errors import CheckpointError
from detector.models import blocks
from detector.models.head import Detect
from detector.models.loading import load_model
from detector.models.yolo import DetectionModel
from detector.models.yolov5_import import StandIn, read_yolov5_checkpoint

# -- a YOLOv5-format file built in the test ---------------------------------------------------------------------------


@pytest.fixture()
def fake_yolov5_modules() -> Iterator[dict[str, types.ModuleType]]:
    """Modules named like YOLOv5's (``models.common``, ``models.yolo``), present only while a test writes a pickle."""
    names = ("models", "models.common", "models.yolo")
    assert not any(name in sys.modules for name in names), "a real 'models' package would shadow the fixture"
    modules = {name: types.ModuleType(name) for name in names}
    sys.modules.update(modules)
    try:
        yield modules
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _fake_class(module: types.ModuleType, name: str) -> type[nn.Module]:
    if not hasattr(module, name):
        setattr(module, name, type(name, (nn.Module,), {"__module__": module.__name__, "__qualname__": name}))
    return getattr(module, name)


def _as_yolov5_pickle(model: DetectionModel, modules: dict[str, types.ModuleType]) -> nn.Module:
    """A twin of ``model`` laid out as YOLOv5 pickles it: models.yolo.Model holding an nn.Sequential of
    models.common blocks, a Detect whose stride is an attribute, names as a dict, fp16 tensors."""
    layers = copy.deepcopy(model.model)
    for module in layers.modules():
        if isinstance(module, blocks.Upsample):
            module.__class__ = nn.Upsample
        elif isinstance(module, blocks.SiLU):  # YOLOv5's Conv holds torch's nn.SiLU
            module.__class__ = nn.SiLU
        elif isinstance(module, Detect):
            stride = module._buffers.pop("stride")
            module.__class__ = _fake_class(modules["models.yolo"], "Detect")
            module.stride = stride
        elif type(module).__module__ == blocks.__name__:
            module.__class__ = _fake_class(modules["models.common"], type(module).__name__)
    yolov5_model = _fake_class(modules["models.yolo"], "Model")()
    yolov5_model.model = nn.Sequential(*layers)
    yolov5_model.yaml = copy.deepcopy(model.yaml)
    yolov5_model.names = dict(enumerate(model.names))
    yolov5_model.stride = model.stride.clone()
    return yolov5_model.half()


@pytest.fixture()
def tiny_model() -> DetectionModel:
    torch.manual_seed(0)
    model = DetectionModel(yolov5_blocks_yaml())
    with torch.no_grad():
        model.train()(torch.rand(2, 3, 64, 64))  # non-trivial BatchNorm statistics
    model.names = ["ant", "bee", "wasp"]
    return model.eval()


def test_yolov5_format_fixture_imports_with_equal_predictions(
    tiny_model: DetectionModel, fake_yolov5_modules: dict, tmp_path: Path
) -> None:
    path = tmp_path / "yolov5-tiny.pt"
    checkpoint = {
        "epoch": -1,
        "best_fitness": np.float64(0.25),  # NumPy scalars appear in YOLOv5 training checkpoints
        "model": _as_yolov5_pickle(tiny_model, fake_yolov5_modules),
        "ema": None,
        "opt": {"imgsz": 640, "rect": False},
        "date": "2022-02-08T18:24:20",
    }
    torch.save(checkpoint, path)
    for name in fake_yolov5_modules:
        del sys.modules[name]  # loading must not need (or import) YOLOv5's code

    loaded = load_model(path)
    assert "models.common" not in sys.modules
    reference = copy.deepcopy(tiny_model).half().float()  # the file holds fp16 weights
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(loaded(image), reference(image), atol=1e-5)
    assert loaded.names == ["ant", "bee", "wasp"]
    assert all(p.dtype == torch.float32 for p in loaded.parameters())

    raw = read_yolov5_checkpoint(path)
    assert isinstance(raw["model"], StandIn) and raw["model"].qualified_name == "models.yolo.Model"
    assert raw["best_fitness"] == 0.25


# -- refusals ---------------------------------------------------------------------------------------------------------


class _RunsShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvaluatesCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize(
    ("payload", "global_name"), [(_RunsShellCommand, r"system"), (_EvaluatesCode, r"(__builtin__|builtins)\.eval")]
)
def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path, payload: type, global_name: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "yolov5s.pt"
    torch.save({"model": None, "opt": {"hook": payload(marker)}}, path)
    with pytest.raises(CheckpointError, match=global_name) as error:
        load_model(path)
    assert str(path) in str(error.value) and "nothing was executed" in str(error.value)
    assert not marker.exists()


def test_unlisted_name_in_a_yolov5_module_is_refused(fake_yolov5_modules: dict, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    def system(command: str) -> int:
        return os.system(command)

    system.__module__, system.__qualname__ = "models.common", "system"
    fake_yolov5_modules["models.common"].system = system

    class Disguised:
        def __reduce__(self):
            return (system, (f"touch {marker}",))

    path = tmp_path / "disguised.pt"
    torch.save({"model": Disguised()}, path)
    with pytest.raises(CheckpointError, match=r"models\.common\.system"):
        load_model(path)
    assert not marker.exists()


# -- the real YOLOv5n release file ------------------------------------------------------------------------------------


def _letterbox(image: np.ndarray, size: int = 640, stride: int = 32) -> tuple[np.ndarray, float, tuple[int, int]]:
    """YOLOv5 detect.py's letterbox: long side to ``size``, pad to a multiple of ``stride`` with grey 114."""
    height, width = image.shape[:2]
    ratio = min(size / height, size / width)
    new_width, new_height = round(width * ratio), round(height * ratio)
    pad_width, pad_height = (size - new_width) % stride / 2, (size - new_height) % stride / 2
    image = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(pad_height - 0.1), round(pad_height + 0.1)
    left, right = round(pad_width - 0.1), round(pad_width + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    return image, ratio, (left, top)


def _detect(model: DetectionModel, path: Path) -> np.ndarray:
    """(n, 6) [class, x1, y1, x2, y2, conf] in original pixels, conf 0.25, IoU 0.45 (YOLOv5 detect.py defaults)."""
    original = cv2.imread(str(path))
    image, ratio, (left, top) = _letterbox(original)
    tensor = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))).float()[None] / 255
    with torch.inference_mode():
        prediction = model(tensor)[0]
    prediction = prediction[prediction[:, 4] > 0.25]
    confidence, classes = (prediction[:, 5:] * prediction[:, 4:5]).max(1)
    keep = confidence > 0.25
    boxes = torchvision.ops.box_convert(prediction[keep, :4], "cxcywh", "xyxy")
    confidence, classes = confidence[keep], classes[keep]
    kept = torchvision.ops.batched_nms(boxes, confidence, classes, 0.45)[:1000]
    boxes = boxes[kept]
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - left) / ratio).clamp(0, original.shape[1])
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - top) / ratio).clamp(0, original.shape[0])
    return torch.cat((classes[kept, None].float(), boxes, confidence[kept, None]), 1).numpy()


def _reference(path: Path, width: int, height: int) -> np.ndarray:
    """YOLOv5's saved labels (cls x y w h conf, normalised) as (n, 6) [class, x1, y1, x2, y2, conf] pixels."""
    rows = np.loadtxt(path, ndmin=2)
    xc, yc, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    return np.stack((rows[:, 0], xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2, rows[:, 5]), 1)


def test_official_yolov5n_finds_what_yolov5_finds(
    yolov5n_weights: Path, shared_images: Path, reference_detections: Path
) -> None:
    model = load_model(yolov5n_weights)
    assert sum(p.numel() for p in model.parameters()) == 1_872_157
    assert model.names[0] == "person" and model.names[27] == "tie" and model.stride.tolist() == [8, 16, 32]
    for name in ("bus", "zidane"):
        image = shared_images / f"{name}.jpg"
        height, width = cv2.imread(str(image)).shape[:2]
        ours = _detect(model, image)
        reference = _reference(reference_detections / f"{name}.txt", width, height)
        assert len(ours) == len(reference)
        for row in reference:  # each reference box has a same-class match: conf within 0.01, corners within 2 px
            same_class = ours[ours[:, 0] == row[0]]
            corner_error = np.abs(same_class[:, 1:5] - row[1:5]).max(1)
            best = corner_error.argmin()
            assert corner_error[best] < 2.0 and abs(same_class[best, 5] - row[5]) < 0.01, (name, row)
    assert sum(p.numel() for p in model.fuse().parameters()) == 1_867_405  # YOLOv5's fused count
