"""load_backend for every weight format, checked against the PyTorch model the files were made from (1e-4).

The exported files are made here the way docs/architecture.md ("Export formats") specifies, from a tiny
DetectionModel (5 convs + Detect, ~8k parameters) at 64-96 px, so each export takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_models import export_onnx, strided_convs_yaml
from torch import nn

from detector.engine.backends import Backend, detections_from_output, load_backend
from detector.engine.predictor import Predictor
from detector.errors import CheckpointError, ConfigError
from detector.export import FORMATS, ExportContext, Format, OpenVINOFormat, format_for_path, register_format
from detector.export.metadata import split_engine_header
from detector.models.yolo import DetectionModel

# Tracing/exporting a model is what these tests do; torch's deprecation and tracer notes about it are expected.
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NAMES = ["cat", "dog", "bird"]


def _metadata(imgsz: tuple[int, int], dynamic: bool, **extra: object) -> dict[str, object]:
    return {
        "format": "detector-export-v1",
        "names": NAMES,
        "stride": 32,
        "strides": [8, 16, 32],
        "imgsz": list(imgsz),
        "batch": 1,
        "dynamic": dynamic,
        "half": False,
        "nms": False,
        **extra,
    }


@pytest.fixture(scope="module")
def tiny_model() -> DetectionModel:
    torch.manual_seed(0)
    model = DetectionModel(strided_convs_yaml(nc=3)).eval()
    model.names = list(NAMES)
    with torch.no_grad():  # objectness/class biases up, so thresholds leave plenty of boxes to compare
        for conv in model.detect.m:
            conv.bias.view(3, -1)[:, 4:] += 4.0
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))


def _reference(model: DetectionModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def test_torchscript_backend(tmp_path: Path, tiny_model: DetectionModel, images: torch.Tensor) -> None:
    path = tmp_path / "tiny.torchscript"
    with torch.no_grad():
        traced = torch.jit.trace(tiny_model, images, strict=False, check_trace=False)
    traced.save(str(path), _extra_files={"config.txt": json.dumps(_metadata((64, 96), dynamic=False))})
    backend = load_backend(path, "cpu")
    assert (backend.names, backend.stride, backend.fp16, backend.end2end) == (NAMES, 32, False, False)
    assert backend.input_shape == (1, 3, 64, 96) and backend.fixed_hw == (64, 96) and not backend.dynamic
    torch.testing.assert_close(backend(images), _reference(tiny_model, images), atol=1e-4, rtol=1e-4)


def test_onnx_backend_static_and_dynamic(tmp_path: Path, tiny_model: DetectionModel, images: torch.Tensor) -> None:
    static = load_backend(export_onnx(tiny_model, tmp_path / "s.onnx", images, _metadata((64, 96), False), False))
    assert static.input_shape == (1, 3, 64, 96) and static.names == NAMES and static.stride == 32
    torch.testing.assert_close(static(images), _reference(tiny_model, images), atol=1e-4, rtol=1e-4)

    dynamic = load_backend(export_onnx(tiny_model, tmp_path / "d.onnx", images, _metadata((64, 96), True), True))
    assert dynamic.dynamic and dynamic.input_shape == (None, 3, None, None)
    other = torch.rand(2, 3, 32, 128, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(dynamic(other), _reference(tiny_model, other), atol=1e-4, rtol=1e-4)


def test_onnx_reads_yolov5_style_metadata(tmp_path: Path, tiny_model: DetectionModel, images: torch.Tensor) -> None:
    yolov5_metadata = {"stride": "32", "names": "{0: 'cat', 1: 'dog', 2: 'bird'}"}  # Python literals, not JSON
    backend = load_backend(export_onnx(tiny_model, tmp_path / "v5.onnx", images, yolov5_metadata, False))
    assert backend.names == NAMES and backend.stride == 32


def test_onnx_without_names_takes_them_from_data_yaml(
    tmp_path: Path, tiny_model: DetectionModel, images: torch.Tensor
) -> None:
    path = export_onnx(tiny_model, tmp_path / "bare.onnx", images, None, False)
    assert load_backend(path).names == []
    data = tmp_path / "pets.yaml"
    data.write_text(yaml.safe_dump({"train": "images", "val": "images", "names": {0: "a", 1: "b", 2: "c"}}))
    assert load_backend(path, data=data).names == ["a", "b", "c"]


@pytest.mark.fresh_process  # compiles with OpenVINO (tests/conftest.py)
def test_openvino_backend(tmp_path: Path, tiny_model: DetectionModel, images: torch.Tensor) -> None:
    import openvino

    onnx_path = export_onnx(tiny_model, tmp_path / "tiny.onnx", images, None, True)
    folder = tmp_path / "tiny_openvino_model"
    folder.mkdir()
    openvino.save_model(openvino.convert_model(str(onnx_path)), str(folder / "tiny.xml"), compress_to_fp16=False)
    (folder / "metadata.yaml").write_text(yaml.safe_dump(_metadata((64, 96), True)))
    backend = load_backend(folder, "cpu")
    assert backend.names == NAMES and backend.dynamic
    first = backend(images)
    torch.testing.assert_close(first, _reference(tiny_model, images), atol=1e-4, rtol=1e-4)
    # The backend hands OpenVINO the input in place and returns the request's output without another copy: a
    # result must survive the next inference, the input must be left as it was, and a strided input still works.
    kept, given = first.clone(), images.clone()
    other = torch.rand(1, 3, 64, 192, generator=torch.Generator().manual_seed(3))[..., ::2]  # not contiguous
    torch.testing.assert_close(backend(other), _reference(tiny_model, other.contiguous()), atol=1e-4, rtol=1e-4)
    assert torch.equal(first, kept) and torch.equal(images, given)
    assert first.numpy().flags.writeable  # torch.from_numpy warns on a read-only array
    assert format_for_path(folder / "tiny.xml") is format_for_path(folder) is OpenVINOFormat  # the .xml too
    assert type(load_backend(folder / "tiny.xml")) is type(backend)


class _FixedDetections(nn.Module):
    """An 'end2end' model: EfficientNMS-layout outputs (2 valid rows of 4), independent of the image."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = images.shape[0]
        zero = images.mean() * 0  # keeps the outputs connected to the input in the traced graph
        boxes = torch.tensor([[1.0, 2, 30, 40], [5, 5, 20, 20], [7, 7, 9, 9], [0, 0, 0, 0]]) + zero
        scores = torch.tensor([0.9, 0.4, 0.8, 0.0]) + zero
        classes = torch.tensor([2, 0, 1, 0], dtype=torch.int32)
        num = torch.full((batch, 1), 2, dtype=torch.int32)
        return num, boxes.expand(batch, 4, 4), scores.expand(batch, 4), classes.expand(batch, 4)


