"""export.py end to end on CPU: every format written, read back and run here in its own runtime against PyTorch.

The checks in these tests are independent of the exporter's own: they load the written files with
torch.jit / onnxruntime / OpenVINO directly and compare with the PyTorch model the checkpoint holds (and, for
--nms, with the .pt's own detections through detect.py's Predictor).
Models: yolov5n.yaml with 3 classes (the real architecture) for the script test, a 5-conv model for the rest,
the official yolov5n.pt for the real-image tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
from tiny_models import strided_convs_yaml

from detector.config import ExportConfig
from detector.engine.backends import Backend
from detector.errors import ExportError
from detector.export import Exporter, OnnxFormat, export, read_metadata, reference_detections, results_table
from detector.export.nms import compare_detections
from detector.models.loading import checkpoint_model_entries, load_model
from detector.models.yolo import DetectionModel
from detector.utils.checkpoint import save_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit/torch.onnx announce TorchScript's deprecation
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = ["cat", "dog", "bird"]


def _with_detections(model: DetectionModel) -> DetectionModel:
    """Raise objectness/class biases so a random model has many boxes above --conf-thres for NMS to resolve."""
    model.names = list(NAMES)
    with torch.no_grad():
        for conv in model.detect.m:
            conv.bias.view(model.detect.na, -1)[:, 4] += 5.0  # objectness from ~0.01 to ~0.5
            conv.bias.view(model.detect.na, -1)[:, 5:] += 2.0
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model() -> DetectionModel:
    torch.manual_seed(0)
    return _with_detections(DetectionModel(strided_convs_yaml(nc=3)))


@pytest.fixture(scope="module")
def yolov5n_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=3)
    model.names = list(NAMES)
    path = tmp_path_factory.mktemp("weights") / "tiny5n.pt"
    save_checkpoint(checkpoint_model_entries(model), path)
    return path


def _images(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _assert_close_to_torch(got: np.ndarray, expected: torch.Tensor) -> None:
    """Scores within 1e-3; boxes (pixels) within 1e-3 of their value."""
    got_tensor = torch.from_numpy(np.asarray(got, np.float32))
    assert got_tensor.shape == expected.shape
    difference = (got_tensor - expected).abs()
    assert difference[..., 4:].max() < 1e-3
    assert (difference[..., :4] / expected[..., :4].abs().clamp(min=1)).max() < 1e-3


def _openvino_model(folder: Path) -> object:
    import openvino

    xml = next(folder.glob("*.xml"))
    return openvino.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


@pytest.mark.slow
@pytest.mark.fresh_process  # compiles with OpenVINO (tests/conftest.py)
def test_export_script_writes_every_cpu_format_and_each_matches_pytorch(
    yolov5n_checkpoint: Path, tmp_path: Path
) -> None:
    command = [sys.executable, str(REPO_ROOT / "export.py"), "--weights", str(yolov5n_checkpoint)]
    command += ["--include", "torchscript", "onnx", "openvino", "engine", "--img", "64", "96", "--dynamic"]
    command += ["--project", str(tmp_path), "--name", "run"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    table = result.stdout[result.stdout.index("Format") :]
    assert table.count("ok: ") == 3
    if not torch.cuda.is_available():
        assert "TensorRT" in table and "skipped" in table and "CUDA" in table

    run = tmp_path / "run"
    files = {
        "torchscript": run / "tiny5n.torchscript",
        "onnx": run / "tiny5n.onnx",
        "openvino": run / "tiny5n_openvino_model",
    }
    assert (files["openvino"] / "tiny5n.xml").is_file() and (files["openvino"] / "tiny5n.bin").is_file()
    for path in files.values():
        metadata = read_metadata(path)
        assert metadata["names"] == NAMES and metadata["stride"] == 32 and metadata["strides"] == [8, 16, 32]
        assert metadata["imgsz"] == [64, 96] and metadata["dynamic"] is True and metadata["nms"] is False

    model = load_model(yolov5n_checkpoint).eval()
    torchscript = torch.jit.load(str(files["torchscript"]))
    session = onnxruntime.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    openvino_model = _openvino_model(files["openvino"])
    for shape in ((1, 3, 64, 96), (2, 3, 128, 64)):  # the export size, then another batch and size (--dynamic)
        images = _images(shape)
        with torch.no_grad():
            expected = model(images)
            _assert_close_to_torch(torchscript(images).numpy(), expected)
        _assert_close_to_torch(session.run(None, {"images": images.numpy()})[0], expected)
        _assert_close_to_torch(openvino_model(images.numpy())[0], expected)


def _onnx_session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_nms_with_dynamic_batch_equals_python_nms(tiny_model: DetectionModel, tmp_path: Path) -> None:
    """The NMS graph's detections equal detector.ops.nms on the same raw predictions (those of the same model
    exported without --nms, itself checked against PyTorch), at two batch sizes and image sizes."""
    options = {"imgsz": (64, 96), "dynamic": True, "conf_thres": 0.3, "topk_all": 40}
    with_nms = _onnx_session(export(tiny_model, include=("onnx",), project=str(tmp_path), nms=True, **options)["onnx"])
    raw = _onnx_session(export(tiny_model, include=("onnx",), project=str(tmp_path), **options)["onnx"])
    assert [o.name for o in with_nms.get_outputs()] == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    total = 0
    for shape in ((1, 3, 64, 96), (3, 3, 96, 64)):
        images = _images(shape, seed=2)
        outputs = with_nms.run(None, {"images": images.numpy()})
        assert outputs[1].shape == (shape[0], 40, 4) and outputs[0].dtype == np.int32
        predictions = torch.from_numpy(raw.run(None, {"images": images.numpy()})[0])
        with torch.no_grad():
            _assert_close_to_torch(predictions.numpy(), tiny_model(images))
        expected = reference_detections(predictions, ExportConfig(conf_thres=0.3, topk_all=40))
        matched, problem = compare_detections(outputs, expected, atol=1e-5)
        assert problem is None
        total += matched
    assert total > 20  # real detections were compared, not empty outputs


@pytest.mark.fresh_process  # compiles with OpenVINO (tests/conftest.py)
def test_half_exports_with_nms_and_dynamic(tiny_model: DetectionModel, tmp_path: Path) -> None:
    """--half with --nms and --dynamic together (YOLOv5 cannot): fp16 graph, float32 NMS outputs."""
    options = {"imgsz": (64, 64), "dynamic": True, "half": True, "conf_thres": 0.3, "project": str(tmp_path)}
    paths = export(tiny_model, include=("onnx", "torchscript", "openvino"), nms=True, **options)
    raw = _onnx_session(export(tiny_model, include=("onnx",), **options)["onnx"])
    with_nms = _onnx_session(paths["onnx"])
    assert with_nms.get_inputs()[0].type == "tensor(float16)"
    images = _images((2, 3, 64, 96), seed=3).half()
    outputs = with_nms.run(None, {"images": images.numpy()})
    assert outputs[2].dtype == np.float32 and int(outputs[0].sum()) > 5
    predictions = torch.from_numpy(raw.run(None, {"images": images.numpy()})[0]).float()
    expected = reference_detections(predictions, ExportConfig(conf_thres=0.3))
    assert compare_detections(outputs, expected, atol=1e-5)[1] is None
    with torch.no_grad():  # fp16 vs the fp32 model: scores within 0.02
        assert (predictions[..., 4:] - tiny_model(images.float())[..., 4:]).abs().max() < 0.02
    torchscript = torch.jit.load(str(paths["torchscript"]))
    assert torchscript(images).dtype == torch.float16
    xml = next(paths["openvino"].glob("*.xml"))
    assert 'element_type="f16"' in xml.read_text()  # --half stores fp16 weights in the IR


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_failed_check_is_an_export_error_and_deletes_the_file(
    tiny_model: DetectionModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, half: bool
) -> None:
    """The check loads the file through load_backend -> OnnxFormat.load, the loader detect.py and val.py use:
    a loader that is off by a pixel fails the export (fp16's check, on the mean error, too)."""
    original_load = OnnxFormat.load

    def off_by_a_pixel(self: OnnxFormat, path: Path, device: torch.device, half: bool) -> Backend:
        backend = original_load(self, path, device, half)
        forward = backend.forward
        backend.forward = lambda images: forward(images) + 1.0  # type: ignore[method-assign]
        return backend

    monkeypatch.setattr(OnnxFormat, "load", off_by_a_pixel)
    config = ExportConfig(include=("onnx", "torchscript"), imgsz=(64, 64), half=half, project=str(tmp_path), name="bad")
    with pytest.raises(ExportError, match="ONNX: predictions differ from PyTorch"):
        Exporter(config).run(tiny_model)
    assert not (tmp_path / "bad" / "model.onnx").exists()  # never left behind as a usable file
    assert (tmp_path / "bad" / "model.torchscript").is_file()  # the other format is still written


@pytest.mark.slow
def test_real_yolov5n_nms_onnx_finds_what_pytorch_finds_on_bus(
    yolov5n_weights: Path, shared_images: Path, coco128_dir: Path, tmp_path: Path
) -> None:
    """The official yolov5n.pt exported with --nms, checked by export.py on coco128 images (--data), then run
    on bus.jpg: the same detections as our Python NMS on the PyTorch model's predictions."""
    from detector.data.augment import letterbox

    config = ExportConfig(
        weights=str(yolov5n_weights), include=("onnx",), imgsz=(320, 320), nms=True,
        data=str(coco128_dir / "coco128.yaml"), project=str(tmp_path),
    )  # fmt: skip
    (result,) = Exporter(config).run()
    assert "detections = Python NMS" in result.check and not result.check.startswith("0/")  # real images, real boxes
    assert read_metadata(result.path)["names"][:2] == ["person", "bicycle"]

    image, _ = letterbox(cv2.imread(str(shared_images / "bus.jpg")), (320, 320), auto=False)
    images = torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)))[None].float() / 255
    outputs = _onnx_session(result.path).run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = reference_detections(load_model(yolov5n_weights).eval()(images), config)
    assert 0 in expected[0][:, 5].tolist()  # persons
    matched, problem = compare_detections(outputs, expected, atol=1e-3, borderline_score=0.251)
    assert problem is None and matched == len(expected[0])


