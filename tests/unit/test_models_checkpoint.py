"""Our checkpoints <-> models: save -> load_model round trip, EMA preference, fp16 entries, and clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import detector
from detector.errors import CheckpointError
from detector.models.loading import checkpoint_model_entries, load_model, model_from_checkpoint
from detector.models.yolo import DetectionModel
from detector.utils.checkpoint import save_checkpoint

SMALL_YAML = {
    "nc": 4,
    "depth_multiple": 0.33,
    "width_multiple": 0.125,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
    "backbone": [
        [-1, 1, "Conv", [64, 6, 2, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 3, "C3", [128]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 1, "C3", [256]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 1, "SPPF", [512, 5]],
    ],
    "head": [
        [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
        [[-1, 4], 1, "Concat", [1]],
        [-1, 1, "C3", [256, False]],
        [[2, 9, 6], 1, "Detect", ["nc", "anchors"]],
    ],
}


@pytest.fixture()
def trained_model() -> DetectionModel:
    """A small model whose weights and BatchNorm statistics differ from a fresh build (as after training)."""
    torch.manual_seed(0)
    model = DetectionModel(SMALL_YAML)
    with torch.no_grad():
        model.train()(torch.rand(2, 3, 64, 64))  # updates BatchNorm running statistics
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
        model.detect.anchors.mul_(1.1)  # as AutoAnchor would
    model.names = ["cat", "dog", "bird", "fish"]
    return model.eval()


def _save(model: DetectionModel, path: Path, **extra) -> Path:
    save_checkpoint({**checkpoint_model_entries(model), "ema": None, "epoch": 3, **extra}, path)
    return path


def test_round_trip_gives_identical_predictions(trained_model: DetectionModel, tmp_path: Path) -> None:
    path = _save(trained_model, tmp_path / "last.pt")
    assert isinstance(torch.load(path, weights_only=True)["model_yaml"], dict)  # plain data, no pickled code
    loaded = detector.load_model(path)
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(image), trained_model(image))
    assert loaded.names == ["cat", "dog", "bird", "fish"] and not loaded.training
    assert torch.equal(loaded.detect.anchors, trained_model.detect.anchors)


def test_load_model_fuse_and_device(trained_model: DetectionModel, tmp_path: Path) -> None:
    loaded = load_model(_save(trained_model, tmp_path / "best.pt"), device="cpu", fuse=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    assert loaded.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)  # faster on CPU
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert (loaded(image) - trained_model(image)).abs().max() < 1e-4


def test_ema_weights_are_preferred(trained_model: DetectionModel, tmp_path: Path) -> None:
    ema = copy.deepcopy(trained_model)
    with torch.no_grad():
        ema.detect.m[0].bias.add_(1.0)
    checkpoint = {**checkpoint_model_entries(trained_model), "ema": ema.state_dict()}
    assert torch.equal(model_from_checkpoint(checkpoint).detect.m[0].bias, ema.detect.m[0].bias)
    raw = model_from_checkpoint(checkpoint, prefer_ema=False)
    assert torch.equal(raw.detect.m[0].bias, trained_model.detect.m[0].bias)
    save_checkpoint(checkpoint, tmp_path / "ema.pt")
    assert torch.equal(load_model(tmp_path / "ema.pt").detect.m[0].bias, ema.detect.m[0].bias)


def test_half_precision_entries_load_as_float(trained_model: DetectionModel) -> None:
    entries = checkpoint_model_entries(trained_model)
    entries["model"] = {k: v.half() if v.is_floating_point() else v for k, v in entries["model"].items()}
    model = model_from_checkpoint(entries)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.detect.m[0].weight, trained_model.detect.m[0].weight.half().float())


def test_checkpoint_entries_are_copies_and_refuse_fused_models(trained_model: DetectionModel) -> None:
    entries = checkpoint_model_entries(trained_model)
    assert entries["model_yaml"] == trained_model.yaml and entries["model_yaml"] is not trained_model.yaml
    with torch.no_grad():
        trained_model.detect.m[0].bias.add_(1.0)
    assert not torch.equal(entries["model"]["model.10.m.0.bias"], trained_model.detect.m[0].bias)
    with pytest.raises(ValueError, match="fused"):
        checkpoint_model_entries(copy.deepcopy(trained_model).fuse())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_yaml": None}, "has no 'model_yaml'"),
        ({"model": None}, "has neither 'model' nor 'ema'"),
        ({"names": ["a", "b"]}, "has 2 class names for a model of 4 classes"),
        ({"model_yaml": {**SMALL_YAML, "nc": 5}}, r"model.10.m.0.weight has shape \[27, 16, 1, 1\]"),
        ({"model_yaml": {**SMALL_YAML, "head": [[-1, 1, "Detekt", []]]}}, "cannot rebuild the model"),
    ],
)
def test_inconsistent_checkpoints_are_one_line_errors(
    trained_model: DetectionModel, tmp_path: Path, change: dict, message: str
) -> None:
    path = tmp_path / "bad.pt"
    save_checkpoint({**checkpoint_model_entries(trained_model), "ema": None, **change}, path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_model(path)
    assert "\n" not in str(error.value)


def test_missing_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.pt")
    (tmp_path / "noise.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"noise\.pt"):
        load_model(tmp_path / "noise.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a detector checkpoint"):
        load_model(tmp_path / "plain.pt")


@pytest.mark.parametrize(
    ("name", "kind"),
    [("m.onnx", "ONNX"), ("m.torchscript", "TorchScript"), ("m.engine", "TensorRT"), ("m_openvino_model", "OpenVINO")],
)
def test_an_export_given_for_a_checkpoint_is_named_as_one(tmp_path: Path, name: str, kind: str) -> None:
    """train.py / export.py --weights m.onnx: say it is an export, not that the pickle has a bad load key."""
    export = tmp_path / name
    if name.endswith("_openvino_model"):
        export.mkdir()
    else:
        export.write_bytes(b"\x08\x07 an export")
    with pytest.raises(CheckpointError, match=rf"{name}: {kind} export .*needs the \.pt checkpoint it was exported"):
        load_model(export)