def test_onnx_end2end_outputs(tmp_path: Path, images: torch.Tensor) -> None:
    path = tmp_path / "nms.onnx"
    torch.onnx.export(
        _FixedDetections(),
        images,
        str(path),
        input_names=["images"],
        opset_version=17,
        dynamo=False,
        output_names=["num_dets", "det_boxes", "det_scores", "det_classes"],
    )
    backend = load_backend(path)
    assert backend.end2end
    output = backend(images)
    expected = torch.tensor([[1.0, 2, 30, 40, 0.9, 2], [5, 5, 20, 20, 0.4, 0], [0] * 6, [0] * 6])
    torch.testing.assert_close(output[0], expected)  # the third row (score 0.8) is past num_dets: zeroed
    kept = detections_from_output(output, True, conf_thres=0.25)[0]
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.4])
    assert detections_from_output(output, True, conf_thres=0.5)[0].shape == (1, 6)
    assert detections_from_output(output, True, conf_thres=0.25, classes=[0])[0][:, 5].tolist() == [0.0]


def test_opencv_dnn_backend_runs_what_onnx_runtime_runs(
    tmp_path: Path, tiny_model: DetectionModel, images: torch.Tensor
) -> None:
    """--dnn: the same ONNX files through OpenCV's DNN module, against ONNX Runtime (1e-4), fixed and dynamic."""
    static_file = export_onnx(tiny_model, tmp_path / "s.onnx", images, _metadata((64, 96), False), False)
    dynamic_file = export_onnx(tiny_model, tmp_path / "d.onnx", images, _metadata((64, 96), True), True)
    other = torch.rand(2, 3, 32, 128, generator=torch.Generator().manual_seed(2))
    for path, batch in ((static_file, images), (dynamic_file, images), (dynamic_file, other)):
        dnn, ort = load_backend(path, "cpu", dnn=True), load_backend(path, "cpu")
        assert dnn.format_name == "ONNX (OpenCV DNN)" and ort.format_name == "ONNX"
        assert (dnn.names, dnn.stride, dnn.input_shape) == (ort.names, ort.stride, ort.input_shape)
        torch.testing.assert_close(dnn(batch), ort(batch), atol=1e-4, rtol=1e-4)
    assert load_backend(static_file, "cpu", dnn=True).input_shape == (1, 3, 64, 96)

    with pytest.raises(ConfigError, match=r"--dnn runs \.onnx files with OpenCV's DNN module, not model\.torchscript"):
        (tmp_path / "model.torchscript").write_bytes(b"")
        load_backend(tmp_path / "model.torchscript", "cpu", dnn=True)
    nms_file = tmp_path / "nms.onnx"
    torch.onnx.export(
        _FixedDetections(), images, str(nms_file), input_names=["images"], opset_version=17, dynamo=False,
        output_names=["num_dets", "det_boxes", "det_scores", "det_classes"],
    )  # fmt: skip
    with pytest.raises((ConfigError, CheckpointError), match=r"nms\.onnx: .*(4 outputs|cannot load)") as error:
        load_backend(nms_file, "cpu", dnn=True)
    assert "\n" not in str(error.value)
    flagged = export_onnx(tiny_model, tmp_path / "h.onnx", images, _metadata((64, 96), False, half=True), False)
    with pytest.raises(ConfigError, match=r"h\.onnx: exported with --half, which OpenCV's DNN module does not run"):
        load_backend(flagged, "cpu", dnn=True)