@pytest.mark.slow
def test_onnx_nms_gives_the_pt_detections_on_bus(yolov5n_weights: Path, shared_images: Path, tmp_path: Path) -> None:
    """export.py --nms gives what the .pt gives at the same settings (conf 0.25, IoU 0.45, single-label NMS as
    detect.py): on bus.jpg at 480 a multi-label graph also reported the bus as a truck (score 0.29 or 0.42)."""
    from detector.data.augment import letterbox
    from detector.engine.backends import detections_from_output, load_backend
    from detector.engine.predictor import Detector

    (result,) = Exporter(
        ExportConfig(weights=str(yolov5n_weights), include=("onnx",), imgsz=(480,), nms=True, dynamic=True,
                     project=str(tmp_path))
    ).run()  # fmt: skip
    assert "detections = Python NMS" in result.check and "built-in validation image" in result.check

    # detect.py's pipeline (letterbox padded to the stride, as the file takes any size): .pt vs .onnx
    found = [Detector(w, device="cpu", imgsz=480)(shared_images / "bus.jpg")[0] for w in (yolov5n_weights, result.path)]
    assert found[0].input_shape == found[1].input_shape == (480, 384)
    assert found[0].class_ids.tolist() == found[1].class_ids.tolist() and "bus" in found[0].summary()
    np.testing.assert_allclose(found[1].confidences, found[0].confidences, atol=1e-3)
    np.testing.assert_allclose(found[1].boxes, found[0].boxes, atol=0.1)

    # a square 480x480 input (what a fixed-size export is fed), through load_backend for both files
    image, _ = letterbox(cv2.imread(str(shared_images / "bus.jpg")), (480, 480), auto=False)
    images = torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)))[None].float() / 255
    pt = detections_from_output(load_backend(yolov5n_weights, "cpu")(images), False, 0.25, 0.45)[0]
    graph = load_backend(result.path, "cpu")
    with_nms = detections_from_output(graph(images), graph.end2end, 0.25, 0.45)[0]
    assert with_nms[:, 5].tolist() == pt[:, 5].tolist() and 7.0 not in with_nms[:, 5].tolist()  # 7: truck
    torch.testing.assert_close(with_nms[:, :5], pt[:, :5], atol=0.1, rtol=1e-3)


