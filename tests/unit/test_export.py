"""Exporter pieces that need no model: NMS in the graph vs our Python NMS, metadata, option checks, the CLI.

The NMS graphs are exported around an identity "model", so the input is the (B, N, 5 + nc) predictions
themselves and every case is hand-built or seeded; onnxruntime runs the graph, detector.ops.nms is the reference.
"""

from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from detector.cli.export import FLAGS, build_parser, main
from detector.config import ExportConfig, build_config
from detector.engine.backends import split_engine_header
from detector.engine.exporter import (
    FORMATS,
    NMS_OUTPUT_NAMES,
    NMSModel,
    TensorRTFormat,
    compare_detections,
    export_image_size,
    read_metadata,
    reference_detections,
    validate_config,
    write_engine_file,
)
from detector.errors import ConfigError

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit/torch.onnx announce TorchScript's deprecation
]


def _config(**changes: object) -> ExportConfig:
    return dataclasses.replace(ExportConfig(), **changes)


def _nms_onnx(tmp_path: Path, config: ExportConfig, example: torch.Tensor, flavor: str = "onnx") -> Path:
    """The NMS graph alone (identity model), batch and box count dynamic."""
    path = tmp_path / f"nms_{flavor}.onnx"
    model = NMSModel(nn.Identity(), config, flavor).eval()
    axes = {"images": {0: "batch", 1: "anchors"}, **{name: {0: "batch"} for name in NMS_OUTPUT_NAMES}}
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=17, input_names=["images"],
        output_names=list(NMS_OUTPUT_NAMES), dynamic_axes=axes,
    )  # fmt: skip
    return path