def test_tensorrt_engine_needs_tensorrt_and_cuda(tmp_path: Path) -> None:
    header = json.dumps({"names": NAMES, "stride": 32}).encode()
    data = len(header).to_bytes(4, "little") + header + b"ENGINE-BYTES"
    assert split_engine_header(data) == ({"names": NAMES, "stride": 32}, b"ENGINE-BYTES")
    assert split_engine_header(b"\xff\xff\xff\x7fplain engine") == ({}, b"\xff\xff\xff\x7fplain engine")
    path = tmp_path / "model.engine"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match="TensorRT") as error:
        load_backend(path, "cpu")
    assert "\n" not in str(error.value)


def test_unknown_and_missing_weights_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"unsupported weights format '\.tflite'"):
        load_backend(tmp_path / "model.tflite")
    with pytest.raises(CheckpointError, match="weights not found"):
        load_backend(tmp_path / "absent.onnx")


def test_a_new_format_is_one_class_and_one_suffix(tmp_path: Path) -> None:
    class EchoBackend(Backend):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.flatten(2).transpose(1, 2)[..., :3].repeat(1, 1, 3)

    @register_format
    class EchoFormat(Format):
        name, title, suffixes = "echo", "Echo", (".echo",)

        def output_path(self, ctx: ExportContext) -> Path:
            return ctx.output_stem.with_suffix(".echo")

        def write(self, ctx: ExportContext) -> Path:
            self.output_path(ctx).write_text("")
            return self.output_path(ctx)

        def load(self, path: Path, device: torch.device, half: bool) -> Backend:
            return EchoBackend(path, device, half)

        def read_metadata(self, path: Path) -> dict:
            return {}

    try:
        path = tmp_path / "m.echo"
        path.write_text("")
        backend = load_backend(path)
        assert isinstance(backend, EchoBackend) and backend(torch.ones(1, 3, 2, 2)).shape == (1, 4, 9)
    finally:
        del FORMATS["echo"]
    with pytest.raises(CheckpointError, match="unsupported weights format"):
        load_backend(path)