@pytest.mark.slow
def test_half_onnx_of_yolov5n_at_640_passes_its_check_and_detects_what_the_pt_detects(
    yolov5n_weights: Path, shared_images: Path, coco128_dir: Path, tmp_path: Path
) -> None:
    """export.py --half at 640: rounding yolov5n's logits to fp16 moves some anchor's box by a few percent (PyTorch's
    own fp16 does so too), which a check on the largest error refused; the check on the mean passes it, and the file
    finds the .pt's objects on bus.jpg and zidane.jpg, at the same places (detect.py's pipeline; --dynamic, so both
    get the same rectangular input)."""
    from detector.engine.predictor import Detector

    config = ExportConfig(
        weights=str(yolov5n_weights), include=("onnx",), imgsz=(640, 640), half=True, dynamic=True,
        data=str(coco128_dir / "coco128.yaml"), project=str(tmp_path),
    )  # fmt: skip
    (result,) = Exporter(config).run()
    assert result.precision == "fp16" and "mean |Δ|" in result.check
    for picture in ("bus.jpg", "zidane.jpg"):
        pt, half = (
            Detector(w, device="cpu", imgsz=640)(shared_images / picture)[0] for w in (yolov5n_weights, result.path)
        )
        assert len(pt.class_ids) >= 3 and half.class_ids.tolist() == pt.class_ids.tolist(), picture
        np.testing.assert_allclose(half.confidences, pt.confidences, atol=0.01)
        np.testing.assert_allclose(half.boxes, pt.boxes, atol=1.0)  # pixels of the original image