def _run_onnx(path: Path, pred: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": pred.numpy()})


def _random_predictions(seed: int, batch: int, boxes: int, nc: int) -> torch.Tensor:
    """(B, N, 5 + nc): boxes in a few clusters (so NMS has overlaps to resolve), varied scores."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 4, 2, generator=generator) * 200 + 20
    cluster = torch.randint(0, 4, (batch, boxes), generator=generator)
    xy = centres.gather(1, cluster[..., None].expand(-1, -1, 2)) + torch.randn(batch, boxes, 2, generator=generator) * 6
    wh = 30 + torch.rand(batch, boxes, 2, generator=generator) * 40
    scores = torch.rand(batch, boxes, 1 + nc, generator=generator)
    return torch.cat((xy, wh, scores), -1)


def _box(xc: float, yc: float, w: float, h: float, obj: float, *cls: float) -> list[float]:
    return [xc, yc, w, h, obj, *cls]


@pytest.mark.parametrize("agnostic", [False, True])
def test_onnx_nms_graph_equals_python_nms_on_seeded_predictions(tmp_path: Path, agnostic: bool) -> None:
    config = _config(conf_thres=0.2, iou_thres=0.5, topk_all=30, topk_per_class=8, agnostic_nms=agnostic)
    path = _nms_onnx(tmp_path, config, _random_predictions(0, 2, 60, 3))
    for seed, batch, boxes in ((1, 2, 60), (2, 3, 150)):  # a different batch and box count than traced
        pred = _random_predictions(seed, batch, boxes, 3)
        outputs = _run_onnx(path, pred)
        expected = reference_detections(pred, config)
        matched, problem = compare_detections(outputs, expected, atol=1e-5)
        assert problem is None
        assert matched == sum(len(e) for e in expected) > 10
        assert [o.dtype for o in outputs] == [np.int32, np.float32, np.float32, np.int32]
        assert outputs[1].shape == (batch, 30, 4) and outputs[0].shape == (batch, 1)


def test_onnx_nms_hand_built_cases(tmp_path: Path) -> None:
    config = _config(conf_thres=0.25, iou_thres=0.45, topk_all=4, topk_per_class=2)
    # image 0: boxes A and B overlap (IoU 0.90) in class 0 -> B suppressed; C is class 1 at the same place -> kept.
    # D is below the threshold (0.9 * 0.2 = 0.18). E, F, G are three separate class-2 boxes: topk_per_class=2 keeps 2.
    image0 = [
        _box(50, 50, 40, 40, 0.9, 0.9, 0.1, 0.0),  # A: class 0, 0.81
        _box(52, 50, 40, 40, 0.9, 0.8, 0.0, 0.0),  # B: class 0, 0.72, suppressed by A
        _box(51, 50, 40, 40, 0.9, 0.0, 0.5, 0.0),  # C: class 1, 0.45
        _box(150, 150, 20, 20, 0.9, 0.2, 0.0, 0.0),  # D: 0.18 < 0.25
        _box(200, 20, 10, 10, 1.0, 0.0, 0.0, 0.7),  # E: class 2, 0.7
        _box(230, 20, 10, 10, 1.0, 0.0, 0.0, 0.6),  # F: class 2, 0.6
        _box(260, 20, 10, 10, 1.0, 0.0, 0.0, 0.5),  # G: class 2, 0.5, beyond topk_per_class
    ]
    image1 = [_box(10, 10, 4, 4, 0.1, 0.5, 0.5, 0.5)] * 7  # nothing above the threshold
    pred = torch.tensor([image0, image1], dtype=torch.float32)
    num_dets, boxes, scores, classes = _run_onnx(_nms_onnx(tmp_path, config, pred), pred)
    assert num_dets.tolist() == [[4], [0]]
    np.testing.assert_allclose(scores[0], [0.81, 0.7, 0.6, 0.45], atol=1e-6)  # topk_all=4, by descending score
    assert classes[0].tolist() == [0, 2, 2, 1]
    np.testing.assert_allclose(boxes[0, 0], [30, 30, 70, 70], atol=1e-5)  # A as xyxy
    assert not boxes[1].any() and not scores[1].any() and not classes[1].any()  # padding rows are zeros


def test_onnx_nms_agnostic_suppresses_across_classes(tmp_path: Path) -> None:
    config = _config(conf_thres=0.25, iou_thres=0.45, topk_all=5, agnostic_nms=True)
    pred = torch.tensor([[_box(50, 50, 40, 40, 0.9, 0.9, 0.1), _box(51, 50, 40, 40, 0.9, 0.1, 0.5)]])
    num_dets, _, scores, classes = _run_onnx(_nms_onnx(tmp_path, config, pred), pred)
    assert num_dets.tolist() == [[1]] and classes[0, 0] == 0
    assert scores[0, 0] == pytest.approx(0.81, abs=1e-6)


def test_tensorrt_flavor_has_efficient_nms_node_and_same_eager_outputs(tmp_path: Path) -> None:
    config = _config(conf_thres=0.2, iou_thres=0.5, topk_all=20, topk_per_class=20)
    pred = _random_predictions(3, 2, 50, 3)
    path = _nms_onnx(tmp_path, config, pred, flavor="tensorrt")
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "EfficientNMS_TRT"]
    assert len(nodes) == 1 and nodes[0].domain == "TRT" and len(nodes[0].output) == 4
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["max_output_boxes"] == 20 and attributes["box_coding"] == 0
    assert attributes["iou_threshold"] == pytest.approx(0.5) and attributes["score_threshold"] == pytest.approx(0.2)
    assert attributes["class_agnostic"] == 0 and attributes["background_class"] == -1
    # The PyTorch stand-in used for tracing gives what the ONNX flavor (and Python NMS) gives.
    with torch.no_grad():
        eager = [t.numpy() for t in NMSModel(nn.Identity(), config, "tensorrt")(pred)]
    assert compare_detections(eager, reference_detections(pred, config), atol=1e-5)[1] is None


def test_reference_detections_applies_per_class_and_total_caps() -> None:
    rows = [_box(30 * i + 15, 15, 10, 10, 1.0, 0.9 - 0.1 * i, 0.0) for i in range(4)]  # 4 class-0 boxes
    rows.append(_box(15, 100, 10, 10, 1.0, 0.0, 0.3))  # one class-1 box
    pred = torch.tensor([rows])
    detections = reference_detections(pred, _config(conf_thres=0.1, topk_per_class=2, topk_all=10))[0]
    assert detections[:, 5].tolist() == [0, 0, 1]
    assert detections[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.3])
    assert len(reference_detections(pred, _config(conf_thres=0.1, topk_per_class=9, topk_all=3))[0]) == 3


def test_compare_detections_reports_a_missing_or_wrong_detection() -> None:
    expected = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 1.0], [20.0, 20.0, 30.0, 30.0, 0.3, 0.0]])]
    outputs = [
        np.array([[2]], np.int32),
        np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]]], np.float32),
        np.array([[0.9, 0.3, 0.0]], np.float32),
        np.array([[1, 0, 0]], np.int32),
    ]
    assert compare_detections(outputs, expected, atol=1e-4) == (2, None)
    wrong_class = [outputs[0], outputs[1], outputs[2], np.array([[1, 2, 0]], np.int32)]
    assert "missing" in compare_detections(wrong_class, expected, atol=1e-4)[1]
    one_fewer = [np.array([[1]], np.int32), outputs[1] * [[[1], [0], [0]]], outputs[2] * [[1, 0, 0]], outputs[3]]
    assert "missing" in compare_detections(one_fewer, expected, atol=1e-4)[1]
    # ... unless the lost one scores under the borderline (within rounding of the threshold)
    assert compare_detections(one_fewer, expected, atol=1e-4, borderline_score=0.31)[1] is None
    # a tolerance for near-tie swaps: 1 of 2 unmatched fails at 0.9, passes at 0.5
    assert compare_detections(one_fewer, expected, atol=1e-4, min_match_fraction=0.5)[1] is None
    dirty_padding = [outputs[0], outputs[1], np.array([[0.9, 0.3, 0.2]], np.float32), outputs[3]]
    assert "not zero" in compare_detections(dirty_padding, expected, atol=1e-4)[1]


def test_engine_header_round_trip_and_plain_engine(tmp_path: Path) -> None:
    metadata = {"names": ["a", "b"], "stride": 32, "nms": True}
    path = tmp_path / "model.engine"
    write_engine_file(path, metadata, b"\x00ENGINE-BYTES")
    assert split_engine_header(path.read_bytes()) == (metadata, b"\x00ENGINE-BYTES")
    assert read_metadata(path)["names"] == ["a", "b"]
    (tmp_path / "plain.engine").write_bytes(b"\xff\xff\xff\x7fnot a header")  # a headerless engine
    assert split_engine_header((tmp_path / "plain.engine").read_bytes()) == ({}, b"\xff\xff\xff\x7fnot a header")


def test_read_metadata_accepts_yolov5_style_onnx_names(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph([], "empty", [], [])
    proto = onnx.helper.make_model(graph)
    for key, value in {"stride": "32", "names": "{0: 'person', 1: 'bicycle'}"}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp_path / "v5.onnx"))
    assert read_metadata(tmp_path / "v5.onnx") == {"stride": 32, "names": {0: "person", 1: "bicycle"}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"include": ("onnxx",)}, "did you mean 'onnx'"),
        ({"include": ()}, "--include"),
        ({"opset": 9}, "--opset"),
        ({"conf_thres": 1.5}, "--conf-thres"),
        ({"topk_all": 0}, "--topk-all"),
        ({"batch_size": 0}, "--batch-size"),
        ({"workspace": 0.0}, "--workspace"),
        ({"imgsz": (0,)}, "--imgsz"),
        ({"optimize": True, "device": "0"}, "CPU-only"),
    ],
)
def test_bad_options_are_one_line_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_config(**changes))


def test_image_size_rounds_up_to_the_stride() -> None:
    assert export_image_size((640,), 32) == (640, 640)
    assert export_image_size((100,), 32) == (128, 128)
    assert export_image_size((64, 90), 32) == (64, 96)
    with pytest.raises(ConfigError, match="one or two numbers"):
        export_image_size((1, 2, 3), 32)


def test_cli_flags_map_to_export_config() -> None:
    from detector.cli.common import given_flags

    argv = ["--weights", "w.pt", "--img", "320", "256", "--include", "onnx,openvino", "engine", "--nms"]
    argv += ["--topk-all", "50", "--conf-thres", "0.4", "--dynamic", "--opset", "13", "--agnostic-nms"]
    flags = given_flags(build_parser(), argv)
    flags["include"] = [n for item in flags["include"] for n in item.split(",")]
    config = build_config(ExportConfig, ("command line", flags))
    assert config.imgsz == (320, 256) and config.include == ("onnx", "openvino", "engine")
    assert (config.nms, config.topk_all, config.conf_thres, config.dynamic) == (True, 50, 0.4, True)
    assert (config.opset, config.agnostic_nms, config.batch_size) == (13, True, 1)


def test_help_lists_every_flag_with_its_default() -> None:
    text = build_parser().format_help()
    for flags, _, _ in FLAGS:
        assert flags[0] in text
    assert text.count("(default:") == len(FLAGS)
    for name in FORMATS:
        assert name in text
    names = {field.name for field in dataclasses.fields(ExportConfig)}
    assert {flags[0].lstrip("-").replace("-", "_") for flags, _, _ in FLAGS} == names  # every option has a flag


def test_cli_error_is_one_line_and_exit_status_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with redirect_stdout(io.StringIO()):
        status = main(["--weights", str(tmp_path / "missing.pt"), "--include", "onnx", "--project", str(tmp_path)])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "missing.pt" in error and "\n" not in error


def test_tensorrt_is_skipped_with_its_reason_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: TensorRT is not skipped here")
    reason = TensorRTFormat().unavailable(None)  # type: ignore[arg-type]
    assert reason is not None and "CUDA" in reason


class _FakeTensorRT:
    """Just enough of the tensorrt module to drive TensorRTFormat.write without a GPU; records what it is asked."""

    __version__ = "10.3.0"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16 = "fp16"

    def __init__(self, parse_ok: bool = True, build_ok: bool = True) -> None:
        self.parse_ok, self.build_ok = parse_ok, build_ok
        self.calls: dict[str, object] = {}
        fake = self

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls["workspace"] = size

            def set_flag(self, flag: str) -> None:
                fake.calls.setdefault("flags", []).append(flag)

            def add_optimization_profile(self, profile: object) -> None:
                fake.calls["profile"] = profile.shapes  # type: ignore[attr-defined]

        class Profile:
            def set_shape(self, name: str, *shapes: tuple[int, ...]) -> None:
                self.shapes = (name, *shapes)

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger: object) -> None:
                pass

            def create_network(self, flags: int) -> object:
                fake.calls["network_flags"] = flags
                return object()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: object, config: object) -> bytes | None:
                return b"SERIALIZED-ENGINE" if fake.build_ok else None

        class OnnxParser:
            num_errors = 1

            def __init__(self, network: object, logger: object) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                fake.calls["onnx"] = path
                return fake.parse_ok

            def get_error(self, index: int) -> str:
                return "node 7: unsupported operator Foo"

        self.Builder, self.OnnxParser = Builder, OnnxParser

    def init_libnvinfer_plugins(self, logger: object, namespace: str) -> None:
        self.calls["plugins"] = True


def _tensorrt_context(tmp_path: Path, **changes: object) -> object:
    from types import SimpleNamespace

    config = _config(**changes)
    onnx_path = tmp_path / "model_raw.onnx"
    return SimpleNamespace(
        config=config,
        metadata={"names": ["a"], "stride": 32, "nms": False},
        imgsz=(640, 480),
        export_shape=(config.batch_size, 3, 640, 480),
        max_stride=32,
        device=torch.device("cpu"),
        output_stem=tmp_path / "model",
        onnx_file=lambda flavor, half: onnx_path.with_name(f"model_{flavor}.onnx"),
    )


def test_tensorrt_build_options_and_engine_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import sys

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    ctx = _tensorrt_context(tmp_path, half=True, dynamic=True, batch_size=8, workspace=2.0, nms=True, topk_all=50)
    path = TensorRTFormat().write(ctx)  # type: ignore[arg-type]
    assert path == tmp_path / "model.engine"
    metadata, engine = split_engine_header(path.read_bytes())
    assert engine == b"SERIALIZED-ENGINE" and metadata["nms"] is True and metadata["topk_all"] == 50
    assert fake.calls["onnx"].endswith("model_tensorrt.onnx")  # the EfficientNMS_TRT flavor for --nms
    assert fake.calls["workspace"] == 2 * 2**30 and fake.calls["flags"] == ["fp16"] and fake.calls["plugins"]
    assert fake.calls["network_flags"] == 0  # explicit batch is implicit from TensorRT 10
    assert fake.calls["profile"] == ("images", (1, 3, 32, 32), (8, 3, 640, 480), (8, 3, 640, 480))


@pytest.mark.parametrize(
    ("parse_ok", "build_ok", "message"), [(False, True, "unsupported operator Foo"), (True, False, "build failed")]
)
def test_tensorrt_failures_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parse_ok: bool, build_ok: bool, message: str
) -> None:
    import contextlib
    import sys

    from detector.errors import ExportError

    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(parse_ok, build_ok))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    with pytest.raises(ExportError, match=message):
        TensorRTFormat().write(_tensorrt_context(tmp_path))  # type: ignore[arg-type]
    assert not (tmp_path / "model.engine").exists()  # never a silent empty result


def test_only_skipped_formats_is_an_error_not_a_silent_success(tmp_path: Path) -> None:
    from detector.engine.exporter import Exporter
    from detector.errors import ExportError
    from detector.models.yolo import DetectionModel

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: TensorRT is not skipped here")
    tiny = {
        "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30]],
        "backbone": [[-1, 1, "Conv", [8, 3, 2]]], "head": [[[0], 1, "Detect", ["nc", "anchors"]]],
    }  # fmt: skip
    config = _config(include=("engine",), imgsz=(64,), project=str(tmp_path))
    with pytest.raises(ExportError, match=r"nothing exported: TensorRT skipped \(.*CUDA"):
        Exporter(config).run(DetectionModel(tiny))