def test_every_backend_runs_the_models_own_test_time_augmentation(tmp_path: Path, tiny_model: DetectionModel) -> None:
    """One TTA (detector.models.yolo.augmented_forward) for every format: an ONNX file's augmented output equals
    the PyTorch model's ``model(x, augment=True)``, level dropping included (the strides come from the metadata)."""
    square = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    backend = load_backend(export_onnx(tiny_model, tmp_path / "d.onnx", square, _metadata((64, 64), True), True))
    assert backend.strides == (8, 16, 32)
    for images in (square, torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(4))):
        augmented = backend(images, augment=True)
        with torch.no_grad():
            expected = tiny_model(images, augment=True)
        assert augmented.shape == expected.shape and augmented.shape[1] > backend(images).shape[1]
        torch.testing.assert_close(augmented, expected, atol=1e-4, rtol=1e-4)


def test_predictor_gives_the_same_results_for_every_format(
    tmp_path: Path, tiny_model: DetectionModel, images: torch.Tensor
) -> None:
    image = np.random.default_rng(4).integers(0, 256, (120, 180, 3), dtype=np.uint8)
    onnx_path = export_onnx(tiny_model, tmp_path / "p.onnx", images, _metadata((64, 96), True), True)
    fixed_path = export_onnx(tiny_model, tmp_path / "f.onnx", images, _metadata((64, 96), False), False)
    dynamic = Predictor(onnx_path, imgsz=96, conf_thres=0.3).predict_images([image])[0]
    fixed = Predictor(fixed_path, imgsz=320, conf_thres=0.3).predict_images([image])[0]  # warns, uses 64x96
    assert dynamic.input_shape == fixed.input_shape == (64, 96)  # 120x180 -> 64x96 exactly: no padding either way
    assert len(dynamic) > 0 and dynamic.names == tuple(NAMES)
    np.testing.assert_allclose(fixed.boxes, dynamic.boxes, atol=1e-3)
    assert fixed.boxes.dtype == np.float32 and fixed.class_ids.dtype == np.int64
    assert (fixed.boxes[:, [0, 2]] <= 180).all() and (fixed.boxes[:, [1, 3]] <= 120).all()  # original pixels


@pytest.mark.fresh_process  # compiles with OpenVINO (tests/conftest.py)
def test_the_exporters_files_load_and_match(tmp_path: Path, tiny_model: DetectionModel, images: torch.Tensor) -> None:
    from detector import export
    from detector.ops.nms import non_max_suppression

    files = export(tiny_model, include=("torchscript", "onnx", "openvino"), imgsz=(64, 96), project=str(tmp_path))
    assert set(files) == {"torchscript", "onnx", "openvino"}
    reference = _reference(tiny_model, images)
    for path in files.values():
        backend = load_backend(path, "cpu")
        assert (backend.names, backend.stride, backend.fixed_hw) == (NAMES, 32, (64, 96)), path
        torch.testing.assert_close(backend(images), reference, atol=1e-4, rtol=1e-4)

    with_nms = export(tiny_model, include=("onnx",), imgsz=(64, 96), project=str(tmp_path), name="nms", nms=True)
    backend = load_backend(with_nms["onnx"], "cpu")
    assert backend.end2end
    ours = detections_from_output(backend(images), True, conf_thres=0.25)[0]
    # single-label NMS in the graph, as detect.py runs it on raw outputs: each box in its best class only
    expected = non_max_suppression(reference, 0.25, 0.45, multi_label=False, max_det=100)[0]
    assert len(ours) == len(expected) > 0
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-4)