@pytest.mark.fresh_process  # compiles with OpenVINO (tests/conftest.py)
def test_nms_is_said_not_in_graph_for_formats_that_cannot_hold_it(tiny_model: DetectionModel, tmp_path: Path) -> None:
    """--nms with TorchScript/OpenVINO: those files stay raw, and the results table says so on their rows."""
    from detector.engine.backends import load_backend

    config = ExportConfig(include=("torchscript", "onnx", "openvino"), imgsz=(64, 64), nms=True, project=str(tmp_path))
    results = Exporter(config).run(tiny_model)
    assert [r.nms for r in results] == ["not in graph", "in graph", "not in graph"]
    assert "nms" in results[0].skipped_options and "nms" not in results[1].skipped_options
    assert [load_backend(r.path).end2end for r in results] == [False, True, False]
    assert [read_metadata(r.path)["nms"] for r in results] == [False, True, False]
    table = results_table(results).splitlines()
    rows = {line.split()[0]: line for line in table[1:4]}
    assert "not in graph" in rows["TorchScript"] and "not in graph" in rows["OpenVINO"]
    assert " in graph " in rows["ONNX"] and "not in graph" not in rows["ONNX"]
    assert any(line.startswith("TorchScript: --nms not in graph") for line in table[4:])


def test_nms_check_without_data_runs_on_builtin_images_and_never_passes_empty(
    tiny_model: DetectionModel, tmp_path: Path
) -> None:
    """Without --data the checks run on the built-in dataset's validation images (generated once, cached); an
    --nms check needs detections to compare: a model that finds nothing fails it instead of passing on nothing."""
    from detector.data.dataset import find_images
    from detector.data.dataset_config import load_dataset_config
    from detector.export.base import validation_images

    files = [file for file, _ in find_images(load_dataset_config("").val)[:4]]
    images = validation_images("", 4)
    assert len(images) == 4 and all(np.array_equal(i, cv2.imread(str(f))) for i, f in zip(images, files, strict=True))

    (result,) = Exporter(ExportConfig(include=("onnx",), imgsz=(64, 64), nms=True, project=str(tmp_path))).run(
        tiny_model
    )
    assert result.check.endswith("(1 built-in validation image)") and not result.check.startswith("0/")

    blind = DetectionModel(strided_convs_yaml(nc=3)).eval()
    with torch.no_grad():
        for conv in blind.detect.m:
            conv.bias.view(blind.detect.na, -1)[:, 4] -= 30.0  # objectness ~1e-13: never above --conf-thres
    config = ExportConfig(include=("onnx",), imgsz=(64, 64), nms=True, project=str(tmp_path), name="blind")
    with pytest.raises(ExportError, match=r"no detections above --conf-thres 0\.25 on the 64 built-in validation"):
        Exporter(config).run(blind)
    assert not (tmp_path / "blind" / "model.onnx").exists()
    raw = ExportConfig(include=("onnx",), imgsz=(64, 64), project=str(tmp_path), name="blind_raw")
    assert Exporter(raw).run(blind)[0].ok  # raw predictions are still checked, on the same real images


@pytest.mark.fresh_process  # compiles with OpenVINO (tests/conftest.py)
def test_int8_that_cannot_run_is_reported_skipped_with_the_reason(
    tiny_model: DetectionModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--int8 without NNCF, or for a format without int8 (TorchScript): the file is written at its own precision
    and the results say "int8 skipped" and why - never an ok that reads as an int8 model."""
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if nncf were not installed: importing it fails
    config = ExportConfig(include=("openvino", "torchscript"), imgsz=(64, 64), int8=True, project=str(tmp_path))
    openvino_result, torchscript_result = Exporter(config).run(tiny_model)
    assert openvino_result.ok and openvino_result.precision == "fp32"
    assert openvino_result.skipped_options == {"int8": "skipped: NNCF is not installed (pip install nncf)"}
    expected = {"int8": "skipped: TorchScript has no int8 export (only onnx, openvino)"}
    assert torchscript_result.ok and torchscript_result.skipped_options == expected
    assert read_metadata(openvino_result.path)["int8"] is False
    table = results_table([openvino_result, torchscript_result])  # what Exporter.run logs
    openvino_row = next(line for line in table.splitlines() if line.startswith("OpenVINO "))
    assert "fp32 (int8 skipped)" in openvino_row
    assert "OpenVINO: --int8 skipped: NNCF is not installed (pip install nncf)" in table
    assert "TorchScript: --int8 skipped: TorchScript has no int8 export" in table


@pytest.mark.slow
@pytest.mark.fresh_process  # compiles with OpenVINO (tests/conftest.py)
def test_openvino_int8_with_nncf_loads_and_detects_on_bus(
    yolov5n_weights: Path, shared_images: Path, tmp_path: Path
) -> None:
    """--int8 with NNCF installed (the export extra): an int8 IR (quantize/dequantize around int8 weights) that
    load_backend runs and that finds bus.jpg's bus and persons as the .pt does."""
    pytest.importorskip("nncf", reason="--int8 needs nncf (pip install nncf, in the export and dev extras)")
    from detector.engine.predictor import Detector

    common = {"include": ("openvino",), "imgsz": (320, 320), "project": str(tmp_path)}
    (result,) = Exporter(ExportConfig(weights=str(yolov5n_weights), int8=True, **common)).run()
    assert result.precision == "int8" and not result.skipped_options and read_metadata(result.path)["int8"] is True
    xml = next(result.path.glob("*.xml")).read_text()
    assert "FakeQuantize" in xml or 'element_type="i8"' in xml or 'element_type="u8"' in xml
    int8_found = Detector(result.path, device="cpu", imgsz=320)(shared_images / "bus.jpg")[0]
    pt_found = Detector(yolov5n_weights, device="cpu", imgsz=320)(shared_images / "bus.jpg")[0]
    assert "bus" in int8_found.summary() and "person" in int8_found.summary()
    assert set(int8_found.class_ids.tolist()) == set(pt_found.class_ids.tolist())


def test_onnx_opset_and_simplify(tiny_model: DetectionModel, tmp_path: Path) -> None:
    import onnx

    plain = export(tiny_model, include=("onnx",), imgsz=(64, 64), dynamic=True, opset=13, project=str(tmp_path))
    slim = export(tiny_model, include=("onnx",), imgsz=(64, 64), dynamic=True, simplify=True, project=str(tmp_path))
    plain_model, slim_model = onnx.load(str(plain["onnx"])), onnx.load(str(slim["onnx"]))
    assert [o.version for o in plain_model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert len(slim_model.graph.node) < len(plain_model.graph.node)  # onnxslim folded something away
    assert read_metadata(slim["onnx"])["names"] == NAMES  # metadata survives simplification
    images = _images((2, 3, 96, 64))
    with torch.no_grad():
        _assert_close_to_torch(_onnx_session(slim["onnx"]).run(None, {"images": images.numpy()})[0], tiny_model(images))
